"""Crypto top-ups: formats per network, one claim per transaction hash across all orgs, a review by platform
admins only, and an approval that credits exactly once (also when two admins approve at the same moment)."""

from __future__ import annotations

import asyncio
import secrets

import pytest_asyncio

from shared.billing import BillingScripts, rebuild_balance
from shared.redis_keys import RedisKeys
from tests.control_plane.conftest import Account, Portal
from tests.invariants import OrgExpectation, assert_money_invariants

ETH_SENDER = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55 checksummed
TRON_SENDER = "TR7NHqjeKQxGTCi8q8ZY4pL8otSzgjLj6t"
BTC_SENDERS = ("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy",
               "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
               "bc1p5d7rjq7g6rdk2yhzks9smlaqtedr4dekq08ge8ztwac72sfr9rusxg3297")


def _hash(prefix: str = "0x") -> str:
    return prefix + secrets.token_hex(32)


@pytest_asyncio.fixture
async def claimant(portal: Portal, db, redis, settings) -> Account:
    owner = await portal.signup(org_name="Crypto payer")
    await rebuild_balance(db, BillingScripts(redis), RedisKeys(settings.redis_prefix, settings.billing_shards),
                          owner.org_id)
    return owner


async def _claim(portal: Portal, who: Account, org_id: int, **body):
    body = {"network": "ethereum", "tx_hash": _hash(), "sender_address": ETH_SENDER, "amount_micros": 50_000_000,
            **body}
    return await portal.request("POST", f"/v1/orgs/{org_id}/payments/crypto", who, json=body)


async def test_formats_are_checked_per_network(portal: Portal, claimant: Account) -> None:
    ok = [("ethereum", _hash(), ETH_SENDER), ("polygon", _hash().upper().replace("0X", "0x"), ETH_SENDER.lower()),
          ("tron", _hash(""), TRON_SENDER), *(("bitcoin", _hash(""), a) for a in BTC_SENDERS)]
    for network, tx_hash, sender in ok:
        resp = await _claim(portal, claimant, claimant.org_id, network=network, tx_hash=tx_hash, sender_address=sender)
        assert resp.status_code == 201, (network, resp.text)
        body = resp.json()
        assert body["status"] == "pending" and body["chain_check"] == "unverified"
        assert body["crypto_tx_hash"] == tx_hash.lower().removeprefix("0x")
    bad = [
        ({"network": "dogecoin"}, "invalid_request"),  # not in the enum of the schema
        ({"tx_hash": _hash("")}, "invalid_tx_hash"),  # Ethereum hashes have 0x
        ({"tx_hash": "0x" + "ab" * 31}, "invalid_tx_hash"),
        ({"tx_hash": "0x" + "0" * 64}, "invalid_tx_hash"),
        ({"sender_address": ETH_SENDER[:-1] + "D"}, "invalid_sender_address"),  # checksum broken
        ({"network": "tron", "tx_hash": _hash(""), "sender_address": TRON_SENDER[:-1] + "u"}, "invalid_sender_address"),
        ({"network": "tron", "tx_hash": _hash(""), "sender_address": ETH_SENDER}, "invalid_sender_address"),
        ({"network": "bitcoin", "tx_hash": _hash(""), "sender_address": BTC_SENDERS[2][:-1] + "r"},
         "invalid_sender_address"),
        ({"network": "bitcoin", "tx_hash": _hash(""), "sender_address": BTC_SENDERS[0][:-1] + "b"},
         "invalid_sender_address"),
        ({"amount_micros": 0}, "amount_out_of_bounds"),
    ]
    for change, code in bad:
        resp = await _claim(portal, claimant, claimant.org_id, **change)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == code, (change, resp.text)
    for change in ({"tx_hash": "0x" + "ab" * 32 + "\n"}, {"sender_address": ETH_SENDER + "\r\nX: y"},
                   {"amount_micros": 1.5}, {"network": None}):
        resp = await _claim(portal, claimant, claimant.org_id, **change)
        assert resp.status_code in (400, 422), (change, resp.text)


async def test_a_transaction_hash_is_claimed_once_across_orgs(portal: Portal, claimant: Account) -> None:
    other = await portal.signup(org_name="Another crypto payer")
    tx_hash = _hash()
    assert (await _claim(portal, claimant, claimant.org_id, tx_hash=tx_hash)).status_code == 201
    for who, tx in ((claimant, tx_hash), (other, tx_hash), (other, tx_hash.upper().replace("0X", "0x")),
                    (other, tx_hash)):
        resp = await _claim(portal, who, who.org_id, tx_hash=tx)
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "tx_hash_taken", resp.text
    # The same 64 digits claimed on another network are the same claim.
    resp = await _claim(portal, other, other.org_id, network="tron", tx_hash=tx_hash[2:], sender_address=TRON_SENDER)
    assert resp.status_code == 409


