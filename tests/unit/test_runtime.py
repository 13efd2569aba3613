"""services.core.runtime: the startup heap is taken out of the collector's scans."""

from __future__ import annotations

import gc

from services.core.runtime import freeze_startup_heap


def _in_oldest_generation(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects(generation=2))


def test_freeze_startup_heap_moves_the_live_objects_out_of_full_collections():
    startup = [{"i": i} for i in range(1000)]
    try:
        gc.collect()
        assert _in_oldest_generation(startup)  # what a full collection walks
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(startup)
        assert not _in_oldest_generation(startup) and not _in_oldest_generation(startup[0])
        # objects made later are still collected, cycles included
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
