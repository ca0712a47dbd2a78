# syntax=docker/dockerfile:1
# The dmoe coordinator: the swarm's bootstrap DHT peer and its dashboard. Build from the repository root:
#   docker build -f docker/coordinator.Dockerfile -t dmoe-coordinator .
# Run (docker/README.md has the rest):
#   docker run -d --init -p 31337:31337 -p 8000:8000 -v dmoe-coordinator:/data dmoe-coordinator
#
# Build arguments: those of node.Dockerfile (BASE, TORCH_INDEX).
#
# The coordinator imports torch through dmoe, so it needs the same installation as a CPU node. The steps
# up to the user are the same lines as in node.Dockerfile, on purpose: the build cache then makes them
# one set of layers, built once and stored once for both images. Keep the two in step.
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

# The container's settings as environment, not as the command: a `docker run IMAGE coordinator start ...`
# replaces the command whole, the environment stays, and an option on the command line still wins.
# /data/coordinator.key and the fixed DHT port keep the swarm address the same across restarts.
ENV DMOE_COORDINATOR_HOST=0.0.0.0 \
    DMOE_COORDINATOR_DHT_PORT=31337 \
    DMOE_COORDINATOR_HTTP_HOST=0.0.0.0 \
    DMOE_COORDINATOR_HTTP_PORT=8000 \
    DMOE_COORDINATOR_IDENTITY=/data/coordinator.key
# libp2p (the swarm address), HTTP (dashboard, /api/swarm, /metrics, /healthz)
EXPOSE 31337 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DMOE_COORDINATOR_HTTP_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: dmoe itself gets the SIGTERM of `docker stop` and shuts its DHT peer and dashboard down.
ENTRYPOINT ["dmoe"]
CMD ["coordinator", "start"]
