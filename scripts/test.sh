#!/usr/bin/env bash
# Runs the whole test suite (unit + integration with real nodes and DHT peers on 127.0.0.1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
