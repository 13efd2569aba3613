"""An asyncio event loop on a virtual clock, for tests of timing rules (pacing, intervals, rates).

``loop.time()`` starts at 0 and moves only when every task waits: the loop then jumps to its next
timer instead of sleeping. Sleeps, ``call_at`` and ``asyncio.timeout`` keep their meaning, but a test
asserts exact times ("the second batch went out 0.2 s after the first") without margins, and a
loaded machine cannot shift them. Sockets still work (the loop polls them before each jump, and
waits for them with no jump when no timer is pending); work in other threads is not waited for,
so keep it out of these tests.
"""

from __future__ import annotations

import asyncio
import inspect
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector:
    """Wraps a real selector: a select that would wait for a timer moves the clock there instead."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing scheduled: only I/O can wake the loop
            return self._inner.select(None)
        ready = self._inner.select(0)
        if ready or timeout <= 0:
            return ready
        ready = self._inner.select(0.001)  # loopback I/O in flight lands first
        if not ready:
            self._loop.advance(timeout)
        return ready

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_JumpingSelector(selectors.DefaultSelector(), self))  # type: ignore[arg-type]

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a fresh ``VirtualTimeLoop``."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def virtual_time(test: Any) -> Any:
    """Decorator: an ``async def`` test run on a ``VirtualTimeLoop`` (the test becomes a plain function,
    so no other plugin runs it on a real loop)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return run_virtual(test(*args, **kwargs))

    run.__name__, run.__qualname__, run.__doc__ = test.__name__, test.__qualname__, test.__doc__
    run.__signature__ = inspect.signature(test)  # type: ignore[attr-defined]  # pytest passes the same fixtures
    return run
