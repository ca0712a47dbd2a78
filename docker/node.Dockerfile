# syntax=docker/dockerfile:1
# A dmoe node on the CPU. Build from the repository root (the build context):
#   docker build -f docker/node.Dockerfile -t dmoe-node .
# Run one (docker/README.md has the rest):
#   docker run -d --init --network host -v dmoe-node:/data -e DMOE_NODE_ANNOUNCE_HOST=<address others dial> \
#       dmoe-node node start --swarm <swarm address>
#
# Build arguments (the defaults build on a machine that reaches Docker Hub and PyTorch's index):
#   BASE         an image with Python 3.11 and its venv module: python:3.11-slim, or one made from Debian's
#                packages where no registry is reachable (docker/check.sh makes one)
#   TORCH_INDEX  the index that has the CPU build of torch; "" for none, when pip's configuration in the
#                build finds the wheel elsewhere (docker/check.sh mounts a pip.conf with find-links)
#
# The steps up to the user are the same lines as in coordinator.Dockerfile, on purpose: the build cache
# then makes them one set of layers, built once and stored once for both images. Keep the two in step.
ARG BASE=python:3.11-slim

# ---- Python, torch and dmoe's dependencies, in a virtual environment of its own -----------------------
FROM ${BASE} AS python-env

# The venv keeps pip away from the base's own packages (Debian's Python refuses pip installs into it).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/dmoe \
    PATH=/opt/dmoe/bin:$PATH
RUN python3 -m venv /opt/dmoe

# torch first, the CPU build (2.13.0+cpu): the package's own range (torch>=2.1) is then satisfied, where on
# its own it would pull the CUDA build of several GB from PyPI. Its dependencies come from PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m pip install "torch==2.13.0+cpu" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}

# The dependencies alone, read from pyproject.toml, in a layer of their own: a change to the code does
# not reinstall them. hivemind's wheel carries its libp2p daemon, so no Go toolchain is needed.
COPY pyproject.toml /tmp/dmoe/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/dmoe/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/dmoe/requirements.txt \
 && python -m pip install -r /tmp/dmoe/requirements.txt \
 && rm -r /tmp/dmoe

# ---- the dmoe wheel, built from the source (which stays in this stage) --------------------------------
FROM python-env AS wheel
COPY pyproject.toml setup.py README.md /src/
COPY dmoe /src/dmoe
COPY node /src/node
COPY coordinator /src/coordinator
RUN python -m pip wheel --no-deps --wheel-dir /wheel /src \
 && sha256sum /wheel/*.whl > /wheel.sha256

# ---- the image -----------------------------------------------------------------------------------------
FROM python-env
# The wheel's checksum is copied first so that a new wheel also makes a new install layer (podman's
# cache does not look into the files a RUN mounts); the wheel itself is only mounted.
COPY --from=wheel /wheel.sha256 /opt/dmoe/dmoe-wheel.sha256
RUN --mount=type=bind,from=wheel,source=/wheel,target=/wheel \
    python -m pip install /wheel/*.whl \
 && python -c "import torch, dmoe.cli; assert torch.version.cuda is None, torch.__version__"

# A user of its own (uid 1000, as on most desktops, for bind mounts); /data holds the checkpoints and the
# DHT identity; /shared is where compose.yaml mounts the coordinator's ready file.
RUN useradd --uid 1000 --create-home dmoe \
 && mkdir -p /data /shared \
 && chown dmoe:dmoe /data /shared
# numeric, so that a runtime can tell it is not root (Kubernetes' runAsNonRoot)
USER 1000
WORKDIR /data
VOLUME ["/data"]

# The container's settings as environment, not as the command: a `docker run IMAGE node start ...`
# replaces the command whole, the environment stays, and an option on the command line still wins.
# Listening on 0.0.0.0 needs --announce-host (or DMOE_NODE_ANNOUNCE_HOST): the address others dial.
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

# Exec form: dmoe itself gets the SIGTERM of `docker stop` (as PID 1, or as the init's child with
# --init), and the libp2p daemon it started does not, so the node withdraws its DHT records, finishes
# in-flight calls and checkpoints before it exits.
ENTRYPOINT ["dmoe"]
CMD ["node", "start"]
