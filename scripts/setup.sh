#!/usr/bin/env bash
# Creates .venv in the repository and installs dmoe into it (idempotent; quick when nothing changed).
# torch is pinned to 2.13.0 first, which installs the CPU build this machine carries, before the
# package's own range (torch>=2.1) could pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.dmoe-setup-$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (torch, hivemind, grpc; a minute or two the first time)..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.dmoe-setup-*
  touch "$stamp"
fi
