#!/usr/bin/env bash
# Builds the node and coordinator images with podman, starts the swarm of docker/compose.yaml (a
# coordinator that publishes docker/model.toml, two nodes started with only --swarm), trains the model
# through it, stops it gracefully and removes its containers and volumes. Prints the image sizes, the
# start-up times and the training's result; exits non-zero at the first thing that fails.
#
#   sudo docker/check.sh          # takes minutes (the first build installs torch); not part of the tests
#
# Runs as root (apt-get, rootful podman) on Debian, with no image registry needed: what it lacks it
# installs from Debian's packages (podman, runc, mmdebstrap) and PyPI (podman-compose, in a venv of its
# own). The base image is made from Debian's packages of this machine's release (mmdebstrap, then
# `podman import`) and given to the Dockerfiles as BASE; the torch wheel (the CPU build) comes from pip's
# configuration on this machine, or else from PyTorch's index. Everything listens on 127.0.0.1.
#
# Environment:
#   DMOE_CHECK_WORK   folder for the state it keeps (base image tarball, configuration, logs)
#                     [default: /var/tmp/dmoe-container-check]
#   DMOE_CHECK_REF    build from this commit (git archive) instead of the working tree, e.g. HEAD
#   DMOE_CHECK_STEPS  training steps [default: 30]
#   DMOE_CHECK_KEEP   1: leave the swarm's containers and volumes in place at the end (for a look)
#   DMOE_CHECK_BASE   an image to use as the base instead of making one (e.g. python:3.11-slim)
#   DMOE_CHECK_MIRROR Debian mirror for the base image [default: http://deb.debian.org]
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="${DMOE_CHECK_WORK:-/var/tmp/dmoe-container-check}"
steps="${DMOE_CHECK_STEPS:-30}"
mirror="${DMOE_CHECK_MIRROR:-http://deb.debian.org}"
project=dmoe-check # the compose project: containers dmoe-check_node1_1 ..., volumes dmoe-check_...
ports=(31337 8000 31340 31341 31342 31343) # compose.yaml's: coordinator DHT and dashboard, node1, node2

