"""Background workers of `rr-worker`: the billing flusher, the partition manager, retention and payments."""

from __future__ import annotations

import asyncio
import os
import traceback

__all__ = ["sleep_unless_stopped", "unexpected_error"]


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile: every worker loop's pause between rounds."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def unexpected_error(exc: BaseException) -> str:
    """`RuntimeError at cluster.py:1168`: what a worker loop logs of an error it did not expect before it
    carries on. The class and the place only: the message could quote an event or a row."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    return f"{type(exc).__name__} at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"
