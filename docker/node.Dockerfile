# syntax=docker/dockerfile:1
# A dmoe node on the CPU. Build from the repository root (the build context):
#   docker build -f docker/node.Dockerfile -t dmoe-node .
# Run one (docker/README.md has the rest):
#   docker run -d --init --network host -v dmoe-node:/data -e DMOE_NODE_ANNOUNCE_HOST=<address others dial> \
#       dmoe-node node start --swarm <swarm address> --experts 'ffn.[0:8]'
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, the CPU build from PyTorch's index: the package's own range (torch>=2.1) is then
# satisfied, where on its own it would pull the CUDA build of several GB from PyPI.
RUN python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The dependencies alone, read from pyproject.toml, in a layer of their own: a change to the code does
# not reinstall them. hivemind's wheel carries its libp2p daemon, so no Go toolchain is needed.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The package, built from the context mounted for this step only (no copy of the source stays in the
# image); then a check that it imports and that torch is still the CPU build.
RUN --mount=type=bind,target=/src,rw \
    python -m pip install --no-cache-dir /src \
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

# Exec form: dmoe itself gets the SIGTERM of `docker stop` (as PID 1, or as tini's child with --init),
# and the libp2p daemon it started does not, so the node withdraws its DHT records, finishes in-flight
# calls and checkpoints before it exits.
ENTRYPOINT ["dmoe"]
CMD ["node", "start"]
