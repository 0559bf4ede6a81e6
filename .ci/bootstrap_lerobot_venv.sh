#!/usr/bin/env bash
# Create the LeRobot lane's venv (make test-lerobot): a venv layered on the main
# .venv, whose site-packages ends with a .pth naming the main venv's site-packages,
# so torch, torchvision, rclpy, fastapi ... are the main venv's (one torch build, and
# the ROS wheels); LeRobot 0.4.4 and what its ACT and Diffusion import
# (.ci/requirements-lerobot.txt, exact pins, --no-deps) go into this venv and come
# first on sys.path. The main venv is only read, never installed into.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lerobot}
main=$PWD/.venv
python=$main/bin/python
if [ ! -x "$python" ]; then
    echo "lerobot: the main venv $main is missing: make venv first" >&2
    exit 1
fi
main_site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
base=$("$python" -c "import sys; print(sys._base_executable)")

# Built from nothing each time its inputs change, so nothing old lingers.
rm -rf "$venv"
"$base" -m venv "$venv"
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# .pth files are read in name order: this one last, so this venv's packages win.
echo "$main_site" >"$site/zzz-main-venv.pth"
start=$SECONDS
# This image's pip config names local package mirrors that may be absent: drop
# those warnings, keep every other message.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    -r .ci/requirements-lerobot.txt 2> >(grep -v '^WARNING: Location .* is ignored' >&2)
"$venv/bin/python" -c "
import lerobot, torch, torchvision
from lerobot.policies.act.modeling_act import ACTPolicy
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
print(f'lerobot: $venv ready in {$SECONDS - $start}s: lerobot {lerobot.__version__},',
      f'torch {torch.__version__}, torchvision {torchvision.__version__} (main venv)')
" 2> >(grep -v Warning >&2)
