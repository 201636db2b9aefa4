"""Descriptor lists and KV block maps: the shapes every transfer is built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_transfer.blocks import BlockMap, block_runs, block_transfer_descs
from kv_transfer.descriptors import DescList, paired_coalesce


def test_desclist_from_numpy_torch_and_tuples() -> None:
    a = np.zeros(100, np.uint8)
    t = torch.zeros(10, dtype=torch.float32)
    d = DescList.from_memory([a, t, (4096, 16)])
    assert [x.length for x in d] == [100, 40, 16]
    assert d[0].addr == a.ctypes.data and d[1].addr == t.data_ptr()
    assert d.mem_type == "DRAM" and d.total_bytes == 156


def test_desclist_refuses_non_contiguous_memory() -> None:
    with pytest.raises(ValueError):
        DescList.from_memory(np.zeros((4, 4))[:, 0])


def test_desclist_refuses_empty_spans() -> None:
    with pytest.raises(ValueError):
        DescList.from_descs([(4096, 0)])


def test_coalesced_merges_only_touching_spans() -> None:
    d = DescList.from_descs([(0, 10), (10, 5), (20, 5), (25, 5), (40, 1)])
    assert [(x.addr, x.length) for x in d.coalesced()] == [(0, 15), (20, 10), (40, 1)]


def test_paired_coalesce_needs_both_sides_contiguous() -> None:
    local = DescList.from_descs([(0, 4), (4, 4), (8, 4), (100, 4)])
    remote = DescList.from_descs([(1000, 4), (1004, 4), (2000, 4), (2004, 4)])
    lo, ro = paired_coalesce(local, remote)
    assert [(x.addr, x.length) for x in lo] == [(0, 8), (8, 4), (100, 4)]
    assert [(x.addr, x.length) for x in ro] == [(1000, 8), (2000, 4), (2004, 4)]


def test_block_runs() -> None:
    assert block_runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert block_runs([]) == []


def test_block_map_of_cpu_layout() -> None:
    # vLLM CPU: one tensor per layer, (num_blocks, 2, block_size, heads*head_dim).
    layers = [torch.zeros(8, 2, 32, 64) for _ in range(3)]
    m = BlockMap.from_tensors(layers, 8)
    assert m.bases == tuple(t.data_ptr() for t in layers)
    assert m.block_bytes == m.block_stride == 2 * 32 * 64 * 4
    d = m.descs([5, 1])
    assert len(d) == 6
    assert d[0].addr == layers[0].data_ptr() + 5 * m.block_stride
    assert d[3].addr == layers[1].data_ptr() + 1 * m.block_stride


def test_block_map_of_kv_first_layout() -> None:
    # GPU-style (2, num_blocks, block_size, heads, head_dim): K and V are separate planes.
    layer = torch.zeros(2, 6, 16, 2, 8)
    m = BlockMap.from_tensors([layer], 6)
    assert len(m.bases) == 2
    assert m.bases[1] - m.bases[0] == 6 * 16 * 2 * 8 * 4
    assert m.block_bytes == 16 * 2 * 8 * 4


def test_block_map_of_kernel_split_blocks() -> None:
    # Attention kernels may split each manager block into `ratio` consecutive kernel blocks.
    m = BlockMap.from_tensors([torch.zeros(16, 2, 32, 8)], 8)
    assert m.block_bytes == m.block_stride == 2 * 2 * 32 * 8 * 4


def test_block_descs_reject_out_of_range_ids() -> None:
    m = BlockMap.from_tensors([torch.zeros(4, 2, 32, 8)], 4)
    with pytest.raises(ValueError):
        m.descs([4])


def test_block_transfer_descs_coalesce_runs_of_consecutive_ids() -> None:
    local = BlockMap.from_tensors([torch.zeros(64, 2, 32, 8) for _ in range(2)], 64)
    remote = BlockMap.from_tensors([torch.zeros(64, 2, 32, 8) for _ in range(2)], 64)
    lo, ro = block_transfer_descs(local, list(range(0, 16)) + [40], remote, list(range(20, 36)) + [7])
    # Per layer: one descriptor for the 16-block run, one for the odd block.
    assert len(lo) == len(ro) == 4
    assert lo.total_bytes == 2 * 17 * local.block_bytes
    assert ro[0].addr == remote.bases[0] + 20 * remote.block_stride and ro[0].length == 16 * remote.block_bytes


def test_block_transfer_descs_refuse_different_block_layouts() -> None:
    a = BlockMap.from_tensors([torch.zeros(4, 2, 32, 8)], 4)
    b = BlockMap.from_tensors([torch.zeros(4, 2, 32, 16)], 4)
    with pytest.raises(ValueError, match="layouts differ"):
        block_transfer_descs(a, [0], b, [0])


def test_block_map_wire_round_trip() -> None:
    m = BlockMap.from_tensors([torch.zeros(4, 2, 32, 8)], 4)
    assert BlockMap.from_wire(m.to_wire()) == m
