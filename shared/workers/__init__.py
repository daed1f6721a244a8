"""Background workers of `rr-worker`: the billing flusher, the partition manager, retention and payments."""

from __future__ import annotations

import asyncio

__all__ = ["sleep_unless_stopped"]


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile: every worker loop's pause between rounds."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
