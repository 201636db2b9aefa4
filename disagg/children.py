"""Processes the stack starts end when it ends.

Two mechanisms, for the two ways a parent goes:

- `start_child`: a child in its own process group (a terminal's Ctrl-C or a signal to our
  process group reaches only us, and we stop the child in order) with a parent-death signal
  (SIGTERM when we die, even by SIGKILL, which runs no cleanup). It stays in our session: with
  the kernel's autogroup scheduling each session shares the CPU as one, and nice values count
  only within it. Ray runs its workers (the engines) at nice 15 in the driver's session, so a
  picker or Envoy started here at nice 0 comes first; in a session of its own it got an equal
  share against the busy engines' session (measured: a picker restarted under load ran its
  start-up at about a tenth of a core and took 25 s to over 90 s to get ready).
- `Guard`: a watchdog process over a root process (a worker, `disagg serve`'s driver). It
  records the root's descendants while the root runs; a descendant that leaves the tree (its
  parent died: vLLM's EngineCore and Worker processes of a replica that died) is ended at once,
  and when the root ends, or says it is done, every descendant still alive is ended (SIGTERM,
  SIGKILL after a grace period), the shared-memory segments they had mapped are unlinked and
  the root's temporary paths removed. It learns of the root's end from the pipe the root holds
  closing, so it needs nothing from a root that was SIGKILLed. `Watch` is the same record kept
  in a process of our own (`disagg serve` keeps one over its driver).

Processes are named by pid and start time (`ProcessId`): a pid reused by an unrelated process
is never signalled. Linux only (/proc); elsewhere the watch sees no descendants.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Iterable, NamedTuple

_PR_SET_PDEATHSIG = 1
_SHM = "/dev/shm/"


def _resolve_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the child outlives a crash
        return None


# Looked up here, not in the child: between fork and exec in a process with threads (a Ray
# driver has dozens), a dlopen can wait forever on a lock another thread held at the fork.
_prctl = _resolve_prctl()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _guard_preexec() -> None:
    # The guard's parent-death signal may come before its interpreter has set a handler, whose
    # default would end it unfinished: ignored until then (it learns of the death anyway).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


def start_child(cmd: list[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen` for a child that must not outlive this process: in its own process
    group (a terminal's Ctrl-C reaches only us, and we stop it in order), and SIGTERM when we die. The
    signal follows the thread that starts the child: start children from a thread that lives as
    long as they should."""
    return subprocess.Popen(cmd, process_group=0, preexec_fn=_die_with_parent, **popen)


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


class ProcessId(NamedTuple):
    """A process, told apart from a later one with the same pid by its start time (clock ticks
    after boot, /proc/PID/stat field 22)."""

    pid: int
    start: int


class _Entry(NamedTuple):
    ppid: int
    pgid: int
    start: int
    zombie: bool


def _stat(pid: int) -> _Entry | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return _Entry(ppid=int(fields[1]), pgid=int(fields[2]), start=int(fields[19]), zombie=fields[0] in (b"Z", b"X"))


