"""Payments as units: exact cents ↔ micros, the crypto formats under generated input, webhook verification
under hostile input (only `BadWebhook`, never another exception), event reduction keeping our ids only."""

from __future__ import annotations

import json
import time

import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.payments.ledger import NotWholeCents, cents_to_micros, micros_to_cents
from shared.payments.networks import NETWORKS, InvalidTransfer, keccak256, validate_transfer
from shared.payments.stripe_events import BadWebhook, reduce_event, verify_event
from shared.payments.stripe_events import _share as share

SECRET = "whsec_unit_test_secret"


def test_keccak256_known_vectors() -> None:
    assert keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keccak256(b"abc").hex() == "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"
    assert len(keccak256(b"x" * 1000)) == 32  # several blocks


@given(st.integers(min_value=0, max_value=2**50))
def test_cents_and_micros_convert_exactly(cents: int) -> None:
    assert micros_to_cents(cents_to_micros(cents)) == cents


@given(st.integers(min_value=1, max_value=2**50).filter(lambda m: m % 10_000))
def test_a_fraction_of_a_cent_is_refused(micros: int) -> None:
    with pytest.raises(NotWholeCents):
        micros_to_cents(micros)


@given(credited=st.integers(1, 10**12), whole=st.integers(1, 10**6), parts=st.lists(st.integers(1, 10**6), max_size=6))
def test_refund_shares_never_exceed_what_was_credited(credited: int, whole: int, parts: list[int]) -> None:
    levels = sorted({min(p, whole) for p in parts})
    debits = [share(credited, b, whole) - share(credited, a, whole) for a, b in zip([0, *levels], levels, strict=False)]
    assert all(d >= 0 for d in debits) and sum(debits) <= credited
    if levels and levels[-1] == whole:
        assert sum(debits) == credited  # refunded in full: exactly what was credited comes back


@settings(max_examples=300)
@given(network=st.sampled_from([*NETWORKS, "x", ""]), tx_hash=st.text(max_size=80), sender=st.text(max_size=80))
def test_validate_transfer_refuses_with_invalid_transfer_only(network: str, tx_hash: str, sender: str) -> None:
    try:
        transfer = validate_transfer(network, tx_hash, sender)
    except InvalidTransfer as exc:
        assert exc.field in ("network", "tx_hash", "sender_address")
        return
    assert len(transfer.tx_hash) == 64 and transfer.tx_hash == transfer.tx_hash.lower()


def _signed(payload: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(payload.decode(), secret, timestamp)


def _event(**obj) -> bytes:
    return json.dumps({"id": "evt_1", "type": "checkout.session.completed", "created": int(time.time()),
                       "data": {"object": {"id": "cs_1", **obj}}}).encode()


def test_verify_accepts_a_fresh_signature_and_refuses_stale_or_foreign_ones() -> None:
    payload = _event()
    assert verify_event(payload, _signed(payload), SECRET, 300)["id"] == "evt_1"
    for header in (_signed(payload, timestamp=int(time.time()) - 301), _signed(payload, secret="whsec_other"), "",
                   None, "t=1", "v1=abc", "t=x,v1=y", "t=99999999999999999999999,v1=" + "0" * 64):
        with pytest.raises(BadWebhook):
            verify_event(payload, header, SECRET, 300)


@settings(max_examples=200)
@given(body=st.binary(max_size=300), header=st.text(max_size=200))
def test_verify_raises_only_bad_webhook_on_hostile_input(body: bytes, header: str) -> None:
    with pytest.raises(BadWebhook):
        verify_event(body, header, SECRET, 300)


@settings(max_examples=200)
@given(obj=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                    max_size=4), max_leaves=20))
def test_a_correctly_signed_event_of_any_shape_is_reduced_or_refused_cleanly(obj: object) -> None:
    payload = json.dumps({"id": "evt_2", "type": "charge.refunded", "created": 1, "data": {"object": obj}}).encode()
    try:
        event = verify_event(payload, _signed(payload), SECRET, 10**10)
    except BadWebhook:
        return
    facts = reduce_event(event)
    assert all(v is None or isinstance(v, str | int | dict) for v in facts.values())


def test_reduction_keeps_our_ids_and_amounts_not_personal_data() -> None:
    event = {"id": "evt_3", "type": "checkout.session.completed", "created": 1, "data": {"object": {
        "id": "cs_1", "mode": "payment", "payment_status": "paid", "amount_total": 1000, "currency": "usd",
        "customer": "cus_1", "payment_intent": {"id": "pi_1", "object": "payment_intent"},
        "customer_details": {"email": "a@example.com", "name": "A", "address": {"line1": "x"}},
        "metadata": {"rr_org_id": "5", "rr_payment_id": "9", "vip": "yes"}}}}
    assert reduce_event(event) == {
        "object_id": "cs_1", "currency": "usd", "customer": "cus_1", "status": None, "mode": "payment",
        "payment_status": "paid", "amount_cents": 1000, "payment_intent": "pi_1", "subscription": None,
        "metadata": {"rr_org_id": "5", "rr_payment_id": "9"}}
