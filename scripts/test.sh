#!/usr/bin/env bash
# Runs the whole test suite (unit + integration with real nodes and DHT peers on 127.0.0.1).
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
exec .venv/bin/python -m pytest "$@"
