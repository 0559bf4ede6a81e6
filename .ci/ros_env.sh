#!/usr/bin/env bash
# Run a command with the project venv, ROS 2 and the built workspace on its
# environment, and DDS kept on loopback:  .ci/ros_env.sh CMD [ARGS...]
# ROS_ENV_VENV names another venv to activate instead (a folder of the repository,
# e.g. .venv-lerobot, layered on .venv): the ROS wheels stay the main venv's.
set -eo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/${ROS_ENV_VENV:-.venv}"
if [ ! -f "$venv/bin/activate" ]; then
    echo "ros_env: no venv at $venv" >&2
    exit 1
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# The wheels install ROS packages under the main venv's prefix: CMake and ament look there.
export AMENT_PREFIX_PATH="$root/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$root/.venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
if [ "$venv" != "$root/.venv" ]; then
    # The ROS wheels' libraries: the main venv's ros_wheels_bootstrapper.pth finds
    # them from sys.prefix, which is the other venv's here, so say them once for both.
    ros_libs="$root/.venv/lib"
    for libs in "$root"/.venv/lib/python3*/site-packages/ros_*.libs; do
        [ -d "$libs" ] && ros_libs="$ros_libs:$libs"
    done
    export LD_LIBRARY_PATH="$ros_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
fi
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
if [ -f "$root/install/local_setup.bash" ]; then
    # shellcheck disable=SC1091
    source "$root/install/local_setup.bash"
fi
exec "$@"
