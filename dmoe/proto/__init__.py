"""Generated protobuf/gRPC modules of ``proto/dmoe/proto/*.proto``; never edit them by hand.

Regenerate with ``scripts/gen_proto.sh``; tests/unit/core/test_proto.py checks they match.
"""