def process_table() -> dict[int, _Entry]:
    """Every process of this machine (this PID namespace) that is not a zombie."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            entry = _stat(int(name))
            if entry is not None and not entry.zombie:
                table[int(name)] = entry
    return table


def identify(pid: int) -> ProcessId | None:
    entry = _stat(pid)
    return None if entry is None or entry.zombie else ProcessId(pid, entry.start)


def is_alive(process: ProcessId) -> bool:
    entry = _stat(process.pid)
    return entry is not None and not entry.zombie and entry.start == process.start


def descendants(root: int, table: dict[int, _Entry] | None = None) -> list[ProcessId]:
    """The processes below `root` now, parents before their children."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, entry in table.items():
        children.setdefault(entry.ppid, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop(0)
        found.append(ProcessId(pid, table[pid].start))
        todo.extend(children.get(pid, ()))
    return found


def shm_segments(processes: Iterable[ProcessId]) -> set[str]:
    """The /dev/shm files these processes map (vLLM's message queues, torch's shared tensors):
    SIGKILL leaves them behind, holding memory, unless someone unlinks them."""
    paths = set()
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/maps", "rb") as f:
                for line in f:
                    start = line.find(_SHM.encode())
                    if start >= 0:
                        paths.add(line[start:].rstrip(b"\n").removesuffix(b" (deleted)").decode(errors="replace"))
        except OSError:
            continue
    return paths


def _is_guard(process: ProcessId) -> bool:
    try:
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            return os.path.abspath(__file__).encode() in f.read().split(b"\0")
    except OSError:
        return False


def end_processes(processes: Iterable[ProcessId], grace_s: float = 2.0) -> list[ProcessId]:
    """SIGTERM each process, SIGKILL those alive after `grace_s`; returns those still alive two
    seconds after that (none, unless one is stuck in the kernel). Guards among them go last:
    once what they guard has ended they finish by themselves (unlinking what it left), and are
    given the time for it."""
    alive = [p for p in processes if is_alive(p)]
    guards = [p for p in alive if _is_guard(p)]
    left = _signal_until_gone([p for p in alive if p not in guards], grace_s)
    deadline = time.monotonic() + grace_s + 3.0
    while time.monotonic() < deadline and any(is_alive(p) for p in guards):
        time.sleep(0.05)
    return left + _signal_until_gone(guards, grace_s)


def _signal_until_gone(processes: list[ProcessId], grace_s: float) -> list[ProcessId]:
    alive = [p for p in processes if is_alive(p)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for p in alive:
            try:
                os.kill(p.pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if is_alive(p)]
        if not alive:
            break
    return alive


def remove_paths(paths: Iterable[str]) -> None:
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


class Watch:
    """The descendants of `root` seen so far. `observe()` once in a while (each call reads
    /proc: ~6 ms for 150 processes here); `finish()` when the root ended or is done.

    A root that leads its process group (a Ray worker, a child started in its own session) also
    owns the processes left in that group: those started too late to be seen before it died
    are found there."""

    def __init__(self, root: ProcessId, *, exclude: Iterable[int] = (), shm_every: int | None = None,
                 leads_group: bool | None = None) -> None:
        self.root = root
        self.exclude = {os.getpid(), *exclude}
        self.seen: dict[int, ProcessId] = {}
        if leads_group is None:
            entry = _stat(root.pid)
            leads_group = entry is not None and entry.pgid == root.pid
        self.group = root.pid if leads_group else None
        # Shared memory the descendants map, looked up every `shm_every` observations (None:
        # never): a process killed before the end takes its mappings' names with it.
        self.shm_every = shm_every
        self.segments: set[str] = set()
        self._observations = 0

    def observe(self) -> list[ProcessId]:
        """Record the root's descendants; returns those seen before that have left its tree
        while alive (orphans: their parent died). Nothing leaves while the root is gone."""
        table = process_table()
        root = table.get(self.root.pid)
        if root is None or root.start != self.root.start:
            return []
        current = {p for p in descendants(self.root.pid, table) if p.pid not in self.exclude}
        for p in current:
            self.seen[p.pid] = p
        self._observations += 1
        if self.shm_every and self._observations % self.shm_every == 0:
            self.segments |= shm_segments(current)
        escaped = []
        for pid, p in list(self.seen.items()):
            entry = table.get(pid)
            if entry is None or entry.start != p.start:
                del self.seen[pid]
            elif p not in current:
                escaped.append(p)
                del self.seen[pid]
        return escaped

    def alive(self) -> list[ProcessId]:
        found = {p for p in self.seen.values() if is_alive(p)}
        if self.group is not None:
            found.update(ProcessId(pid, e.start) for pid, e in process_table().items()
                         if e.pgid == self.group and pid not in self.exclude and pid != self.root.pid
                         and e.start >= self.root.start)
        return sorted(found)

    def finish(self, remove: Iterable[str] = (), grace_s: float = 2.0) -> list[ProcessId]:
        """End every recorded descendant still alive (the root's own too, when it still runs),
        unlink the shared memory they mapped, remove `remove`; returns what would not end."""
        self.observe()
        alive = self.alive()
        if self.shm_every:
            self.segments |= shm_segments(alive)
        left = end_processes(alive, grace_s)
        remove_paths([*self.segments, *remove])
        return left


class Supervised(NamedTuple):
    """How a supervised child ended: its exit status (negative: the signal that ended it),
    whether a stop was asked for, and the processes that would not end (none, normally)."""

    returncode: int
    stop_requested: bool
    left: list[ProcessId]


def supervise(cmd: list[str], *, env: dict[str, str] | None = None, remove: Iterable[str] = (),
              stop_s: float = 25.0, interval_s: float = 0.5) -> Supervised:
    """Run `cmd` as a child (`start_child`) and stay with it until it ends, then end what it
    started and remove `remove`. SIGINT, SIGTERM or SIGHUP here (a terminal's Ctrl-C, a
    supervisor's stop, to this process or to its group, which the child is not in) becomes one
    SIGTERM to the child; if it has not ended `stop_s` later, or at a second signal, it is
    killed. Whatever leaves the child's tree while it runs is ended at once (orphans), and
    whatever is left when it ends (its processes, if it crashed) after."""
    requested: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        child = start_child(cmd, env=env)
        # The shared memory of the stack's processes too, looked up every 10 s (a read of every
        # process's maps): a crashed driver leaves its engines to be killed here, outright, and
        # their guards may be killed before they have unlinked it.
        watch = Watch(identify(child.pid) or ProcessId(child.pid, -1), shm_every=max(1, round(10 / interval_s)))
        forwarded = 0
        deadline = None
        while child.poll() is None:
            if len(requested) > forwarded:
                if forwarded == 0:
                    child.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + stop_s
                else:
                    deadline = time.monotonic()  # a second signal: no more waiting
                forwarded = len(requested)
            if deadline is not None and time.monotonic() >= deadline:
                print(f"disagg: the stack did not stop within {stop_s:.0f} s; ending its processes",
                      file=sys.stderr, flush=True)
                child.kill()
                child.wait()
                break
            escaped = watch.observe()
            if escaped:
                end_processes(escaped)
            time.sleep(interval_s)
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # the clean-up below is not to be interrupted
        left = watch.finish(remove)
        return Supervised(child.returncode, bool(requested), left)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def guard_main(argv: list[str]) -> int:
    """The guard process: `python children.py ROOT_PID ROOT_START LEADS_GROUP INTERVAL_S [PATH...]`,
    its stdin a pipe the root holds. Exits 0 when everything it ended has ended."""
    root = ProcessId(int(argv[0]), int(argv[1]))
    leads_group, interval_s, remove = argv[2] == "1", float(argv[3]), argv[4:]
    # Told, not looked up: the root may be gone before this process has started.
    watch = Watch(root, shm_every=5, leads_group=leads_group)
    # SIGTERM (the parent-death signal) wakes the wait below through this pipe: the root's end
    # closes stdin at the same moment, and either says "finish".
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while is_alive(root):
        escaped = watch.observe()
        if escaped:
            print(f"disagg guard: ending {len(escaped)} orphaned processes of {root.pid}: "
                  f"{[p.pid for p in escaped]}", file=sys.stderr, flush=True)
            end_processes(escaped)
        readable, _, _ = select.select([0, wake_r], [], [], interval_s)
        if wake_r in readable or (readable and not os.read(0, 512)):
            break  # SIGTERM, or the root closed its end: done, or gone
    left = watch.finish(remove)
    if left:
        print(f"disagg guard: processes of {root.pid} that would not end: {[p.pid for p in left]}",
              file=sys.stderr, flush=True)
    return 1 if left else 0


class Guard:
    """A guard process over this process: `Guard.start(remove=[...])` before starting what it
    must not outlive (an engine), `finish()` when stopping.

    Started from a thread that lives as long as this process (its parent-death signal follows
    that thread; the pipe would tell it anyway)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls, remove: Iterable[str] = (), interval_s: float = 1.0) -> "Guard":
        me = identify(os.getpid())
        assert me is not None
        # -I -S: the standard library only, so the guard costs a few MB and starts in ~20 ms.
        leads_group = "1" if os.getpgid(0) == me.pid else "0"
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), str(me.pid), str(me.start), leads_group,
               str(interval_s), *remove]
        return cls(subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True, preexec_fn=_guard_preexec))

    def finish(self, timeout_s: float = 15.0) -> bool:
        """Tell the guard we are done and wait: it ends what is left below us and removes the
        paths. True when everything ended."""
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            return self.process.wait(timeout_s) == 0
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return False


if __name__ == "__main__":
    sys.exit(guard_main(sys.argv[1:]))
