# syntax=docker/dockerfile:1
# A dmoe node on an NVIDIA GPU. Build from the repository root (the build context):
#   docker build -f docker/node-cuda.Dockerfile -t dmoe-node-cuda .
# Run it with the GPU handed in (needs the NVIDIA Container Toolkit on the host):
#   docker run -d --init --gpus all --network host -v dmoe-node:/data -e DMOE_NODE_ANNOUNCE_HOST=<address> \
#       dmoe-node-cuda node start --swarm <swarm address> --experts 'ffn.[0:8]'
#
# Base: PyTorch's runtime image, not nvidia/cuda:*-runtime. A pip-installed torch brings its own CUDA
# libraries (cuBLAS, cuDNN, NCCL as nvidia-* wheels), so on an nvidia/cuda base the base's CUDA would sit
# unused beside a second copy of it, and Python would have to be added (Ubuntu's is 3.10 or 3.12). Here
# Python, torch 2.13.0, CUDA and cuDNN come once, built and tested together, and installing dmoe leaves
# that torch alone (torch>=2.1 is satisfied). Only the host's driver is needed.
# cuda12.6 runs on the widest range of drivers (nvidia-smi's "CUDA Version" must be 12.6 or newer). For the
# newest GPUs (Blackwell: RTX 50xx, B200) build on a newer CUDA, with a driver that supports it (>= 580):
#   --build-arg BASE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
ARG BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE} AS python-env

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The dependencies alone, read from pyproject.toml, in a layer of their own: a change to the code does
# not reinstall them. hivemind's wheel carries its libp2p daemon, so no Go toolchain is needed.
COPY pyproject.toml /tmp/dmoe/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/dmoe/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/dmoe/requirements.txt \
 && python -m pip install -r /tmp/dmoe/requirements.txt \
 && rm -r /tmp/dmoe

# The dmoe wheel, built from the source in a stage of its own (as in node.Dockerfile).
FROM python-env AS wheel
COPY pyproject.toml setup.py README.md /src/
COPY dmoe /src/dmoe
COPY node /src/node
COPY coordinator /src/coordinator
RUN python -m pip wheel --no-deps --wheel-dir /wheel /src \
 && sha256sum /wheel/*.whl > /wheel.sha256

# The image: the wheel installed (its checksum copied first, so that a new wheel makes a new layer), then
# a check that it imports and that torch is still the base image's CUDA build.
FROM python-env
COPY --from=wheel /wheel.sha256 /opt/dmoe-wheel.sha256
RUN --mount=type=bind,from=wheel,source=/wheel,target=/wheel \
    python -m pip install /wheel/*.whl \
 && python -c "import torch, dmoe.cli; assert torch.version.cuda, torch.__version__"

# A user of its own with uid 1000, like the CPU image (an Ubuntu base may already have one: replaced).
# /data holds the checkpoints and the DHT identity; /shared is where compose.yaml mounts the coordinator's
# ready file.
RUN existing="$(id -nu 1000 2>/dev/null || true)" \
 && if [ -n "$existing" ]; then userdel --remove "$existing"; fi \
 && useradd --uid 1000 --create-home dmoe \
 && mkdir -p /data /shared \
 && chown dmoe:dmoe /data /shared
# numeric, so that a runtime can tell it is not root (Kubernetes' runAsNonRoot)
USER 1000
WORKDIR /data
VOLUME ["/data"]

# The container's settings as environment, not as the command (see node.Dockerfile). --device stays at
# its default, auto: the GPU when the container has one (--gpus), else the CPU; give --device cuda to
# refuse to start without one.
ENV DMOE_NODE_HOST=0.0.0.0 \
    DMOE_NODE_PORT=31340 \
    DMOE_NODE_DHT_PORT=31341 \
    DMOE_NODE_CHECKPOINT_DIR=/data/checkpoints \
    DMOE_NODE_IDENTITY_PATH=/data/identity.key
# gRPC (expert calls), libp2p (DHT)
EXPOSE 31340 31341

# The node's standard gRPC health service, on the port from DMOE_NODE_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('DMOE_NODE_PORT', '31340')); status = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=4).status; raise SystemExit(status != h.HealthCheckResponse.SERVING)"]

# Exec form: dmoe itself gets the SIGTERM of `docker stop`, the libp2p daemon it started does not (see
# node.Dockerfile).
ENTRYPOINT ["dmoe"]
CMD ["node", "start"]
