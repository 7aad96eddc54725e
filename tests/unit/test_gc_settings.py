"""The process-wide garbage-collector settings ``python -m gateway`` applies
once it serves (gateway/__main__.py)."""

from __future__ import annotations

import gc

from gateway.__main__ import GC_YOUNG_THRESHOLD, _settle_garbage_collector


def test_what_exists_at_start_is_frozen_and_young_collections_are_rarer() -> None:
    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    try:
        _settle_garbage_collector()
        # Everything alive at start (this test process's modules included)
        # is out of every later collection...
        assert gc.get_freeze_count() > frozen_before + 10_000
        # ...and only the young generation's threshold changed.
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert before[0] < GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
