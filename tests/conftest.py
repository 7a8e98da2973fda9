"""Suite-wide set-up.

- Kernel tests run Triton under its CPU interpreter; the variable must be set before triton is
  first imported anywhere in the process.
- One intra-op thread per process: the suite runs an API, workers and the test process side by
  side on a 2-core machine, and OpenMP threads spinning against each other make small tensor ops
  tens of times slower. Subprocesses inherit the variable.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GENQ_WEBHOOK_ALLOW_PRIVATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
