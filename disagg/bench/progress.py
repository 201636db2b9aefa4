"""Progress lines on stderr while a benchmark runs (stdout keeps its tables and results):

    [12:03:41] [disagg] 8/24 requests done, 0 failed, 14 s

`say` prints one line; `Progress` is a driver's `on_result` that prints one per finished batch
(about a tenth of the requests); `heartbeat` prints while a long step, such as a stack's
start, runs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator

from disagg.bench.driver import RequestResult


def say(label: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] [{label}] {message}", file=sys.stderr, flush=True)


class Progress:
    """`drive`'s `on_result`: a line per finished batch of requests, and after the last one."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.every = max(1, total // 10)
        self.done = self.failed = 0
        self.started = time.monotonic()

    def __call__(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.ok
        if self.done % self.every == 0 or self.done == self.total:
            say(self.label, f"{self.done}/{self.total} requests done, {self.failed} failed, "
                            f"{time.monotonic() - self.started:.0f} s")


@contextlib.contextmanager
def heartbeat(label: str, what: str, every_s: float = 30.0) -> Iterator[None]:
    """A line every `every_s` seconds (`what` and the seconds so far) until the block ends."""
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(every_s):
            say(label, f"{what} ({time.monotonic() - started:.0f} s)")

    thread = threading.Thread(target=beat, name="bench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(1)
