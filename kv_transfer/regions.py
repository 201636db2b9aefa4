"""Registered memory regions, and the check every remote access goes through.

An agent never reads or writes outside memory it registered, whatever a peer's descriptors say:
initiators check a transfer against the target's table before posting it; two-sided targets
check again, against their live table, before they touch memory.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from kv_transfer.descriptors import DescList, MemType
from kv_transfer.errors import AccessError


@dataclass(frozen=True)
class Region:
    """One registration: a span of memory its owner lets peers read and write."""

    region_id: int
    addr: int
    length: int
    dev_id: int = 0
    mem_type: MemType = "DRAM"

    @property
    def end(self) -> int:
        return self.addr + self.length

    def to_wire(self) -> list[int | str]:
        return [self.region_id, self.addr, self.length, self.dev_id, self.mem_type]

    @classmethod
    def from_wire(cls, row: list) -> "Region":
        return cls(int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4])


class RegionTable:
    """The regions one agent has registered. Thread-safe; every change bumps `generation`.

    Lifecycle: `add` on registration, `remove` on deregistration (the region is kept in a short
    list of retired regions so refusals can say "deregistered" rather than "never registered"),
    `replace` when a peer's newer table arrives. `check` reads only.
    """

    _RETIRED_KEPT = 64

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.generation = 0
        self._regions: dict[int, Region] = {}
        self._retired: deque[Region] = deque(maxlen=self._RETIRED_KEPT)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0  # two-sided accesses being served right now
        self._index: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, list[int], list[int]]] = {}

    def add(self, region: Region) -> None:
        with self._lock:
            self._regions[region.region_id] = region
            self._changed()

    def remove(self, region_id: int) -> Region:
        """Deregister; waits for accesses being served to finish so none outlives its region."""
        with self._lock:
            while self._active:
                self._idle.wait()
            region = self._regions.pop(region_id)
            self._retired.append(region)
            self._changed()
            return region

    def replace(self, regions: list[Region], generation: int) -> list[Region]:
        """Install a peer's table; returns the regions that disappeared. Older generations are ignored."""
        with self._lock:
            if generation < self.generation:
                return []
            new = {r.region_id: r for r in regions}
            gone = [r for rid, r in self._regions.items() if rid not in new]
            self._retired.extend(gone)
            self._regions = new
            self.generation = generation
            self._index = {}
            return gone

    def regions(self) -> list[Region]:
        with self._lock:
            return list(self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    def check(self, descs: DescList, what: str = "remote") -> None:
        """Raise AccessError unless every descriptor lies inside one registered region."""
        with self._lock:
            self._check_locked(descs, what)

    def _check_locked(self, descs: DescList, what: str) -> None:
        if len(descs) == 0:
            return
        bad = self._uncovered(descs)
        if bad is None:
            return
        i = int(bad)
        addr, length, dev = (int(x) for x in descs.array[i])
        retired = next((r for r in reversed(self._retired) if r.dev_id == dev
                        and r.addr <= addr and addr + length <= r.end), None)
        span = f"[{addr:#x}, {addr + length:#x}) on {descs.mem_type}:{dev}"
        if retired is not None:
            raise AccessError(f"{what} descriptor {i} {span} is in region {retired.region_id} that "
                              f"agent {self.owner!r} deregistered; nothing was transferred")
        raise AccessError(f"{what} descriptor {i} {span} is outside every region agent "
                          f"{self.owner!r} registered; nothing was transferred")

    @contextmanager
    def access(self, descs: DescList, what: str = "incoming") -> Iterator[None]:
        """Check `descs`, then keep the table from shrinking until the block exits."""
        with self._lock:
            self._check_locked(descs, what)
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    def overlaps(self, descs: DescList, regions: list[Region]) -> bool:
        """Whether any descriptor touches any of `regions` (used to fail in-flight transfers)."""
        a = descs.array
        for r in regions:
            if ((a[:, 2] == r.dev_id) & (a[:, 0] < r.end) & (a[:, 0] + a[:, 1] > r.addr)).any():
                return True
        return False

    def _changed(self) -> None:
        self.generation += 1
        self._index = {}

    def _sorted(self, mem_type: str, dev: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        key = (mem_type, dev)
        if key not in self._index:
            rs = sorted((r for r in self._regions.values() if r.mem_type == mem_type and r.dev_id == dev),
                        key=lambda r: r.addr)
            starts = np.array([r.addr for r in rs], dtype=np.int64)
            # The running maximum of region ends: the region with the furthest end among those
            # starting at or before an address is the one that can contain a span from there.
            reach = np.maximum.accumulate(np.array([r.end for r in rs], dtype=np.int64)) if rs \
                else np.zeros(0, dtype=np.int64)
            self._index[key] = (starts, reach, starts.tolist(), reach.tolist())
        return self._index[key]

    def _uncovered(self, descs: DescList) -> int | None:
        a = descs.array
        if len(a) <= 8:
            # Few descriptors (single-block latency): plain Python beats numpy's per-call cost.
            for i, (addr, length, dev) in enumerate(a.tolist()):
                _, _, starts_l, reach_l = self._sorted(descs.mem_type, dev)
                j = bisect.bisect_right(starts_l, addr) - 1
                if j < 0 or reach_l[j] < addr + length:
                    return i
            return None
        devs = np.unique(a[:, 2])
        for dev in devs.tolist():
            rows = np.flatnonzero(a[:, 2] == dev) if len(devs) > 1 else np.arange(len(a))
            starts, reach, _, _ = self._sorted(descs.mem_type, dev)
            if starts.size == 0:
                return int(rows[0])
            addr = a[rows, 0]
            end = addr + a[rows, 1]
            idx = np.searchsorted(starts, addr, side="right") - 1
            ok = idx >= 0
            ok[ok] = reach[idx[ok]] >= end[ok]
            if not ok.all():
                return int(rows[np.flatnonzero(~ok)[0]])
        return None
