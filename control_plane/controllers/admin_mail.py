"""Platform admin of mail: the SMTP settings (password envelope-encrypted, never shown), a test mail, and
the mail records — above all those that finally failed, which nobody else would notice."""

from __future__ import annotations

import datetime
import hashlib
from typing import Annotated, Literal

import aiosmtplib
import msgspec
from litestar import Controller, get, post, put
from litestar.params import FromQuery, JSONBody, Parameter
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, Email, LimitParam
from control_plane.errors import Conflict, Invalid
from control_plane.permissions import require
from control_plane.state import MAX_ID
from shared.notify.mail import is_loopback_host, load_smtp_config, render, save_smtp_config, send_mail

__all__ = ["AdminMailController"]

Host = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\[\]-]+$(?!\n)")]
SmtpUser = Annotated[str, msgspec.Meta(min_length=1, max_length=254, pattern=r"^[\x21-\x7e]+$(?!\n)")]
SmtpPassword = Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$(?!\n)")]


class MailSettingsUpdate(msgspec.Struct, frozen=True):
    host: Host
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    tls_mode: Literal["implicit", "starttls", "none"]  # none: only for a loopback host
    from_address: Email
    username: SmtpUser | None = None
    password: SmtpPassword | UnsetType | None = UNSET  # left out: keep the stored one; null: remove it


class MailSettings(msgspec.Struct, frozen=True):
    configured: bool
    host: str | None = None
    port: int | None = None
    tls_mode: str | None = None
    username: str | None = None
    password_set: bool = False  # the password itself is never shown
    from_address: str | None = None


class TestMail(msgspec.Struct, frozen=True):
    to: Email


class TestMailResult(msgspec.Struct, frozen=True):
    sent: bool
    error: str | None  # an SMTP status code or error class, never the server's text


class MailMessage(msgspec.Struct, frozen=True):
    id: int
    org_id: int | None
    event_id: int | None
    template: str
    recipients: list[str]
    status: str  # pending, sent or failed (gave up)
    attempts: int
    error: str | None
    created_at: datetime.datetime
    last_attempt_at: datetime.datetime | None
    sent_at: datetime.datetime | None


async def _view(cp) -> MailSettings:
    config = await load_smtp_config(cp.pool, cp.box)
    if config is None:
        return MailSettings(False)
    return MailSettings(True, config.host, config.port, config.tls_mode, config.username, config.password is not None,
                        config.from_address)


def _fingerprint(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()[:12]


class AdminMailController(Controller):
    path = "/v1/admin/mail"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    @get("/settings", guards=[require("platform.mail.read")])
    async def get_settings(self, cp: CP) -> MailSettings:
        return await _view(cp)

    @put("/settings", guards=[require("platform.mail.manage")])
    async def put_settings(self, cp: CP, principal: Caller, data: JSONBody[MailSettingsUpdate]) -> MailSettings:
        """Set the SMTP account mail is sent through. TLS `implicit` or `starttls` (required); `none` only
        for a loopback host. The password is stored envelope-encrypted and never shown again."""
        if data.tls_mode == "none" and not is_loopback_host(data.host):
            raise Invalid("tls_mode none is only allowed for a loopback host.", code="tls_required")
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await load_smtp_config(conn, cp.box)
            extra = {} if data.password is UNSET else {"password": data.password}
            await save_smtp_config(conn, cp.box, host=data.host, port=data.port, tls_mode=data.tls_mode,
                                   username=data.username, from_address=data.from_address, **extra)
            plain = ("host", "port", "tls_mode", "username", "from_address")
            await audit.record(
                conn, principal, "smtp.settings.update", "smtp_config", None, org_id=None,
                before={**({f: getattr(before, f) for f in plain} if before else {}),
                        "secret": _fingerprint(before.password) if before else None},
                after={**{f: getattr(data, f) for f in plain},
                       "secret": _fingerprint(before.password if before and data.password is UNSET
                                              else (None if data.password is UNSET else data.password))})
        return await _view(cp)

    @post("/test", guards=[require("platform.mail.manage")], status_code=200, opt={"errors": (409,)})
    async def send_test(self, cp: CP, principal: Caller, data: JSONBody[TestMail]) -> TestMailResult:
        """Send a test mail now, through the stored settings, and say whether the server accepted it (409 while
        no settings are stored: a state to fix, not a server failure)."""
        config = await load_smtp_config(cp.pool, cp.box)
        if config is None:
            raise Conflict("Mail is not configured.", code="mail_not_configured")
        subject, text, html = render("test", {})
        error = None
        try:
            await send_mail(config, [data.to], subject, text, html, timeout_s=cp.settings.smtp_timeout_s)
        except aiosmtplib.SMTPResponseException as exc:
            error = f"SMTP {exc.code}"
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            error = f"SMTP error ({type(exc).__name__})"
        now = datetime.datetime.now(datetime.UTC)
        async with cp.pool.acquire() as conn, conn.transaction():
            mail_id = await conn.fetchval(
                """insert into mail_messages (template, recipients, status, attempts, next_attempt_at,
                                              last_attempt_at, error, created_at, sent_at)
                   values ('test', $1, $2, 1, $3, $3, $4, $3, $5) returning id""",
                [data.to], "failed" if error else "sent", now, error, None if error else now)
            await audit.record(conn, principal, "smtp.test", "mail_message", mail_id, org_id=None,
                               after={"to": data.to, "sent": error is None})
        return TestMailResult(error is None, error)

    @get("/messages", guards=[require("platform.mail.read")])
    async def list_messages(self, cp: CP, status: FromQuery[Literal["pending", "sent", "failed"] | None] = "failed",
                            org_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                            limit: LimitParam = 50) -> list[MailMessage]:
        """Mail records, newest first; `failed` (the default) are those that gave up after their retries."""
        rows = await cp.pool.fetch(
            """select id, org_id, event_id, template, recipients, status, attempts, error, created_at,
                      last_attempt_at, sent_at
               from mail_messages where ($1::text is null or status = $1) and ($2::bigint is null or org_id = $2)
               order by id desc limit $3""", status, org_id, limit)
        return [MailMessage(**dict(r)) for r in rows]
