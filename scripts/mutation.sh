#!/usr/bin/env bash
# Mutation testing of the modules where a silent bug costs most (the wire format, uid patterns, gating
# and routing, the dispatcher's quorum, the node's request checks and limits, auth, pooled storage)
# against their fast unit tests: a table of mutants killed and survived per module, and JSON in
# benchmarks/results/.
# Not part of the test command: a full run takes over an hour on two cores (--sample 150: about 40 min).
# docs/mutation.md has the scores and the surviving mutants judged equivalent.
#
#   bash scripts/mutation.sh                      # every module (names: see MODULES in scripts/mutation.py)
#   bash scripts/mutation.sh uids guard           # some of them
#   bash scripts/mutation.sh --again wire         # the last run's survivors again, with the tests as they are now
#   bash scripts/mutation.sh --survivors --diff   # what survived, as diffs
#
# cosmic-ray is installed here into .venv, pinned, rather than listed in pyproject.toml's extras: it is
# needed by this script only, not by the test command or any user.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$root/.venv/bin/python" ] || bash "$root/scripts/setup.sh"
if ! "$root/.venv/bin/cosmic-ray" --version 2>/dev/null | grep -q ' 8\.7\.0$'; then
  "$root/.venv/bin/python" -m pip install -q 'cosmic-ray==8.7.0'
fi
cd "$root"
# Low priority: the mutants run one after another on a machine others share.
exec nice -n 15 .venv/bin/python scripts/mutation.py "$@"
