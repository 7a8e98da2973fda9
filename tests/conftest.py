"""Suite-wide set-up. Kernel tests run Triton under its CPU interpreter; the variable must be set
before triton is first imported anywhere in the process."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GENQ_WEBHOOK_ALLOW_PRIVATE", "1")
