"""Outbound webhooks: Standard Webhooks signatures, the retry schedule, and one delivery attempt.

Signing is the `standardwebhooks` library's (HMAC-SHA256 over "id.timestamp.body", `v1,<base64>`); during a
secret rotation the header carries one signature per live secret, space-separated, as the scheme defines,
so a receiver that knows either secret verifies. `webhook-id` is the event's id (`evt_<outbox id>`), the same
across retries and replays, so a receiver can drop what it already handled.

An attempt connects to the address the SSRF check approved (ssrf.Target), with the URL's host as Host header
and TLS server name (the certificate is verified against it); it follows no redirect (a 3xx is refused: the
Location could point anywhere), reads no byte of the receiver's body, and uses a fresh connection each time
(a pooled connection opened for one name must not carry a request for another name on the same address).
"""

from __future__ import annotations

import base64
import datetime
import random
import secrets
import time
from dataclasses import dataclass

import httpx
import orjson
from standardwebhooks import Webhook

from shared.notify.ssrf import Target

__all__ = ["AttemptResult", "attempt_delivery", "backoff_delay", "event_body", "message_id", "new_signing_secret",
           "sign_headers"]

SECRET_PREFIX = "whsec_"
USER_AGENT = "RocketRelay-Webhooks/1"


def new_signing_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def message_id(event_id: int) -> str:
    return f"evt_{event_id}"


def event_body(event_id: int, event_type: str, created_at: datetime.datetime, org_id: int, data: dict) -> bytes:
    """The delivered JSON: the Standard Webhooks envelope around the event's own data."""
    return orjson.dumps({"id": message_id(event_id), "type": event_type,
                         "timestamp": created_at.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z"),
                         "org_id": org_id, "data": data})


def sign_headers(signing_secrets: list[str], msg_id: str, at: datetime.datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers; one signature per secret (current first)."""
    text = body.decode()
    signatures = " ".join(Webhook(s).sign(msg_id, at, text) for s in signing_secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signatures}


def backoff_delay(retry: int, *, base_s: float, max_s: float, jitter: float, rng: random.Random) -> float:
    """Seconds before retry number `retry` (1 for the first retry): base × 2^(retry-1), capped, then spread by
    ±jitter at random so that receivers coming back up are not hit by every sender at once."""
    if retry < 1:
        raise ValueError("retry counts from 1")
    delay = min(max_s, base_s * 2.0 ** min(retry - 1, 60))
    return delay * (1.0 + rng.uniform(-jitter, jitter))


@dataclass(frozen=True, slots=True)
class AttemptResult:
    outcome: str  # "succeeded", "retry" (try again later) or "refused" (final: never retried)
    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = None  # an error class, never text from the receiver


async def attempt_delivery(target: Target, headers: dict[str, str], body: bytes, *, timeout_s: float) -> AttemptResult:
    """POST `body` to the checked target once; the receiver's answer is judged by its status alone."""
    request_headers = {**headers, "host": target.host_header, "content-type": "application/json",
                       "user-agent": USER_AGENT}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    limits = httpx.Limits(max_keepalive_connections=0)
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False,
                                     limits=limits) as client:
            request = client.build_request("POST", target.connect_url, headers=request_headers, content=body,
                                           extensions=extensions)
            response = await client.send(request, stream=True)
            await response.aclose()  # the body is the receiver's business: not read, not stored
    except httpx.TimeoutException:
        return AttemptResult("retry", None, _ms(started), "timeout")
    except httpx.HTTPError as exc:
        return AttemptResult("retry", None, _ms(started), f"connection error ({type(exc).__name__})")
    latency = _ms(started)
    status = response.status_code
    if 200 <= status < 300:
        return AttemptResult("succeeded", status, latency)
    if 300 <= status < 400:
        return AttemptResult("refused", status, latency, "redirect not followed")
    return AttemptResult("retry", status, latency, f"HTTP {status}")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
