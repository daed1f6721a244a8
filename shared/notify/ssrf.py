"""Where an outbound webhook may go: URL rules and address checks (SSRF), at registration and at every attempt.

A tenant's URL is hostile: it may name a loopback, private, link-local (cloud metadata, 169.254.169.254),
multicast or otherwise non-public address, directly or through a name that resolves there — and a name's
answer may change between registration and delivery (DNS rebinding). So the name is resolved again at each
attempt, every address it resolves to must be public, and the request is sent to the address that was
checked (`Target.address`), never to the name again. Redirects are not followed (see webhooks.py).

`allow_insecure` (RR_WEBHOOK_ALLOW_INSECURE, development and tests only) admits plain http and loopback or
private addresses; link-local, multicast and unspecified addresses stay refused even then.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["RefusedTarget", "Resolver", "Target", "address_refusal", "check_url", "resolve_target", "system_resolver"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_URL_LENGTH = 2048
# Cloud metadata services outside the link-local range (AWS's IPv6 one, Alibaba's in the shared range).
_METADATA = frozenset({ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")})


class RefusedTarget(Exception):
    """The URL or an address it resolves to is not allowed; `code` says why (stored with the delivery)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    """A checked destination: connect to `address`, present `host` (Host header, TLS server name)."""

    scheme: str
    host: str  # as in the URL, lower-cased (IDNA-encoded for international names)
    port: int
    path: str  # path and query, at least "/"
    address: str  # the checked IP address to connect to

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def connect_url(self) -> str:
        ip = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{ip}:{self.port}{self.path}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver (getaddrinfo), every address once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def address_refusal(address: Address, *, allow_insecure: bool) -> str | None:
    """Why `address` may not be a webhook destination (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address.is_unspecified:
        return "unspecified address"
    if address.is_multicast:
        return "multicast address"
    if address.is_link_local or address in _METADATA:
        return "link-local or metadata address"
    if allow_insecure:
        return None
    if address.is_loopback:
        return "loopback address"
    if address.is_private or not address.is_global:
        return "private or reserved address"
    return None


def check_url(url: str, *, allow_insecure: bool) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an acceptable URL, or RefusedTarget. No resolution yet."""
    if len(url) > MAX_URL_LENGTH or not url.isascii() or not url.isprintable() or " " in url:
        raise RefusedTarget("invalid_url", "The URL must be printable ASCII without spaces, at most 2048 long.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedTarget("invalid_url", "The URL is malformed.") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and allow_insecure):
        raise RefusedTarget("insecure_url", "Webhook URLs must be https.")
    if parts.username is not None or parts.password is not None:
        raise RefusedTarget("invalid_url", "The URL may not carry credentials.")
    host = (parts.hostname or "").lower()
    if not host or len(host) > 253:
        raise RefusedTarget("invalid_url", "The URL has no host.")
    if not all(c.isalnum() or c in ".-:_" for c in host):
        raise RefusedTarget("invalid_url", "The URL's host is malformed.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


async def resolve_target(url: str, *, allow_insecure: bool, resolver: Resolver = system_resolver) -> Target:
    """Check the URL, resolve its host, check every address; the Target connects to the first one."""
    scheme, host, port, path = check_url(url, allow_insecure=allow_insecure)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if not allow_insecure and (host == "localhost" or host.endswith((".localhost", ".local", ".internal"))):
            raise RefusedTarget("private_address", f"The host {host} is a local name.") from None
        try:
            answers = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise RefusedTarget("unresolvable", f"The host could not be resolved ({type(exc).__name__}).") from None
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answers]
        except ValueError:
            raise RefusedTarget("unresolvable", "The host resolved to a malformed address.") from None
    if not addresses:
        raise RefusedTarget("unresolvable", "The host resolved to no address.")
    for address in addresses:
        # Every answer must pass: a client (or a rebinding resolver) could otherwise be steered to the bad one.
        reason = address_refusal(address, allow_insecure=allow_insecure)
        if reason is not None:
            raise RefusedTarget("private_address", f"The host resolves to a {reason}, which is not allowed.")
    return Target(scheme, host, port, path, str(addresses[0]))
