"""The `genq` command: run the service (`up`, `api`, `worker`, `migrate`), use it (`submit`, `jobs`,
`batch`) and manage its API keys (`keys`)."""
from __future__ import annotations

import argparse
import sys

from app.cli import batch, jobs, keys, service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genq", description="Asynchronous LLM generation jobs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (service, jobs, batch, keys):
        module.add_commands(commands)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
