"""Every Redis key of the control plane, in one place; all under the deployment's `RR_REDIS_PREFIX`.

The billing and API-key names it also touches live in `shared.redis_keys`. Emails never appear in key
names: login counters are keyed by a hash of the lower-cased address.
"""

from __future__ import annotations

import hashlib

__all__ = ["ControlPlaneKeys"]


class ControlPlaneKeys:
    """Key builders bound to one prefix; built once per process."""

    __slots__ = ("prefix",)

    def __init__(self, redis_prefix: str) -> None:
        self.prefix = f"{redis_prefix}cp:"

    def session(self, family_id: str) -> str:
        """One refresh-session family: hash {user, cur (hash of the live token), u:<hash> of rotated ones}."""
        return f"{self.prefix}sess:{family_id}"

    def user_sessions(self, user_id: int) -> str:
        """Set of the session family ids of one user (to end them all on a password change)."""
        return f"{self.prefix}usess:{user_id}"

    # Login failure counters, one per fixed window (`window` is its index: unix time // window length).
    def login_failures_ip(self, ip: str, window: int) -> str:
        return f"{self.prefix}loginfail:ip:{ip}:{window}"

    def login_failures_email(self, email: str, window: int) -> str:
        return f"{self.prefix}loginfail:email:{_email_digest(email)}:{window}"

    def login_failures_ip_email(self, ip: str, email: str, window: int) -> str:
        return f"{self.prefix}loginfail:pair:{ip}:{_email_digest(email)}:{window}"


def _email_digest(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