say() { printf '[check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; } # to stderr: it may run inside $(...)
now() { date +%s.%N; }
seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

[ "$(id -u)" = 0 ] || fail "run as root (apt-get and rootful podman): sudo $0"
load_at_start=$(cut -d' ' -f1 /proc/loadavg) # the timings below depend on what else runs
mkdir -p "$work/logs" "$work/build/wheels"
log="$work/logs"

# ---- tools -----------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
[ -x /usr/sbin/runc ] || missing+=(runc)
[ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit) # the init of --init / init: true
command -v mmdebstrap >/dev/null || [ -n "${DMOE_CHECK_BASE:-}" ] || missing+=(mmdebstrap)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (apt-get)"
  apt-get update >"$log/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >>"$log/apt.log" 2>&1 \
    || fail "apt-get install ${missing[*]} (see $log/apt.log)"
fi

# Configuration of its own, not the machine's: no default ulimits (the container may not raise them
# here), cgroups managed by podman itself (no systemd), and runc (crun refuses this machine's cgroups).
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"

[engine.runtimes]
runc = ["/usr/sbin/runc"]
EOF
export CONTAINERS_CONF="$work/containers.conf"
podman=(podman --runtime /usr/sbin/runc)

# podman-compose from PyPI (Debian's 1.0.3 puts host-network containers on a second network and fails)
compose_venv="$work/podman-compose"
if ! "$compose_venv/bin/podman-compose" --version >/dev/null 2>&1; then
  say "installing podman-compose (pip, in $compose_venv)"
  python3 -m venv "$compose_venv"
  "$compose_venv/bin/pip" install -q "podman-compose==1.6.0" >"$log/pip.log" 2>&1 \
    || fail "pip install podman-compose (see $log/pip.log)"
fi

# ---- the source --------------------------------------------------------------------------------------
if [ -n "${DMOE_CHECK_REF:-}" ]; then
  src="$work/source"
  rm -rf "$src" && mkdir -p "$src"
  git -C "$root" archive "$DMOE_CHECK_REF" | tar -x -C "$src"
  say "building from $DMOE_CHECK_REF ($(git -C "$root" rev-parse --short "$DMOE_CHECK_REF"))"
else
  src="$root"
  say "building from the working tree $root"
fi
compose=("$compose_venv/bin/podman-compose" --podman-args="--runtime /usr/sbin/runc" -p "$project"
         -f "$src/docker/compose.yaml")

# ---- the base image, from Debian's packages --------------------------------------------------------------
if [ -n "${DMOE_CHECK_BASE:-}" ]; then
  base="$DMOE_CHECK_BASE"
else
  . /etc/os-release
  release="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release: this script needs Debian}"
  base="localhost/dmoe-base:$release"
  if ! "${podman[@]}" image exists "$base"; then
    say "making the base image $base (mmdebstrap: Debian $release, python3, python3-venv)"
    started=$(now)
    rm -f "$work/base.tar"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      "$release" "$work/base.tar" \
      "deb $mirror/debian $release main" "deb $mirror/debian $release-updates main" \
      "deb $mirror/debian-security $release-security main" >"$log/mmdebstrap.log" 2>&1 \
      || fail "mmdebstrap (see $log/mmdebstrap.log)"
    "${podman[@]}" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$work/base.tar" "$base" \
      >"$log/import.log" 2>&1 || fail "podman import (see $log/import.log)"
    rm -f "$work/base.tar"
    say "base image made in $(seconds "$started" "$(now)") s"
  fi
fi

# ---- pip inside the builds: this machine's certificate authorities, and the torch wheel ------------------
pyver=$("${podman[@]}" run --rm --network none "$base" python3 -c \
  'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') || fail "no python3 in $base"
torch_index=https://download.pytorch.org/whl/cpu
if ls "$work/build/wheels/"torch-2.13.0+cpu-cp"${pyver/./}"-*.whl >/dev/null 2>&1 \
   || "$compose_venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version "$pyver" \
        --platform manylinux_2_28_x86_64 --dest "$work/build/wheels" "torch==2.13.0+cpu" >"$log/torch.log" 2>&1
then
  torch_index="" # the wheel is at hand: no need for PyTorch's index
else
  say "no torch 2.13.0+cpu wheel through this machine's pip configuration: the build uses $torch_index"
fi
{
  echo "[global]"
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$work/build/ca.crt" \
    && echo "cert = /etc/dmoe-build/ca.crt"
  echo "find-links = /etc/dmoe-build/wheels"
} >"$work/build/pip.conf"

# ---- the images -------------------------------------------------------------------------------------------
build() { # NAME: docker/NAME.Dockerfile -> localhost/dmoe-NAME
  local name="$1" started
  started=$(now)
  say "building dmoe-$name (log: $log/build-$name.log)"
  "${podman[@]}" build --format docker --network host \
    -v "$work/build:/etc/dmoe-build:ro" -v "$work/build/pip.conf:/etc/pip.conf:ro" \
    --build-arg BASE="$base" --build-arg TORCH_INDEX="$torch_index" \
    --ignorefile "$src/docker/$name.Dockerfile.dockerignore" -f "$src/docker/$name.Dockerfile" \
    -t "localhost/dmoe-$name" "$src" >"$log/build-$name.log" 2>&1 \
    || { tail -20 "$log/build-$name.log"; fail "building dmoe-$name (see $log/build-$name.log)"; }
  build_seconds[$name]=$(seconds "$started" "$(now)")
}
declare -A build_seconds
build node
build coordinator
# images that the new ones replaced, and the wheel stage's (a dependency change would otherwise leave
# hundreds of MB behind at each build)
"${podman[@]}" image prune -f >/dev/null

# ---- the swarm --------------------------------------------------------------------------------------------
cleanup() {
  if [ "${DMOE_CHECK_KEEP:-0}" = 1 ]; then
    say "left in place (DMOE_CHECK_KEEP=1); remove with: CONTAINERS_CONF=$CONTAINERS_CONF ${compose[*]} --profile client down -v"
  else
    "${compose[@]}" --profile client down -v -t 40 >>"$log/compose.log" 2>&1 || true
  fi
}
"${compose[@]}" --profile client down -v >"$log/compose.log" 2>&1 || true # a run left before
trap cleanup EXIT
for port in "${ports[@]}"; do
  if [ -n "$(ss -Hltn "sport = :$port")" ]; then fail "port $port on this host is taken (compose.yaml's ports)"; fi
done

# file_time CONTAINER PATH: when PATH was written inside CONTAINER (epoch seconds), or nothing yet
file_time() { "${podman[@]}" exec "$1" stat -c %.Y "$2" 2>/dev/null || true; }
# wait_file CONTAINER PATH SECONDS: wait until PATH exists in CONTAINER; prints its time
wait_file() {
  local deadline=$((SECONDS + $3)) written
  while [ $SECONDS -lt $deadline ]; do
    written=$(file_time "$1" "$2")
    if [ -n "$written" ]; then echo "$written"; return 0; fi
    if [ "$("${podman[@]}" inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" != true ]; then
      "${podman[@]}" logs "$1" 2>&1 | grep -v systemd | tail -20 >&2
      fail "$1 exited before it was ready"
    fi
    sleep 0.5
  done
  "${podman[@]}" logs "$1" 2>&1 | grep -v systemd | tail -20 >&2
  fail "$1 not ready after $3 s"
}
started_at() { # the time the container's process started (epoch seconds)
  python3 -c "import datetime, sys; t = sys.argv[1].split(); \
print(datetime.datetime.fromisoformat(t[0] + 'T' + t[1][:15] + t[2][:3] + ':' + t[2][3:]).timestamp())" \
    "$("${podman[@]}" inspect --format '{{.State.StartedAt}}' "$1")"
}
healthy() { "${podman[@]}" healthcheck run "$1" >/dev/null 2>&1 || fail "the image's health check fails in $1"; }

coordinator=${project}_coordinator_1
say "starting the coordinator (--model docker/model.toml)"
up_at=$(now)
"${compose[@]}" up -d --no-build coordinator >>"$log/compose.log" 2>&1 || fail "compose up coordinator (see $log/compose.log)"
ready=$(wait_file "$coordinator" /shared/coordinator.json 120)
coordinator_up=$(seconds "$up_at" "$ready")
coordinator_run=$(seconds "$(started_at "$coordinator")" "$ready")
healthy "$coordinator"
"${podman[@]}" logs "$coordinator" >"$log/coordinator.log" 2>&1
grep -q "published model 'lm'" "$log/coordinator.log" || fail "the coordinator published no model"
say "coordinator ready ${coordinator_up} s after compose up (${coordinator_run} s after its process started)"

say "starting node1 and node2 (node start --swarm ADDR, nothing else)"
up_at=$(now)
"${compose[@]}" up -d --no-build --no-deps node1 node2 >>"$log/compose.log" 2>&1 || fail "compose up nodes (see $log/compose.log)"
declare -A node_up node_run
for node in node1 node2; do
  container=${project}_${node}_1
  ready=$(wait_file "$container" /tmp/dmoe-ready.json 300)
  node_up[$node]=$(seconds "$up_at" "$ready")
  node_run[$node]=$(seconds "$(started_at "$container")" "$ready")
  experts=$("${podman[@]}" exec "$container" python -c \
    "import json; print(len(json.load(open('/tmp/dmoe-ready.json'))['experts']))")
  "${podman[@]}" logs "$container" >"$log/$node.log" 2>&1
  grep -q "following model 'lm'" "$log/$node.log" || fail "$node did not follow the model (log: $log/$node.log)"
  [ "$experts" -gt 0 ] || fail "$node serves no expert"
  healthy "$container"
  say "$node serving $experts experts of model 'lm', ready ${node_up[$node]} s after compose up" \
      "(${node_run[$node]} s after its process started)"
done

say "training $steps steps through the swarm (compose run client; log: $log/train.log)"
started=$(now)
timeout 1200 "${compose[@]}" --profile client run -T --rm --no-deps -e COLUMNS=160 client \
  train --steps "$steps" --eval-interval 0 --batch-size 8 >"$log/train.log" 2>&1 \
  || { grep -v systemd "$log/train.log" | tail -20; fail "training (see $log/train.log)"; }
train_seconds=$(seconds "$started" "$(now)")
first=$(grep -o 'step 0: held-out loss [0-9.]*' "$log/train.log" | grep -o '[0-9.]*$' || true)
done_line=$(grep -o "done: $steps steps, held-out loss [0-9.]*" "$log/train.log" || true)
[ -n "$done_line" ] || { tail -20 "$log/train.log"; fail "training did not finish $steps steps"; }
last=${done_line##* }
failed_calls=$(grep -o 'failed calls [0-9]*' "$log/train.log" | tail -1 | grep -o '[0-9]*$' || echo "?")
say "trained: held-out loss $first -> $last nats/byte in ${train_seconds} s (failed calls at the end: $failed_calls)"

# The nodes' calls, as the coordinator's dashboard reports them (their records refresh every 10 s).
calls=$(python3 - <<'EOF'
import json, time, urllib.request
deadline, nodes = time.monotonic() + 60, []
while time.monotonic() < deadline:
    nodes = json.load(urllib.request.urlopen("http://127.0.0.1:8000/api/swarm", timeout=5))["nodes"]
    if len(nodes) == 2 and sum(node["calls"] for node in nodes) > 0:
        break
    time.sleep(2)
print(" ".join(f"{node['endpoint']}={node['calls']}" for node in sorted(nodes, key=lambda n: n["endpoint"])))
EOF
)
say "calls served per node (dashboard): $calls"
case "$calls" in *=[1-9]*) ;; *) fail "the dashboard shows no calls served";; esac

