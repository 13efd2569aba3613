"""Process-level tuning of long-running services."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Take every object alive after startup (modules, classes, schemas, the app) out of the cyclic
    garbage collector's scans. A service allocates on every request and message; each full
    collection would otherwise walk the whole startup heap — hundreds of thousands of objects, tens
    of milliseconds with the event loop stopped — and show up as latency spikes on every stream.
    Frozen objects are still freed by reference counting; only cycles among them are never collected,
    which startup objects do not create."""
    gc.collect()
    gc.freeze()
