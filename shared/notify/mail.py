"""Mail: the platform's SMTP settings, the templates, and sending one message.

SMTP settings are a platform setting in PostgreSQL (`smtp_config`), the password envelope-encrypted
(`shared.crypto`). TLS: `implicit` (TLS from the first byte, usually port 465), `starttls` (required, not
opportunistic: a server that does not offer it fails the send) or `none`, allowed only for a loopback host
(a local relay or a test server), so a password never crosses a network in clear.

Bodies are rendered from Jinja2 templates (`templates/<name>.txt` and `.html`, HTML autoescaped) at each
attempt, from the event's own data — ids, amounts, times — and the org's name and code; nothing else reaches a
template, so no secret or prompt can end up in a mail, and no rendered body is stored.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import jinja2

from shared.crypto import SecretBox, load_secret, store_secret
from shared.money import format_usd

__all__ = ["SUBJECTS", "TLS_MODES", "MailNotConfigured", "SmtpConfig", "load_smtp_config", "render", "save_smtp_config",
           "send_mail"]

PASSWORD_KIND = "smtp_password"
TLS_MODES = ("implicit", "starttls", "none")
SUBJECTS = {
    "balance_low": "Low balance: {org_name}",
    "balance_depleted": "Balance used up: {org_name}",
    "payment_receipt": "Receipt for payment {payment_id}: {org_name}",
    "payment_failed": "Payment failed: {org_name}",
    "test": "Rocket Relay test mail",
}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
    undefined=jinja2.StrictUndefined,  # a missing field is a bug, not an empty line in a customer's mail
    keep_trailing_newline=True,
)
_env.globals["usd"] = format_usd


class MailNotConfigured(Exception):
    """No SMTP settings are stored."""


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    tls_mode: str
    username: str | None
    password: str | None
    from_address: str

    def __repr__(self) -> str:  # never the password, even in a traceback
        return f"SmtpConfig(host={self.host!r}, port={self.port}, tls_mode={self.tls_mode!r})"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def load_smtp_config(conn: asyncpg.Connection | asyncpg.Pool, box: SecretBox) -> SmtpConfig | None:
    row = await conn.fetchrow(
        "select host, port, tls_mode, username, password_secret_id, from_address from smtp_config")
    if row is None:
        return None
    password = await load_secret(conn, box, row["password_secret_id"]) if row["password_secret_id"] else None
    return SmtpConfig(row["host"], row["port"], row["tls_mode"], row["username"], password, row["from_address"])


_KEEP = object()


async def save_smtp_config(conn: asyncpg.Connection, box: SecretBox, *, host: str, port: int, tls_mode: str,
                           username: str | None, from_address: str, password: str | object | None = _KEEP) -> None:
    """Replace the settings inside the caller's transaction; `password` left out keeps the stored one, None
    removes it. A replaced password's secret row is deleted."""
    if tls_mode not in TLS_MODES:
        raise ValueError(f"tls_mode must be one of {', '.join(TLS_MODES)}")
    if tls_mode == "none" and not is_loopback_host(host):
        raise ValueError("tls_mode none is only allowed for a loopback host")
    old = await conn.fetchval("select password_secret_id from smtp_config for update")
    secret_id: uuid.UUID | None = old
    if password is not _KEEP:
        secret_id = None if password is None else await store_secret(conn, box, PASSWORD_KIND, str(password),
                                                                     hint="…")
    await conn.execute(
        """insert into smtp_config (id, host, port, tls_mode, username, password_secret_id, from_address, updated_at)
           values (true, $1, $2, $3, $4, $5, $6, now())
           on conflict (id) do update set host = $1, port = $2, tls_mode = $3, username = $4,
               password_secret_id = $5, from_address = $6, updated_at = now()""",
        host, port, tls_mode, username, secret_id, from_address)
    if old is not None and old != secret_id:
        await conn.execute("delete from secrets where id = $1", old)


def render(template: str, context: dict[str, Any]) -> tuple[str, str, str]:
    """(subject, plain text, HTML) of one mail."""
    subject = SUBJECTS[template].format(**context)
    text = _env.get_template(f"{template}.txt").render(**context)
    html = _env.get_template(f"{template}.html").render(**context)
    return subject, text, html


def build_message(config: SmtpConfig, recipients: list[str], subject: str, text: str, html: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = config.from_address
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject.replace("\r", " ").replace("\n", " ")  # a name must not add a header line
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=config.from_address.rpartition("@")[2] or None)
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


async def send_mail(config: SmtpConfig, recipients: list[str], subject: str, text: str, html: str, *,
                    timeout_s: float) -> None:
    """Send one message; raises aiosmtplib.SMTPException or OSError when it did not go out."""
    message = build_message(config, recipients, subject, text, html)
    await aiosmtplib.send(
        message, hostname=config.host, port=config.port, username=config.username if config.password else None,
        password=config.password,
        use_tls=config.tls_mode == "implicit", start_tls=True if config.tls_mode == "starttls" else False,
        timeout=timeout_s,
    )
