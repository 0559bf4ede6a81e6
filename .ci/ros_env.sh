#!/usr/bin/env bash
# Run a command with the project venv, ROS 2 and the built workspace on its
# environment, and DDS kept on loopback:  .ci/ros_env.sh CMD [ARGS...]
set -eo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
# The wheels install ROS packages under the venv prefix: CMake and ament look there.
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
if [ -f "$root/install/local_setup.bash" ]; then
    # shellcheck disable=SC1091
    source "$root/install/local_setup.bash"
fi
exec "$@"
