"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get

from control_plane.common import CP, DEPENDENCIES
from control_plane.errors import ApiError
from control_plane.permissions import require


class Status(msgspec.Struct, frozen=True):
    status: str


class NotReady(ApiError):
    status = 503
    code = "not_ready"


class HealthController(Controller):
    dependencies = DEPENDENCIES
    tags = ("health",)

    @get("/healthz", guards=[require("public")])
    async def healthz(self) -> Status:
        """The process is up."""
        return Status("ok")

    @get("/readyz", guards=[require("public")])
    async def readyz(self, cp: CP) -> Status:
        """PostgreSQL and Redis answer."""
        try:
            await cp.pool.fetchval("select 1")
            await cp.redis.ping()
        except Exception as exc:
            raise NotReady(f"A backing service is unreachable ({type(exc).__name__}).") from None
        return Status("ok")

    @get("/openapi.json", guards=[require("public")], include_in_schema=False)
    async def openapi(self, request: Request) -> dict[str, Any]:
        """This API's OpenAPI 3.1 document."""
        return request.app.openapi_schema.to_schema()
