"""Who is calling: the signed-in user, their role in the org the path names, and their client address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["ClientAddress", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int
    email: str
    is_platform_admin: bool
    session_id: str
    ip: str | None
    scope: str  # the scope of the action being done: "user", "platform" or "org"
    org_id: int | None = None  # for org actions: the path's org
    role: str | None = None  # for org actions: the caller's role in it

    @property
    def actor_role(self) -> str:
        """How the audit log names the capacity the caller acted in."""
        if self.scope == "platform":
            return "platform_admin"
        return self.role or "user"


class ClientAddress:
    """The client IP: the socket peer, or — only from a trusted peer — the configured forwarding header
    (the same rule as the proxy's: the rightmost entry is what our own load balancer appended)."""

    __slots__ = ("_trusted", "header")

    def __init__(self, header: str, trusted_cidrs: str) -> None:
        self.header = header.lower()
        self._trusted = [ipaddress.ip_network(c.strip(), strict=False) for c in trusted_cidrs.split(",") if c.strip()]

    def resolve(self, peer: str | None, headers: object) -> str | None:
        if peer is not None:
            try:
                peer = str(ipaddress.ip_address(peer))
            except ValueError:
                peer = None
        if not (self.header and peer and any(ipaddress.ip_address(peer) in n for n in self._trusted)):
            return peer
        forwarded = headers.get(self.header)  # type: ignore[attr-defined]
        if not forwarded:
            return peer
        try:
            return str(ipaddress.ip_address(forwarded.rsplit(",", 1)[-1].strip()))
        except ValueError:
            return peer
