"""The asyncio event loop that the server and the load generator run on: uvloop's where it is installed.

uvloop (libuv underneath) spends less of the interpreter on each call than asyncio's own loop: on this
project's 2-core CPU a one-sentence Translate costs the server process ~14% less CPU with it
(docs/experiments/server_cost.py, docs/LOAD.md). It has no Windows build; asyncio's loop is the fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("auto", "uvloop", "asyncio")

Result = TypeVar("Result")


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new loop of `kind`: "uvloop", "asyncio", or "auto" (uvloop where it imports, else asyncio's)."""
    if kind not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {kind!r}: use one of {', '.join(EVENT_LOOPS)}")
    if kind == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError as error:
        if kind == "auto":
            return asyncio.new_event_loop()
        raise RuntimeError(f"--event-loop uvloop, but uvloop cannot be imported: {error}") from error
    return uvloop.new_event_loop()


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """`asyncio.run(coroutine)` on uvloop's loop where it imports (the load generator's)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)
