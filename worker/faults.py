"""TEST ONLY: faults a worker injects into its own engine, named by `GENQ_FAULT_INJECTION`.

Never set it in production. The fault tests (tests/e2e/test_reliability.py) start real worker
processes with it to check that a failing engine step fails its jobs, not the worker.

Forms:
- `step_error:<marker>`: an engine step that schedules a request whose prompt contains `<marker>`
  raises `InjectedFault` before the model runs; the engine fails that step's requests.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    pass


def install_fault(engine, spec: str | None) -> None:
    """Attach the fault named by `spec` to `engine` (nothing when `spec` is empty)."""
    if not spec:
        return
    kind, _, arg = spec.partition(":")
    if kind != "step_error" or not arg:
        raise ValueError(f"unknown GENQ_FAULT_INJECTION {spec!r} (expected 'step_error:<marker>')")
    log.warning("TEST ONLY fault injection enabled: %s", spec)
    engine.step_hook = _step_error(arg)


def _step_error(marker: str):
    def hook(batch) -> None:
        for item in batch.scheduled:
            prompt = item.seq.request.prompt or ""
            if marker in prompt:
                raise InjectedFault(f"injected step fault (prompt marker {marker!r})")
    return hook
