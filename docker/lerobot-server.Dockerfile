# GPU server image for LeRobot checkpoints: CUDA 12.6 + PyTorch 2.7.1 (Python 3.11) +
# LeRobot 0.4.4 (requirements-lerobot.txt), serving the policy over HTTP on port 5000.
# A separate image from server.Dockerfile (OpenVLA): the transformers lines clash.
#   docker build -f docker/lerobot-server.Dockerfile -t manipulation-lerobot-server .
#   docker run --rm --gpus all -p 5000:5000 -v /path/to/pretrained_model:/models/policy:ro \
#       manipulation-lerobot-server python3 -m manipulation_policy.policy_server \
#       --host 0.0.0.0 --port 5000 --backend lerobot --model /models/policy \
#       --action-layout joint_position:shoulder_pan,...,gripper --fps 30
# Without arguments it serves the deterministic stub backend (a smoke test).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/huggingface
WORKDIR /opt/manipulation

# torch and torchvision are the base image's; pip keeps them (same versions).
COPY requirements-lerobot.txt ./
RUN pip install -r requirements-lerobot.txt

COPY src/manipulation_policy ./src/manipulation_policy
RUN pip install --no-deps ./src/manipulation_policy

RUN useradd --create-home --uid 1000 policy \
    && mkdir -p /models \
    && chown 1000 /models
USER 1000
WORKDIR /home/policy

EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4).status != 200)"]
CMD ["python3", "-m", "manipulation_policy.policy_server", "--host", "0.0.0.0", "--port", "5000"]