# ---- graceful stop: nodes first (they withdraw their records through the DHT), then the coordinator ---
say "stopping the nodes (SIGTERM)"
started=$(now)
"${compose[@]}" stop node1 node2 >>"$log/compose.log" 2>&1 || fail "compose stop nodes"
stop_nodes=$(seconds "$started" "$(now)")
for node in node1 node2; do
  container=${project}_${node}_1
  code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$container")
  "${podman[@]}" logs "$container" >"$log/$node.log" 2>&1
  [ "$code" = 0 ] || fail "$node exited with $code (log: $log/$node.log)"
  grep -q "stopping: withdrawing records" "$log/$node.log" && grep -q "node stopped" "$log/$node.log" \
    || fail "$node did not log a graceful stop (log: $log/$node.log)"
done
started=$(now)
"${compose[@]}" stop coordinator >>"$log/compose.log" 2>&1 || fail "compose stop coordinator"
stop_coordinator=$(seconds "$started" "$(now)")
"${podman[@]}" logs "$coordinator" >"$log/coordinator.log" 2>&1
[ "$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$coordinator")" = 0 ] \
  && grep -q "coordinator stopped" "$log/coordinator.log" || fail "the coordinator did not stop cleanly"
say "stopped gracefully: nodes in ${stop_nodes} s (both exit 0, records withdrawn, checkpoints written)," \
    "coordinator in ${stop_coordinator} s"

# ---- summary ----------------------------------------------------------------------------------------------
echo
echo "images (podman image ls):"
"${podman[@]}" image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "dmoe-(node|coordinator):latest|$(basename "${base%%:*}")" || true
echo "layers of dmoe-node (podman history; dmoe-coordinator has the same layers, other settings):"
"${podman[@]}" history --format '  {{.Size}}\t{{.CreatedBy}}' localhost/dmoe-node \
  | grep -v -E '^  0 ?B' | cut -c1-100 || true
echo "build: dmoe-node ${build_seconds[node]} s, dmoe-coordinator ${build_seconds[coordinator]} s (cached layers reused)"
echo "start-up, compose up -> ready file (process start -> ready file):"
echo "  coordinator ${coordinator_up} s (${coordinator_run} s)"
for node in node1 node2; do echo "  $node ${node_up[$node]} s (${node_run[$node]} s)"; done
echo "training: $steps steps, held-out loss $first -> $last nats/byte, ${train_seconds} s (compose run included)"
echo "stop: nodes ${stop_nodes} s, coordinator ${stop_coordinator} s"
echo "load average (1 min) on this host: $load_at_start at the start, $(cut -d' ' -f1 /proc/loadavg) at the end ($(nproc) cores)"
echo "OK"
