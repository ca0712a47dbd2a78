#!/usr/bin/env bash
# Runs the whole test suite: ruff, the import contracts (pyproject.toml), then pytest (unit, integration with
# real nodes and DHT peers on 127.0.0.1, lab with network namespaces) in two workers.
# The dashboard test drives Debian's headless Chromium: installed here if it is missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the dashboard test..."
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; }
fi
cd "$root"
echo "ruff check..."
.venv/bin/ruff check .
echo "import contracts..."
.venv/bin/python scripts/check_imports.py
# Two workers, each taking whole test files (their module-scoped nodes stay in one process): most of
# a test's time is nodes starting up and records expiring, so two run side by side on two cores.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
