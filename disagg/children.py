"""Processes the stack starts end when it ends: each child gets a parent-death signal, so a
crash or SIGKILL of the process that started it (which runs no cleanup) still stops it."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. Linux only; elsewhere the child outlives a crash.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start_child(cmd: list[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen` for a child that must not outlive this process: in its own session (a
    terminal's Ctrl-C reaches only us, and we stop it in order), and SIGTERM when we die. The
    signal follows the thread that starts the child: start children from a thread that lives as
    long as they should."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **popen)


def stop_child(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; waits for the exit."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
