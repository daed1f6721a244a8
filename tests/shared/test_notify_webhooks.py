"""Outbound webhooks end to end: endpoints registered through the control plane, events from the outbox,
the notify worker run in this process with an injected clock, resolver and random generator, and real
receivers on 127.0.0.1 that verify every signature with the `standardwebhooks` library.

The control plane of this module allows loopback/http endpoints (the development setting) so that the
receivers can be registered; the SSRF tests run the worker with the setting off.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import orjson
import pytest
import pytest_asyncio
from standardwebhooks import Webhook

from shared.crypto import box_from_settings, store_secret
from shared.notify.events import emit
from shared.notify.webhooks import new_signing_secret
from shared.settings import Settings
from shared.workers.notify import NotifyWorker
from tests.conftest import Server
from tests.control_plane.conftest import Account, Portal, start_control_plane
from tests.notify_helpers import Clock, Receiver

BACKOFF = {"webhook_backoff_base_s": 10.0, "webhook_backoff_max_s": 40.0, "webhook_backoff_jitter": 0.0}


@pytest.fixture(scope="module")
def insecure_control_plane(settings: Settings) -> Iterator[Server]:
    server = start_control_plane(settings, webhook_allow_insecure=True)
    yield server
    server.stop()


@pytest_asyncio.fixture
async def dev_portal(insecure_control_plane: Server, settings: Settings) -> AsyncIterator[Portal]:
    async with httpx.AsyncClient(timeout=20.0) as http:
        yield Portal(insecure_control_plane, http, settings)


@pytest_asyncio.fixture(autouse=True)
async def _only_this_tests_events(db) -> None:
    """The session's rr-worker runs without notifications, so every earlier test's events are still pending
    in the shared outbox; set them aside, or one `run_once` (a batch of the oldest) may never reach ours."""
    await db.execute("update event_outbox set dispatched_at = now() where dispatched_at is null")


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def worker(settings: Settings, db, redis, clock: Clock, *, insecure: bool = True, resolver=None,
           **overrides: object) -> NotifyWorker:
    tuned = msgspec.structs.replace(settings, webhook_allow_insecure=insecure, **{**BACKOFF, **overrides})
    options = {"resolver": resolver} if resolver else {}
    return NotifyWorker(tuned, db, redis, clock=clock, rng=random.Random(7), **options)


async def register(portal: Portal, owner: Account, url: str, types: list[str]) -> tuple[int, str]:
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/webhooks", owner,
                                json={"url": url, "event_types": types})
    assert resp.status_code == 201, resp.text
    return resp.json()["endpoint"]["id"], resp.json()["secret"]


async def delivery(db, endpoint_id: int) -> dict:
    rows = await db.fetch("select * from webhook_deliveries where endpoint_id = $1 order by id", endpoint_id)
    assert len(rows) == 1, rows
    return dict(rows[0])


async def test_a_delivery_is_signed_and_verifies_with_the_library(dev_portal: Portal, db, redis, settings,
                                                                  receiver: Receiver) -> None:
    owner = await dev_portal.signup()
    endpoint_id, secret = await register(dev_portal, owner, receiver.url, ["balance.low"])
    assert secret.startswith("whsec_")
    listed = await dev_portal.request("GET", f"/v1/orgs/{owner.org_id}/webhooks/{endpoint_id}", owner)
    assert secret not in listed.text  # shown once
    event_id = await emit(db, owner.org_id, "balance.low", {"balance_micros": 5, "threshold_micros": 10})
    await emit(db, owner.org_id, "key.created", {"key_id": 1})  # not subscribed: not delivered
    clock = Clock()
    await worker(settings, db, redis, clock).run_once()
    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    payload = Webhook(secret).verify(got.body, got.headers)
    assert payload["type"] == "balance.low" and payload["data"]["balance_micros"] == 5
    assert got.headers["webhook-id"] == f"evt_{event_id}" == payload["id"]
    assert int(got.headers["webhook-timestamp"]) == int(clock.now)
    with pytest.raises(Exception):  # noqa: B017 (any verification failure)
        Webhook(new_signing_secret()).verify(got.body, got.headers)
    row = await delivery(db, endpoint_id)
    assert (row["status"], row["attempts"], row["response_status"]) == ("succeeded", 1, 200)
    assert row["latency_ms"] is not None and row["error"] is None
    # The receiver's body is never kept.
    assert "receiver-private-body" not in str(await db.fetch("select * from webhook_deliveries"))


async def test_a_receiver_failing_three_times_gets_the_event_once_more_after_backoff(
    dev_portal: Portal, db, redis, settings, receiver: Receiver,
) -> None:
    receiver.fail_first = 3
    owner = await dev_portal.signup()
    endpoint_id, secret = await register(dev_portal, owner, receiver.url, ["payment.succeeded"])
    await emit(db, owner.org_id, "payment.succeeded", {"payment_id": 1, "credited_micros": 5_000_000})
    clock = Clock()
    w = worker(settings, db, redis, clock)
    await w.run_once()
    assert len(receiver.requests) == 1
    # Retries wait 10, 20, 40 s (base 10, doubling, no jitter): nothing is sent a moment before each is due.
    for wait in (10.0, 20.0, 40.0):
        clock.advance(wait - 0.5)
        before = len(receiver.requests)
        await w.run_once()
        assert len(receiver.requests) == before, f"retried before its {wait} s backoff"
        row = await delivery(db, endpoint_id)
        assert row["status"] == "pending" and row["response_status"] == 500 and row["error"] == "HTTP 500"
        clock.advance(0.5)
        await w.run_once()
        assert len(receiver.requests) == before + 1
    assert len(receiver.requests) == 4
    successes = [r for r in receiver.requests[3:]]
    assert len(successes) == 1 and Webhook(secret).verify(successes[0].body, successes[0].headers)
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1  # one message, four attempts
    clock.advance(3600)
    await w.run_once()
    assert len(receiver.requests) == 4  # exactly once more, and then nothing
    row = await delivery(db, endpoint_id)
    assert (row["status"], row["attempts"], row["response_status"]) == ("succeeded", 4, 200)


async def test_a_delivery_gives_up_after_the_bounded_attempts_and_can_be_replayed(
    dev_portal: Portal, db, redis, settings, receiver: Receiver,
) -> None:
    receiver.fail_first = 10**6
    owner = await dev_portal.signup()
    endpoint_id, secret = await register(dev_portal, owner, receiver.url, ["key.revoked"])
    await emit(db, owner.org_id, "key.revoked", {"key_id": 9})
    clock = Clock()
    w = worker(settings, db, redis, clock, webhook_max_attempts=3)
    for _ in range(6):
        await w.run_once()
        clock.advance(41)
    assert len(receiver.requests) == 3
    row = await delivery(db, endpoint_id)
    assert (row["status"], row["attempts"]) == ("failed", 3) and row["completed_at"] is not None
    receiver.fail_first = 0
    receiver.requests.clear()
    resp = await dev_portal.request("POST", f"/v1/orgs/{owner.org_id}/webhook-deliveries/{row['id']}/replay", owner)
    assert resp.status_code == 202, resp.text
    assert resp.json()["replay_of"] == row["id"] and resp.json()["status"] == "pending"
    clock.now = max(clock.now, __import__("time").time()) + 1
    await w.run_once()
    assert len(receiver.requests) == 1
    Webhook(secret).verify(receiver.requests[0].body, receiver.requests[0].headers)
    listed = await dev_portal.request("GET", f"/v1/orgs/{owner.org_id}/webhook-deliveries", owner,
                                      params={"endpoint_id": endpoint_id})
    assert [d["status"] for d in listed.json()["data"]] == ["succeeded", "failed"]
    audit = await db.fetch("select action from audit_log where org_id = $1 order by id", owner.org_id)
    assert {"webhook_endpoint.create", "webhook_delivery.replay"} <= {a["action"] for a in audit}


async def test_rotation_sends_both_signatures_until_the_overlap_ends(
    dev_portal: Portal, db, redis, settings, receiver: Receiver,
) -> None:
    owner = await dev_portal.signup()
    endpoint_id, old_secret = await register(dev_portal, owner, receiver.url, ["usage.daily", "key.created"])
    resp = await dev_portal.request("POST", f"/v1/orgs/{owner.org_id}/webhooks/{endpoint_id}/rotate-secret", owner,
                                    json={"overlap_s": 3600})
    assert resp.status_code == 200, resp.text
    new_secret = resp.json()["secret"]
    assert new_secret != old_secret and resp.json()["endpoint"]["previous_secret_expires_at"]
    await emit(db, owner.org_id, "key.created", {"key_id": 3})
    clock = Clock()
    w = worker(settings, db, redis, clock)
    await w.run_once()
    got = receiver.requests[-1]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old_secret).verify(got.body, got.headers)
    Webhook(new_secret).verify(got.body, got.headers)
    # Rotating again with no overlap: only the newest secret signs from now on.
    resp = await dev_portal.request("POST", f"/v1/orgs/{owner.org_id}/webhooks/{endpoint_id}/rotate-secret", owner,
                                    json={"overlap_s": 0})
    newest = resp.json()["secret"]
    await emit(db, owner.org_id, "key.created", {"key_id": 4})
    await w.run_once()
    got = receiver.requests[-1]
    assert len(got.headers["webhook-signature"].split(" ")) == 1
    Webhook(newest).verify(got.body, got.headers)
    with pytest.raises(Exception):  # noqa: B017
        Webhook(new_secret).verify(got.body, got.headers)
    # The rotated-out secrets are gone from the secrets table.
    assert await db.fetchval("select count(*) from secrets where org_id = $1 and kind = 'webhook_signing_secret'",
                             owner.org_id) == 1


# --- SSRF -------------------------------------------------------------------------------------------------


async def _raw_endpoint(db, settings: Settings, org_id: int, url: str) -> int:
    """An endpoint stored as if its URL had passed the check at registration (its name resolved elsewhere
    then, or the rules changed since): the worker must refuse it on its own."""
    box = box_from_settings(settings.master_key_bytes, settings.master_key_id)
    secret_id = await store_secret(db, box, "webhook_signing_secret", new_signing_secret(), org_id=org_id)
    return await db.fetchval(
        """insert into webhook_endpoints (org_id, url, event_types, secret_id) values ($1, $2, '{balance.low}', $3)
           returning id""", org_id, url, secret_id)


async def test_ssrf_targets_are_refused_at_the_attempt_and_recorded(db, redis, settings, factory,
                                                                    receiver: Receiver) -> None:
    org = await factory.org()
    port = receiver.port
    # A test resolver: "rebound.example" resolved to a public address when it was registered and to a
    # private one now; "mixed.example" answers one public and one private address.
    answers = {"rebound.example": ["10.0.0.1"], "mixed.example": ["93.184.215.14", "127.0.0.1"],
               "v6.example": ["::ffff:127.0.0.1"]}

    async def resolver(host: str, _port: int) -> list[str]:
        return answers[host]

    urls = {
        "loopback": f"https://127.0.0.1:{port}/hook", "v6 loopback": f"https://[::1]:{port}/hook",
        "metadata": "https://169.254.169.254/latest/meta-data/", "rebound": f"https://rebound.example:{port}/",
        "mixed": f"https://mixed.example:{port}/", "mapped": f"https://v6.example:{port}/",
        "plain http": f"http://93.184.215.14:{port}/", "localhost": f"https://localhost:{port}/",
    }
    endpoints = {name: await _raw_endpoint(db, settings, org, url) for name, url in urls.items()}
    await emit(db, org, "balance.low", {"balance_micros": 1, "threshold_micros": 2})
    await worker(settings, db, redis, Clock(), insecure=False, resolver=resolver).run_once()
    assert receiver.requests == []  # nothing connected anywhere
    for name, endpoint_id in endpoints.items():
        row = await delivery(db, endpoint_id)
        assert row["status"] == "refused", (name, row)
        assert row["attempts"] == 1 and row["response_status"] is None and row["completed_at"] is not None
        expected = "insecure_url" if name == "plain http" else "private_address"
        assert row["error"].startswith(expected), (name, row["error"])


async def test_a_redirect_is_not_followed(dev_portal: Portal, db, redis, settings) -> None:
    target = await Receiver().start()  # where the redirect points: must never be reached
    redirector = await Receiver(redirect_to=f"http://127.0.0.1:{target.port}/internal").start()
    try:
        owner = await dev_portal.signup()
        endpoint_id, _ = await register(dev_portal, owner, redirector.url, ["balance.low"])
        await emit(db, owner.org_id, "balance.low", {"balance_micros": 1, "threshold_micros": 2})
        clock = Clock()
        w = worker(settings, db, redis, clock)
        await w.run_once()
        clock.advance(3600)
        await w.run_once()
        assert len(redirector.requests) == 1 and target.requests == []
        row = await delivery(db, endpoint_id)
        assert (row["status"], row["response_status"], row["error"]) == ("refused", 307, "redirect not followed")
    finally:
        await target.stop()
        await redirector.stop()


async def test_an_event_body_holds_the_event_and_nothing_else(dev_portal: Portal, db, redis, settings,
                                                              receiver: Receiver) -> None:
    owner = await dev_portal.signup()
    await register(dev_portal, owner, receiver.url, ["payment.failed"])
    await emit(db, owner.org_id, "payment.failed", {"payment_id": 5, "method": "crypto", "reason": "wrong chain"})
    await worker(settings, db, redis, Clock()).run_once()
    body = orjson.loads(receiver.requests[-1].body)
    assert set(body) == {"id", "type", "timestamp", "org_id", "data"}
    assert body["org_id"] == owner.org_id and body["data"] == {"payment_id": 5, "method": "crypto",
                                                                "reason": "wrong chain"}
