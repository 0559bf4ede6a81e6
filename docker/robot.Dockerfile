# Robot image: ROS 2 Humble with the MobileManipulationCore workspace built.
#   docker build -f docker/robot.Dockerfile -t manipulation-robot .     (from the repo root)
#   docker run --rm -it --network host --ipc host manipulation-robot \
#       ros2 launch manipulation_bringup core_launch.py use_remote_policy:=true \
#       remote_url:=http://GPU_HOST:5000
FROM ros:humble-ros-base

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /ws

# System dependencies from the package manifests first, so that a code change
# does not re-run rosdep.
COPY src/manipulation_msgs/package.xml src/manipulation_msgs/package.xml
COPY src/manipulation_policy/package.xml src/manipulation_policy/package.xml
COPY src/manipulation_bringup/package.xml src/manipulation_bringup/package.xml
# The robot side's Python floor (the file the robot guide and `make test-floor` read):
# numpy, Pillow and PyYAML stay the apt copies rosdep installs (at or above the floor,
# so pip leaves them); pydantic 2 comes from pip, which takes precedence over Ubuntu
# 22.04's pydantic 1. Apt versions follow the Humble snapshot of the base image.
COPY docker/robot-requirements.txt docker/robot-requirements.txt
# hadolint ignore=DL3008
RUN apt-get update \
    && rosdep update --rosdistro humble \
    && rosdep install --from-paths src --ignore-src --rosdistro humble -y \
    && apt-get install -y --no-install-recommends python3-pip \
    && pip3 install --no-cache-dir -r docker/robot-requirements.txt \
    && rm -rf /var/lib/apt/lists/*

COPY colcon.meta ./
COPY src ./src
RUN source /opt/ros/humble/setup.bash \
    && colcon build --cmake-args -DBUILD_TESTING=OFF \
    && rm -rf build log

COPY docker/robot_entrypoint.sh /usr/local/bin/robot_entrypoint.sh
ENTRYPOINT ["/bin/bash", "/usr/local/bin/robot_entrypoint.sh"]
# The image has no torch, so its default is the remote node (a server on this
# host's port 5000 unless remote_url:= says otherwise); until a server answers
# it stays unconfigured and asks again every 2 s. The in-process node needs a
# CUDA torch stack on the robot.
CMD ["ros2", "launch", "manipulation_bringup", "core_launch.py", "use_remote_policy:=true"]
