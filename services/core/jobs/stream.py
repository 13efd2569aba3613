"""Live stream of a job's stored events, for Watch RPCs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .records import JobEvent
from .store import JobStore

_BATCH = 500


async def watch(store: JobStore, name: str, after_seq: int = 0, poll_s: float = 0.2) -> AsyncIterator[JobEvent]:
    """Yield the events of job ``name`` after ``after_seq`` as they are stored, until the job is terminal
    and every event was sent. One query per poll (state, then events); NotFound for an unknown job."""
    while True:
        state, events = await asyncio.to_thread(store.state_and_events, name, after_seq, _BATCH)
        for event in events:
            yield event
            after_seq = event.seq
        if len(events) == _BATCH:
            continue
        if state.terminal:
            return
        await asyncio.sleep(poll_s)
