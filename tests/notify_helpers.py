"""Test doubles for the notification tests, all real servers on 127.0.0.1: an SMTP server that catches mail
(aiosmtpd), and a webhook receiver (aiohttp) that records what it got and fails, redirects or answers as told."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from dataclasses import dataclass, field
from email.message import EmailMessage

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from shared.embedded import free_port


@dataclass
class CaughtMail:
    recipients: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["subject"])

    def text(self) -> str:
        return self.message.get_body(("plain",)).get_content()

    def html(self) -> str:
        return self.message.get_body(("html",)).get_content()

    def raw(self) -> str:
        return self.message.as_string()


class MailCatcher:
    """A real SMTP server (aiosmtpd, in a thread); `refuse_next` makes it answer 451 to that many mails.
    With `login` (username, password) it takes mail only after AUTH with exactly those (plain text is allowed:
    it listens on loopback, as the relay's `tls_mode` none requires)."""

    def __init__(self, login: tuple[str, str] | None = None) -> None:
        self.mails: list[CaughtMail] = []
        self.refuse_next = 0
        self.port = free_port()
        self._login = login
        auth = {"authenticator": self._authenticate, "auth_required": True, "auth_require_tls": False} if login else {}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **auth)

    def _authenticate(self, server, session, envelope, mechanism: str, data: object) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == self._login
        return AuthResult(success=ok, handled=False)  # aiosmtpd answers 235 or 535

    def start(self) -> MailCatcher:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return "451 4.3.0 try again later"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append(CaughtMail(list(envelope.rcpt_tos), message))
        return "250 OK"

    def to(self, address: str) -> list[CaughtMail]:
        return [m for m in self.mails if address in m.recipients]

    async def wait_for(self, address: str, count: int, timeout: float = 20.0) -> list[CaughtMail]:
        deadline = time.monotonic() + timeout
        while len(self.to(address)) < count and time.monotonic() < deadline:  # noqa: ASYNC110 (another thread adds)
            await asyncio.sleep(0.05)
        return self.to(address)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; fails the first `fail_first` with 500, or
    answers every request with a redirect to `redirect_to`; `delay_s` holds each answer back that long (a
    slow receiver, so a delivery batch stays in flight), `in_flight` counts the requests being held."""

    fail_first: int = 0
    redirect_to: str | None = None
    delay_s: float = 0.0
    in_flight: int = 0
    requests: list[Received] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        if self.delay_s:
            self.in_flight += 1
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
        if self.redirect_to:
            return web.Response(status=307, headers={"location": self.redirect_to})
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500, text="receiver-internal-detail")
        return web.Response(status=200, text="receiver-private-body")


class Clock:
    """An injected clock (unix seconds) that only moves when told."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
