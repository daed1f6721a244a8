"""The OpenAPI document: served, valid OpenAPI 3.1, complete — and schemathesis, run against a live control
plane (on a database of its own, since it creates and changes things at random), finds no 5xx and no
response that contradicts the document."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import schemathesis

from control_plane.seed import ensure_platform_admin
from shared.crypto import box_from_settings
from shared.payments.stripe_account import save_stripe_config
from shared.settings import Settings
from tests.conftest import Server
from tests.control_plane.conftest import (
    LOCAL_STRIPE_KEY,
    LOCAL_WEBHOOK_SECRET,
    PASSWORD,
    isolated_database,
    start_control_plane,
)
from tests.control_plane.test_permissions import ENDPOINTS

SCHEMATHESIS_CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "ignored_auth",
])
SCHEMATHESIS_MAX_EXAMPLES = 10  # per operation and phase: ~2,500 requests, well under a minute


def test_openapi_document_is_served_valid_and_complete(control_plane: Server) -> None:
    resp = httpx.get(control_plane.url + "/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    with pytest.raises(Exception):  # noqa: B017 - the validator really rejects a broken document
        schemathesis.openapi.from_dict({**doc, "paths": {"/x": {"get": {"responses": "nope"}}}}).validate()

    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    # Not API operations: the document itself, and the scraper's /metrics (docs/metrics.md).
    served = {(p.replace(":int", "").replace(":str", ""), m) for p, m, _ in ENDPOINTS
              if p not in ("/openapi.json", "/metrics")}
    assert served == documented
    assert doc["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = {code: r for code, r in op["responses"].items() if code.startswith("4")}
            assert errors and all(r["content"]["application/json"]["schema"] == error_ref for r in errors.values())
            public = "security" not in op
            assert public == (path in ("/healthz", "/readyz", "/v1/webhooks/stripe") or (path.startswith("/v1/auth/")
                              and path not in ("/v1/auth/logout", "/v1/auth/password"))), (method, path)
            if not public:
                assert "401" in errors, (method, path)
    # Money is integer micro-units everywhere, never a float.
    for name, schema in doc["components"]["schemas"].items():
        for field, prop in schema.get("properties", {}).items():
            if field.endswith("_micros"):
                types = {prop.get("type")} | {o.get("type") for o in prop.get("oneOf", ())}
                assert "integer" in types and "number" not in types, (name, field)
    assert httpx.get(control_plane.url + "/docs").status_code == 200


async def _use_local_stripe(settings: Settings, api_base: str) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await save_stripe_config(conn, box_from_settings(settings.master_key_bytes, settings.master_key_id),
                                     secret_key=LOCAL_STRIPE_KEY, webhook_secret=LOCAL_WEBHOOK_SECRET,
                                     api_base=api_base)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def fuzz_target(servers: tuple[str, str], settings: Settings,
                local_stripe_server: Server) -> Iterator[tuple[Server, str]]:
    """A control plane on a fresh database and Redis prefix of its own, with the local Stripe as its Stripe
    account, and a platform admin's access token."""
    with isolated_database(servers[0], settings, "fuzz") as isolated:
        email = f"fuzz-{secrets.token_hex(3)}@example.com"
        asyncio.run(ensure_platform_admin(isolated, email, PASSWORD))
        asyncio.run(_use_local_stripe(isolated, local_stripe_server.url))
        server = start_control_plane(isolated)
        try:
            resp = httpx.post(server.url + "/v1/auth/login", json={"email": email, "password": PASSWORD})
            assert resp.status_code == 200, resp.text
            yield server, resp.json()["access_token"]
        finally:
            server.stop()


def test_schemathesis_finds_no_server_errors_or_schema_violations(fuzz_target: tuple[Server, str],
                                                                 tmp_path: Path) -> None:
    server, token = fuzz_target
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
         "run", server.url + "/openapi.json",
         "--header", f"Authorization: Bearer {token}",
         "--checks", SCHEMATHESIS_CHECKS,
         "--max-examples", str(SCHEMATHESIS_MAX_EXAMPLES),
         "--seed", os.environ.get("RR_SCHEMATHESIS_SEED", "20261126"),
         # Logging out would end the session every later request authenticates with.
         "--exclude-path", "/v1/auth/logout",
         # Random Stripe settings would point the platform at servers that do not exist, after which every
         # card payment is a 502 by design (the settings endpoint is in the role matrix and its own tests).
         "--exclude-path", "/v1/admin/stripe",
         # Random SMTP settings would have the test mail connect to hosts off this machine (the settings have
         # their own tests; the test mail is fuzzed against no settings).
         "--exclude-path", "/v1/admin/mail/settings",
         "--workers", "1", "--request-timeout", "10", "--no-color"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,  # its state and report folders go there, not into the work tree
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:] + "\n--- control plane log ---\n" + server.log()[-3000:]
    assert " passed" in output  # the run is bounded by the subprocess timeout, not by a timed assertion
    assert "Traceback" not in server.log() and "unhandled" not in server.log()
