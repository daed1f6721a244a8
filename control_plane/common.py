"""What every controller shares: the controller-level dependencies and the constrained wire types.

Constraints live in the types (msgspec `Meta`), so decoding a request *is* validating it, and the OpenAPI
document states the same limits the server enforces. Ids and money stay within ±2^53 so that clients that
read JSON numbers as doubles (browsers) see them exactly; every money field is integer micro-units.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request
from litestar.di import NamedDependency, Provide
from litestar.params import Parameter

from control_plane.principal import Principal
from control_plane.state import MAX_ID, ControlPlane

__all__ = [
    "CP",
    "DEPENDENCIES",
    "VISIBLE_ASCII",
    "Caller",
    "Credential",
    "Email",
    "IdParam",
    "LimitParam",
    "Micros",
    "NonNegMicros",
    "PerMinute",
    "PositiveId",
    "WireName",
    "mask_secret",
    "set_fields",
    "utc",
]

# Values that end up in an upstream request's header lines or body (credentials, upstream model names):
# visible ASCII only, so no stored value can add a CR/LF (a header line or a whole second request) or a byte
# the proxy could not send. The proxy checks again when it sends (proxy/h1.py).
# `(?!\n)`: Python's `$` also matches before a final newline, which would let "key\n" through.
VISIBLE_ASCII = r"^[\x21-\x7e]+$(?!\n)"
Credential = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=VISIBLE_ASCII)]
WireName = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=VISIBLE_ASCII)]


def _provide_cp(request: Request) -> ControlPlane:
    return request.app.state.cp


def _provide_principal(request: Request) -> Principal:
    return request.state.principal


# Declared on each controller: `cp` is the process's ControlPlane, `principal` the caller the guard admitted.
DEPENDENCIES = {
    "cp": Provide(_provide_cp, sync_to_thread=False),
    "principal": Provide(_provide_principal, sync_to_thread=False),
}

CP = NamedDependency[ControlPlane]  # a handler parameter `cp: CP` receives the process's ControlPlane
Caller = NamedDependency[Principal]  # `principal: Caller` receives the caller admitted by the guard

PositiveId = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
IdParam = Annotated[int, Parameter(ge=1, le=MAX_ID)]
LimitParam = Annotated[int, Parameter(ge=1, le=200, description="Page size.")]
Micros = Annotated[int, msgspec.Meta(ge=-MAX_ID, le=MAX_ID, description="Micro-units: 1 USD = 1,000,000.")]
NonNegMicros = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID, description="Micro-units: 1 USD = 1,000,000.")]
PerMinute = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Email = Annotated[str, msgspec.Meta(min_length=3, max_length=254,
                                    pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$(?!\n)")]


def utc(value: datetime.datetime) -> datetime.datetime:
    """An aware datetime; a naive one is taken to be UTC."""
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value


def set_fields(patch: msgspec.Struct) -> dict[str, Any]:
    """The fields a PATCH body actually carries (UNSET ones left out; an explicit null kept)."""
    return {f: v for f in patch.__struct_fields__ if (v := getattr(patch, f)) is not msgspec.UNSET}


def mask_secret(secret: str) -> str:
    """What a response may show of a credential: its first three and last four characters, if it is long
    enough that this reveals nothing useful (`sk-…abcd`); otherwise nothing but an ellipsis."""
    return f"{secret[:3]}…{secret[-4:]}" if len(secret) >= 16 else "…"
