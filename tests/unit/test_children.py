"""Processes the stack starts end with it: the guard over a root ends what the root started when
the root ends however it ends (SIGKILL included), ends orphans at once, unlinks their shared
memory and removes the root's paths; `supervise` turns signals into one SIGTERM to its child and
ends what the child left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from disagg.children import ProcessId, Watch, descendants, end_processes, identify, is_alive, supervise

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

REPO = Path(__file__).resolve().parents[2]

# A root that starts a guard over itself, then a child holding a grandchild, prints their pids
# and waits (for stdin to close: then it finishes its guard, as a worker's stop does).
ROOT = textwrap.dedent("""
    import os, subprocess, sys, time
    from disagg.children import Guard
    guard = Guard.start(remove=sys.argv[1:], interval_s=0.2)
    child = subprocess.Popen([sys.executable, "-c", '''
    import mmap, os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as vLLM's engine core was seen to
    name = f"disagg-test-{os.getpid()}"  # a POSIX shared-memory segment, as shm_open makes it
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    segment = mmap.mmap(fd, 4096)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(grandchild.pid, name, flush=True)
    time.sleep(600)
    '''], stdout=subprocess.PIPE, text=True)
    grandchild, shm = child.stdout.readline().split()
    print(child.pid, grandchild, shm, flush=True)
    sys.stdin.read()
    print("finished", guard.finish(), flush=True)
""")


def start_root(tmp_path: Path) -> tuple[subprocess.Popen, list[ProcessId], Path, str]:
    removed = tmp_path / "runtime"
    removed.mkdir()
    (removed / "socket").write_text("")
    # In a group of its own, as a Ray worker is.
    root = subprocess.Popen([sys.executable, "-c", ROOT, str(removed)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            start_new_session=True)
    child, grandchild, shm = root.stdout.readline().split()
    processes = [identify(int(child)), identify(int(grandchild))]
    assert all(processes)
    return root, processes, removed, shm


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_root_killed_by_sigkill_leaves_nothing_running_and_no_files(tmp_path) -> None:
    root, processes, removed, shm = start_root(tmp_path)
    assert Path(f"/dev/shm/{shm}").exists()
    root.kill()
    root.wait()
    # SIGTERM ignored: SIGKILL after the guard's grace period.
    assert wait_until(lambda: not any(is_alive(p) for p in processes), 10)
    assert wait_until(lambda: not removed.exists(), 5)
    assert not Path(f"/dev/shm/{shm}").exists()


def test_finish_ends_what_is_left_and_reports_it_ended(tmp_path) -> None:
    root, processes, removed, _ = start_root(tmp_path)
    root.stdin.close()
    assert root.stdout.readline().split() == ["finished", "True"]
    assert root.wait(10) == 0
    assert not any(is_alive(p) for p in processes)
    assert not removed.exists()


def test_an_orphan_is_ended_while_the_root_runs(tmp_path) -> None:
    root, (child, grandchild), removed, _ = start_root(tmp_path)
    try:
        time.sleep(1)  # the guard (every 0.2 s here) has seen the grandchild
        os.kill(child.pid, signal.SIGKILL)  # the grandchild's parent dies: it is an orphan now
        assert wait_until(lambda: not is_alive(grandchild), 10)
        assert root.poll() is None and removed.exists()
    finally:
        root.kill()
        root.wait()


def test_a_pid_with_another_start_time_is_not_the_same_process() -> None:
    me = identify(os.getpid())
    assert me is not None and is_alive(me)
    assert not is_alive(ProcessId(me.pid, me.start + 1))
    assert end_processes([ProcessId(me.pid, me.start + 1)]) == []  # and is never signalled


def test_the_watch_keeps_what_it_saw_after_the_parent_died() -> None:
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(p.pid, flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = identify(int(parent.stdout.readline()))
    watch = Watch(identify(parent.pid))
    assert watch.observe() == [] and child in watch.alive()
    parent.kill()
    parent.wait()
    assert wait_until(lambda: child not in descendants(parent.pid))
    assert watch.observe() == []  # the root is gone: nothing "escapes" any more, all is left
    assert watch.finish() == []
    assert not is_alive(child)


SUPERVISED = textwrap.dedent("""
    import signal, subprocess, sys, time
    stubborn = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    stubborn.stdout.readline()
    print(stubborn.pid, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops at once, leaving `stubborn`
    time.sleep(600)
""")


def test_supervise_turns_a_signal_into_one_sigterm_and_ends_what_the_child_left(tmp_path) -> None:
    out = tmp_path / "out"
    removed = tmp_path / "runtime"
    removed.mkdir()
    supervisor = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from disagg.children import supervise
        result = supervise([sys.executable, "-c", {SUPERVISED!r}], remove=[{str(removed)!r}], stop_s=10)
        print("result", result.returncode, result.stop_requested, len(result.left), flush=True)
    """)], cwd=REPO, stdout=open(out, "w"), env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    assert wait_until(lambda: len(out.read_text().split()) >= 1, 30)
    stubborn = identify(int(out.read_text().split()[0]))
    os.killpg(supervisor.pid, signal.SIGTERM)  # the group: only the supervisor is in it
    assert supervisor.wait(20) == 0
    assert out.read_text().split()[1:] == ["result", "0", "True", "0"]
    assert not is_alive(stubborn)
    assert not removed.exists()


def test_supervise_cleans_up_after_a_child_that_crashed(tmp_path) -> None:
    cmd = [sys.executable, "-c", "import os, subprocess, sys, time;"
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
           "print(p.pid, flush=True); time.sleep(0.5); os.kill(os.getpid(), 9)"]
    removed = tmp_path / "runtime"
    removed.mkdir()
    started = time.monotonic()
    result = supervise(cmd, remove=[str(removed)], interval_s=0.1)
    assert result.returncode == -signal.SIGKILL and not result.stop_requested and result.left == []
    assert not removed.exists()
    assert time.monotonic() - started < 10
