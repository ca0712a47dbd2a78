import os

# Keep torch to the cores CI has; nodes started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "2")
