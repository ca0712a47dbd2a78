import os

# Keep torch to the cores CI has; nodes started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# As the dmoe CLI does: with gRPC's fork support on, relayed connections in a process that also runs
# gRPC were cut (tests fork nodes while relays and gRPC channels share this process).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# Fixtures that start real nodes, coordinators and DHT peers (tests/support/swarm_fixtures.py; tests/support
# is on the path by pytest's pythonpath option), for tests/integration and tests/lab alike.
pytest_plugins = ["swarm_fixtures"]
