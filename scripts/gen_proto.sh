#!/usr/bin/env bash
# Regenerates the Python modules of the wire format from proto/ into OUT (default: the repo root,
# which writes dmoe/proto/*). tests/unit/core/test_proto.py runs it into a temp dir and compares.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here}"
python -m grpc_tools.protoc -I"$here/proto" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here"/proto/dmoe/proto/*.proto
