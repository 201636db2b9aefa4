"""Descriptor lists: (address, length, device id) triples, NIXL's unit of registration and transfer.

A `DescList` keeps its triples in one (N, 3) int64 numpy array so that bounds checks,
coalescing and hand-over to NIXL stay vectorised for thousands of blocks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

MemType = Literal["DRAM", "VRAM"]


@dataclass(frozen=True)
class Desc:
    """One contiguous span of memory."""

    addr: int
    length: int
    dev_id: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.length


class DescList:
    """An ordered list of spans in one memory type. Immutable once built."""

    __slots__ = ("array", "mem_type", "_total")

    def __init__(self, array: np.ndarray, mem_type: MemType = "DRAM") -> None:
        array = np.asarray(array, dtype=np.int64)
        if array.size == 0:
            array = array.reshape(0, 3)
        if array.ndim != 2 or array.shape[1] != 3:
            raise ValueError(f"descriptor array must be (N, 3) (addr, len, dev), got {array.shape}")
        if (array[:, 1] <= 0).any():
            raise ValueError("every descriptor needs a positive length")
        array.setflags(write=False)
        self.array = array
        self.mem_type: MemType = mem_type
        self._total: int | None = None

    @classmethod
    def from_descs(cls, descs: Iterable[Desc | tuple[int, ...]], mem_type: MemType = "DRAM") -> "DescList":
        rows = [(d.addr, d.length, d.dev_id) if isinstance(d, Desc) else
                (d[0], d[1], d[2] if len(d) > 2 else 0) for d in descs]
        return cls(np.array(rows, dtype=np.int64).reshape(-1, 3), mem_type)

    @classmethod
    def from_memory(cls, memory: Any, mem_type: MemType | None = None) -> "DescList":
        """Spans of torch tensors, numpy arrays, or (addr, len[, dev]) tuples (a single one or a list)."""
        if isinstance(memory, DescList):
            return memory
        items = memory if isinstance(memory, (list, tuple)) and not _is_span(memory) else [memory]
        rows: list[tuple[int, int, int]] = []
        kinds: set[str] = set()
        for item in items:
            addr, length, dev, kind = _span_of(item)
            rows.append((addr, length, dev))
            kinds.add(kind)
        if mem_type is None:
            if len(kinds) > 1:
                raise ValueError("one descriptor list cannot mix host and device memory")
            mem_type = kinds.pop() if kinds else "DRAM"  # type: ignore[assignment]
        return cls(np.array(rows, dtype=np.int64).reshape(-1, 3), mem_type)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __iter__(self) -> Iterator[Desc]:
        for addr, length, dev in self.array.tolist():
            yield Desc(addr, length, dev)

    def __getitem__(self, i: int) -> Desc:
        addr, length, dev = self.array[i].tolist()
        return Desc(addr, length, dev)

    @property
    def total_bytes(self) -> int:
        if self._total is None:
            self._total = int(self.array[:, 1].sum())
        return self._total

    def same_lengths(self, other: "DescList") -> bool:
        """Whether descriptor i of both lists has the same length, for every i."""
        if len(self) != len(other):
            return False
        if len(self) <= 8:
            return self.array[:, 1].tolist() == other.array[:, 1].tolist()
        return bool((self.array[:, 1] == other.array[:, 1]).all())

    @property
    def lengths(self) -> np.ndarray:
        return self.array[:, 1]

    def coalesced(self) -> "DescList":
        """Merge neighbours where one span ends exactly where the next begins (same device)."""
        if len(self) < 2:
            return self
        a = self.array
        joins = (a[:-1, 0] + a[:-1, 1] == a[1:, 0]) & (a[:-1, 2] == a[1:, 2])
        if not joins.any():
            return self
        starts = np.flatnonzero(np.concatenate(([True], ~joins)))
        lengths = np.add.reduceat(a[:, 1], starts)
        out = np.stack([a[starts, 0], lengths, a[starts, 2]], axis=1)
        return DescList(out, self.mem_type)

    def to_wire(self) -> list[list[int]]:
        return self.array.tolist()

    @classmethod
    def from_wire(cls, rows: Sequence[Sequence[int]], mem_type: MemType = "DRAM") -> "DescList":
        return cls(np.array(rows, dtype=np.int64).reshape(-1, 3), mem_type)

    def __repr__(self) -> str:
        return f"DescList({len(self)} descs, {self.total_bytes} bytes, {self.mem_type})"


def paired_coalesce(local: DescList, remote: DescList) -> tuple[DescList, DescList]:
    """Coalesce two equally long lists together: merge i and i+1 only where both sides are
    contiguous and the lengths pair up, so descriptor i still moves to descriptor i."""
    if len(local) != len(remote):
        raise ValueError(f"local has {len(local)} descriptors, remote {len(remote)}")
    if (local.lengths != remote.lengths).any():
        raise ValueError("local and remote descriptor lengths differ")
    if len(local) < 2:
        return local, remote
    la, ra = local.array, remote.array
    joins = ((la[:-1, 0] + la[:-1, 1] == la[1:, 0]) & (la[:-1, 2] == la[1:, 2])
             & (ra[:-1, 0] + ra[:-1, 1] == ra[1:, 0]) & (ra[:-1, 2] == ra[1:, 2]))
    if not joins.any():
        return local, remote
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    lengths = np.add.reduceat(la[:, 1], starts)
    lo = np.stack([la[starts, 0], lengths, la[starts, 2]], axis=1)
    ro = np.stack([ra[starts, 0], lengths, ra[starts, 2]], axis=1)
    return DescList(lo, local.mem_type), DescList(ro, remote.mem_type)


def _is_span(obj: Any) -> bool:
    return isinstance(obj, tuple) and 2 <= len(obj) <= 4 and all(isinstance(x, (int, str)) for x in obj)


def _span_of(item: Any) -> tuple[int, int, int, str]:
    if isinstance(item, np.ndarray):
        if not item.flags.c_contiguous:
            raise ValueError("register or transfer contiguous numpy arrays only")
        return int(item.ctypes.data), int(item.nbytes), 0, "DRAM"
    if isinstance(item, tuple):
        addr, length = int(item[0]), int(item[1])
        dev = int(item[2]) if len(item) > 2 else 0
        return addr, length, dev, "DRAM"
    if isinstance(item, Desc):
        return item.addr, item.length, item.dev_id, "DRAM"
    if type(item).__module__.startswith("torch"):
        if not item.is_contiguous():
            raise ValueError("register or transfer contiguous tensors only")
        length = item.numel() * item.element_size()
        if item.device.type == "cpu":
            return int(item.data_ptr()), length, 0, "DRAM"
        return int(item.data_ptr()), length, int(item.device.index or 0), "VRAM"
    raise TypeError(f"cannot describe memory of type {type(item).__name__}")


def span_view(addr: int, length: int) -> memoryview:
    """A writable byte view of raw host memory (the caller has checked it is registered)."""
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")
