"""Rules about the code's shape, checked by the tools that state them in pyproject.toml: the import
contracts (import-linter) and "configuration comes from app.infra.settings alone" (ruff's TID251)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent   # the tools of the venv running the tests


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_import_contracts_are_kept():
    result = _run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_settings_read_the_environment():
    result = _run(str(BIN / "ruff"), "check", "--select", "TID251", "app", "worker", "kernels")
    assert result.returncode == 0, result.stdout + result.stderr
