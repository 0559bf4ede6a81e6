#!/usr/bin/env bash
# Entry point of the robot image: ROS 2 Humble and the workspace on the
# environment, then the command (default: ros2 launch manipulation_bringup core_launch.py).
set -e
# shellcheck disable=SC1091
source /opt/ros/humble/setup.bash
# shellcheck disable=SC1091
source /ws/install/setup.bash
exec "$@"