async def test_approval_credits_once_and_the_org_sees_it(portal: Portal, claimant: Account, db, redis,
                                                          settings) -> None:
    admins = [await portal.platform_admin(), await portal.platform_admin()]
    payment = (await _claim(portal, claimant, claimant.org_id, amount_micros=50_000_000)).json()
    approve = f"/v1/admin/payments/{payment['id']}/approve"
    # Two admins approve at the same moment, and then again: one credit.
    results = await asyncio.gather(*(portal.request("POST", approve, a, json={"amount_micros": 49_500_000,
                                                                            "note": "49.5 USDT arrived"})
                                     for a in admins * 2))
    assert sorted(r.status_code for r in results) == [200, 409, 409, 409]
    assert {r.json()["error"]["code"] for r in results if r.status_code == 409} == {"already_reviewed"}
    ledger = await db.fetch("select kind, amount_micros, external_id from balance_transactions where org_id = $1",
                            claimant.org_id)
    assert [tuple(r) for r in ledger] == [("topup", 49_500_000, f"crypto:{payment['crypto_tx_hash']}")]
    reject = await portal.request("POST", f"/v1/admin/payments/{payment['id']}/reject", admins[0],
                                  json={"reason": "too late"})
    assert reject.status_code == 409
    seen = (await portal.request("GET", f"/v1/orgs/{claimant.org_id}/payments/{payment['id']}", claimant)).json()
    assert (seen["status"], seen["credited_micros"], seen["review_reason"]) == ("approved", 49_500_000,
                                                                                "49.5 USDT arrived")
    receipt = await portal.request("GET", f"/v1/orgs/{claimant.org_id}/payments/{payment['id']}/receipt", claimant)
    assert receipt.status_code == 200 and receipt.json()["paid_micros"] == 49_500_000
    actions = [r["action"] for r in await db.fetch(
        "select action from audit_log where target_type = 'payment' and target_id = $1 order by id",
        str(payment["id"]))]
    assert actions == ["crypto_payment.submit", "crypto_payment.approve"]
    await assert_money_invariants(db, redis, settings, {claimant.org_id: OrgExpectation()}, timeout=5.0)


async def test_rejected_stays_rejected(portal: Portal, claimant: Account, db) -> None:
    admin = await portal.platform_admin()
    payment = (await _claim(portal, claimant, claimant.org_id)).json()
    resp = await portal.request("POST", f"/v1/admin/payments/{payment['id']}/reject", admin,
                                json={"reason": "no such transfer on chain"})
    assert resp.status_code == 200 and resp.json()["status"] == "rejected"
    for path, body in (("approve", {"amount_micros": 50_000_000}), ("reject", {"reason": "again"})):
        resp = await portal.request("POST", f"/v1/admin/payments/{payment['id']}/{path}", admin, json=body)
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "already_reviewed"
    again = await _claim(portal, claimant, claimant.org_id, tx_hash="0x" + payment["crypto_tx_hash"])
    assert again.status_code == 409
    seen = (await portal.request("GET", f"/v1/orgs/{claimant.org_id}/payments/{payment['id']}", claimant)).json()
    assert (seen["status"], seen["review_reason"], seen["credited_micros"]) == ("rejected", "no such transfer on chain",
                                                                                0)
    receipt = await portal.request("GET", f"/v1/orgs/{claimant.org_id}/payments/{payment['id']}/receipt", claimant)
    assert receipt.status_code == 409
    assert not await db.fetchval("select count(*) from balance_transactions where org_id = $1", claimant.org_id)
    assert await db.fetchval("select count(*) from audit_log where action = 'crypto_payment.reject' and target_id = $1",
                             str(payment["id"])) == 1


async def test_only_platform_admins_review(portal: Portal, claimant: Account, db) -> None:
    payment = (await _claim(portal, claimant, claimant.org_id)).json()
    billing = await portal.member(claimant, claimant.org_id, "billing")
    for who in (claimant, billing):
        for path, body in (("approve", {"amount_micros": 50_000_000}), ("reject", {"reason": "x"})):
            resp = await portal.request("POST", f"/v1/admin/payments/{payment['id']}/{path}", who, json=body)
            assert resp.status_code == 403, resp.text
    resp = await portal.request("POST", f"/v1/admin/payments/{payment['id']}/approve", None,
                                json={"amount_micros": 50_000_000})
    assert resp.status_code == 401
    assert (await db.fetchval("select status from payments where id = $1", payment["id"])) == "pending"
    # A viewer sees the claim but can't make one, nor read its receipt.
    viewer = await portal.member(claimant, claimant.org_id, "viewer")
    assert (await portal.request("GET", f"/v1/orgs/{claimant.org_id}/payments", viewer)).status_code == 200
    assert (await _claim(portal, viewer, claimant.org_id)).status_code == 403
