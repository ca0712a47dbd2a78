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
# A worker that dies (a crash in native code) is not replaced: pytest-xdist's --dist loadfile hangs
# at the session's end after replacing one, so the crash is reported and the run ends instead.
# The whole run has a deadline too (the suite takes about 11 minutes on two cores): a hang that no
# test's own timeout catches fails the run with exit status 124 rather than stalling it.
# (At a terminal the run stays in its foreground process group, so that Ctrl-C reaches pytest.)
status=0
foreground=""; [ -t 0 ] && foreground="--foreground"
timeout $foreground --kill-after=60 "${DMOE_TEST_DEADLINE_S:-2700}" \
  .venv/bin/python -m pytest -n 2 --dist loadfile --max-worker-restart=0 "$@" || status=$?
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "the test run passed its deadline of ${DMOE_TEST_DEADLINE_S:-2700}s and was stopped" >&2
fi
exit "$status"
