"""Stopping a child process that leads its own process group (started with start_new_session):
`genq up`'s API and worker, and the servers the benchmarks start."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def terminate_group(child: subprocess.Popen, timeout: float = 20.0) -> bool:
    """SIGTERM to the child's process group, SIGKILL after `timeout`; then SIGKILL to whatever it left
    in its group, while its pid (the group's id) is still its own: exited but not yet reaped. Reaps
    the child. Returns whether it exited on SIGTERM (True also when it had exited before)."""
    if child.returncode is not None:
        return True
    signal_group(child.pid, signal.SIGTERM)
    graceful = exited(child, timeout)
    if not graceful:
        signal_group(child.pid, signal.SIGKILL)
        exited(child, timeout)
    if child.returncode is None:
        signal_group(child.pid, signal.SIGKILL)
    child.wait()
    return graceful


def exited(child: subprocess.Popen, timeout: float) -> bool:
    """Whether the child exits within `timeout` seconds; an exited child is left unreaped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:   # reaped already
            child.poll()
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(children: list[subprocess.Popen], timeout: float = 60.0) -> None:
    """SIGTERM to every child still running, then wait for each, SIGKILL to one that outlives `timeout`."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
