#!/usr/bin/env bash
# The main job: a local swarm on 127.0.0.1 (two nodes) trained through the client, with progress.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python examples/local_swarm.py "$@"
