"""Session-wide test settings.

.ci/run spreads the suite over the machine's cores with pytest-xdist (one worker per core). Each worker then
computes on one thread, and so does every command it launches: two busy threads on one core run many times
slower than one, and the golden and determinism tests were pinned at one thread where they pin a count at all.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
