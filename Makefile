# The two commands of the README: `make demo` and `make test`. Both bootstrap
# the venv (.venv/) and the colcon workspace (build/ install/ log/) first, and
# reuse them the second time.
SHELL := /bin/bash
VENV := .venv
RUN := .ci/ros_env.sh
STAMP := $(VENV)/.bootstrapped
# DDS stays on this machine: no discovery traffic on external interfaces.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST

.PHONY: all venv build test lint demo bench clean ros2cli floor-venv test-floor lerobot-venv \
	test-lerobot

all: build

$(STAMP): .ci/bootstrap_venv.sh .ci/requirements-ros.txt .ci/requirements-dev.txt .ci/patch_ros_wheel_cmake.py
	bash .ci/bootstrap_venv.sh $(VENV)
	touch $@

venv: $(STAMP)

build: $(STAMP)
	$(RUN) colcon --log-base log build --base-paths src --symlink-install

# The real ros2 command line and launch_ros are on no registry: installed into
# the venv from ../shared/ros2cli when that folder is there (CI has it), so the
# tests of `ros2 launch` / `topic` / `param` run; elsewhere they skip.
ROS2CLI_DIR := ../shared/ros2cli
ROS2CLI_STAMP := $(VENV)/.ros2cli
ifneq ($(wildcard $(ROS2CLI_DIR)/install.sh),)
$(ROS2CLI_STAMP): $(STAMP) $(wildcard $(ROS2CLI_DIR)/*)
	$(RUN) bash $(ROS2CLI_DIR)/install.sh
	touch $@
ros2cli: $(ROS2CLI_STAMP)
else
ros2cli:
	@echo "ros2cli: no $(ROS2CLI_DIR): the ros2 command line is not installed, its tests skip"
endif

lint: $(STAMP)
	$(RUN) ruff check .

# The OpenVLA authors' remote code, never in this repository, is in the project's
# shared folder beside the checkout on development machines and CI. Where it is,
# `make test` hands it to the tests (OPENVLA_HF_DIR, unless already set), and
# then they must run: a missing file or package fails them instead of skipping.
# test-openvla runs only them (README, Development).
OPENVLA_HF_SHARED := $(abspath ../shared/openvla-hf)
OPENVLA_HF_ENV := $(if $(wildcard $(OPENVLA_HF_SHARED)),OPENVLA_HF_DIR="$${OPENVLA_HF_DIR:-$(OPENVLA_HF_SHARED)}")
OPENVLA_REMOTE_TESTS := src/manipulation_policy/test/test_openvla_remote_code.py \
	src/manipulation_policy/test/test_gpu_check_openvla.py
.PHONY: test-openvla

test: build lint ros2cli floor-venv lerobot-venv
	$(OPENVLA_HF_ENV) $(RUN) python -m pytest
	$(MAKE) --no-print-directory test-floor
	$(MAKE) --no-print-directory test-lerobot

test-openvla: build
	$(OPENVLA_HF_ENV) $(RUN) python -m pytest $(OPENVLA_REMOTE_TESTS)

# The robot-floor lane: every test that needs no ROS, again under a Humble robot's
# Python and libraries (docker/robot-requirements.txt), in its own venv.
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.bootstrapped

$(FLOOR_STAMP): .ci/bootstrap_floor_venv.sh docker/robot-requirements.txt .ci/requirements-floor.txt
	bash .ci/bootstrap_floor_venv.sh $(FLOOR_VENV)
	touch $@

floor-venv: $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	PYTHONPATH=$(CURDIR)/.ci $(FLOOR_VENV)/bin/python -m pytest -p floor_lane

# The LeRobot lane: LeRobot 0.4.4 in its own venv layered on the main one (torch,
# rclpy ... reused from it; .ci/bootstrap_lerobot_venv.sh), running only the LeRobot
# tests (test_lerobot_*.py). LEROBOT_REQUIRED makes a missing lerobot fail them there;
# the main lane, which has no lerobot, skips them.
LEROBOT_VENV := .venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.bootstrapped
LEROBOT_TESTS := $(wildcard src/*/test/test_lerobot_*.py)

$(LEROBOT_STAMP): $(STAMP) .ci/bootstrap_lerobot_venv.sh .ci/requirements-lerobot.txt
	bash .ci/bootstrap_lerobot_venv.sh $(LEROBOT_VENV)
	touch $@

lerobot-venv: $(LEROBOT_STAMP)

test-lerobot: build $(LEROBOT_STAMP)
	LEROBOT_REQUIRED=1 ROS_ENV_VENV=$(LEROBOT_VENV) $(RUN) python -m pytest $(LEROBOT_TESTS)

demo: build
	ROS_DOMAIN_ID=$${ROS_DOMAIN_ID:-42} $(RUN) python -m manipulation_bringup.demo

# Speed is measured here, not in tests: each script prints a table (BENCHMARKS.md).
bench: build
	$(RUN) python bench/bench_server.py
	$(RUN) python bench/bench_remote_path.py
	$(RUN) python bench/bench_openvla_gpu.py

clean:
	rm -rf build install log
