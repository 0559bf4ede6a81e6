# GPU server image: CUDA 12.1 + PyTorch 2.2.0 + the pinned OpenVLA stack,
# serving the policy over HTTP on port 5000.
#   docker build -f docker/server.Dockerfile -t manipulation-policy-server .   (repo root)
#   docker run --rm --gpus all -p 5000:5000 -v hf-cache:/models manipulation-policy-server \
#       python3 -m manipulation_policy.policy_server --host 0.0.0.0 --port 5000 \
#       --backend openvla --model openvla/openvla-7b --unnorm-key bridge_orig
# Without arguments it serves the deterministic stub backend (a smoke test).
FROM pytorch/pytorch:2.2.0-cuda12.1-cudnn8-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/huggingface
WORKDIR /opt/manipulation

# torch and torchvision are the base image's; pip keeps them (same versions).
COPY requirements.txt ./
RUN pip install -r requirements.txt

# The server side of manipulation_policy is plain Python: no ROS needed.
COPY src/manipulation_policy ./src/manipulation_policy
RUN pip install --no-deps ./src/manipulation_policy

# Run as an unprivileged user; /models holds the Hugging Face cache (a volume).
RUN useradd --create-home --uid 1000 policy \
    && mkdir -p /models \
    && chown 1000 /models
USER 1000
WORKDIR /home/policy

EXPOSE 5000
# Loading a 7B model can take minutes (download on first start): long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4).status != 200)"]
CMD ["python3", "-m", "manipulation_policy.policy_server", "--host", "0.0.0.0", "--port", "5000"]
