"""Where each KV block lives in memory, and the descriptors that move a list of blocks.

vLLM's CPU KV cache is one tensor per layer, `(num_blocks, 2, block_size, heads*head_dim)`: a
block's K and V are contiguous, and consecutive block ids are contiguous, so a run of consecutive
ids (on both sides) moves as one descriptor. GPU layouts that put K and V first,
`(2, num_blocks, ...)`, are two planes per layer; the same code handles both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kv_transfer.descriptors import DescList, MemType, paired_coalesce


@dataclass(frozen=True)
class BlockMap:
    """Block `b` of plane `p` is the `block_bytes` at `bases[p] + b * block_stride`.

    A plane is one layer's block array (or its K or V half when those come first). Both sides of
    a transfer must agree on `block_bytes`; strides and bases are each side's own.
    """

    bases: tuple[int, ...]
    block_stride: int
    block_bytes: int
    num_blocks: int
    mem_type: MemType = "DRAM"
    dev_id: int = 0

    @classmethod
    def from_tensors(cls, tensors: Sequence[Any], num_blocks: int) -> "BlockMap":
        """From per-layer KV tensors (torch), all shaped alike, with `num_blocks` blocks each."""
        if not tensors:
            raise ValueError("no KV cache tensors")
        first = tensors[0]
        shape, strides = tuple(first.shape), tuple(first.stride())
        if any(tuple(t.shape) != shape or tuple(t.stride()) != strides for t in tensors):
            raise ValueError("KV cache tensors differ in shape or stride")
        # The block dimension: the first of the leading two dims with num_blocks entries, or a
        # multiple of it (attention kernels may split each block into `ratio` kernel blocks,
        # which are then consecutive).
        lead = range(min(2, len(shape)))
        dims = [d for d in lead if shape[d] == num_blocks] or [d for d in lead if shape[d] % num_blocks == 0]
        if not dims:
            raise ValueError(f"no dimension of size {num_blocks} (num_blocks) in KV cache shape {shape}")
        dim = dims[0]
        ratio = shape[dim] // num_blocks
        es = first.element_size()
        inner = math.prod(shape[dim + 1:])
        if any(strides[d] != math.prod(shape[d + 1:]) for d in range(dim + 1, len(shape))) or \
                strides[dim] < inner or (ratio > 1 and strides[dim] != inner):
            raise ValueError(f"a KV block is not contiguous in shape {shape} strides {strides}")
        planes = [(k * strides[0] * es) for k in range(shape[0])] if dim == 1 else [0]
        bases = tuple(int(t.data_ptr()) + off for t in tensors for off in planes)
        mem: MemType = "DRAM" if first.device.type == "cpu" else "VRAM"
        dev = 0 if first.device.type == "cpu" else int(first.device.index or 0)
        return cls(bases, strides[dim] * es * ratio, inner * es * ratio, num_blocks, mem, dev)

    @property
    def bytes_per_block_id(self) -> int:
        """Bytes moved for one block id across every plane."""
        return self.block_bytes * len(self.bases)

    def descs(self, block_ids: Sequence[int]) -> DescList:
        """One descriptor per (plane, block), plane-major, in `block_ids` order."""
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise ValueError(f"block id out of range [0, {self.num_blocks})")
        addrs = (np.asarray(self.bases, dtype=np.int64)[:, None] + ids[None, :] * self.block_stride).ravel()
        rows = np.empty((addrs.size, 3), dtype=np.int64)
        rows[:, 0] = addrs
        rows[:, 1] = self.block_bytes
        rows[:, 2] = self.dev_id
        return DescList(rows, self.mem_type)

    def to_wire(self) -> dict[str, Any]:
        return {"bases": list(self.bases), "block_stride": self.block_stride, "block_bytes": self.block_bytes,
                "num_blocks": self.num_blocks, "mem_type": self.mem_type, "dev_id": self.dev_id}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "BlockMap":
        return cls(tuple(int(b) for b in d["bases"]), int(d["block_stride"]), int(d["block_bytes"]),
                   int(d["num_blocks"]), d.get("mem_type", "DRAM"), int(d.get("dev_id", 0)))


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(first id, count) for each run of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((int(b), 1))
    return runs


def block_transfer_descs(local: BlockMap, local_ids: Sequence[int], remote: BlockMap,
                         remote_ids: Sequence[int], coalesce: bool = True) -> tuple[DescList, DescList]:
    """Descriptor lists that move remote block `remote_ids[i]` to local block `local_ids[i]` in
    every plane; runs that are consecutive on both sides become single descriptors."""
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"{len(local_ids)} local blocks but {len(remote_ids)} remote")
    if local.block_bytes != remote.block_bytes or len(local.bases) != len(remote.bases):
        raise ValueError(f"block layouts differ: local {len(local.bases)} planes of {local.block_bytes} B, "
                         f"remote {len(remote.bases)} planes of {remote.block_bytes} B")
    lo, ro = local.descs(local_ids), remote.descs(remote_ids)
    return paired_coalesce(lo, ro) if coalesce else (lo, ro)
