"""An ASGI middleware that gives every request body a deadline (408 past it).

Litestar reads a body for as long as the client takes to send it, and granian cuts slow headers but not
slow bodies: one socket that sends headers and then part of a body would hold a task (and on signup, with
no credentials needed) forever. Past `timeout_s` after the request started, reading the body raises an
`HTTPException(408)`, which the one error handler turns into our error shape. Only body messages are timed:
a handler waiting for the disconnect after the body is not.
"""

from __future__ import annotations

import asyncio

from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyDeadline"]


class BodyDeadline:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(status_code=408,
                                    detail=f"The request body did not arrive within {self.timeout_s:g} s.") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
