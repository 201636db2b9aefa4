"""Freezing the start-up heap out of the garbage collector (disagg.heap)."""

from __future__ import annotations

import gc

from disagg.heap import freeze_startup_heap


def test_startup_objects_leave_the_collectors_generations() -> None:
    before = len(gc.get_objects())
    try:
        freeze_startup_heap()
        # A full collection now walks only what was allocated after the freeze.
        assert gc.get_freeze_count() >= before // 2
        assert len(gc.get_objects()) < before // 10
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
