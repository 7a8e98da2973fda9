"""`python -m worker` (what `genq worker` and `genq up` run): settings from the environment, the
command line's concurrency and log level on top, then the worker (worker/main.py)."""
import argparse

from app.infra.logs import configure_logging
from app.infra.settings import Settings
from worker.main import run_worker

parser = argparse.ArgumentParser(prog="genq worker", description="Run a Celery worker hosting one engine.")
parser.add_argument("--concurrency", type=int, help="task threads (default: the engine's max_num_seqs)")
parser.add_argument("--loglevel", help="log level (default: GENQ_LOG_LEVEL or INFO)")
args = parser.parse_args()
settings = Settings.from_env(**({"worker_concurrency": args.concurrency} if args.concurrency else {}))
level = (args.loglevel or settings.log_level).upper()
configure_logging(settings, "worker", level)
run_worker(settings, loglevel=level)
