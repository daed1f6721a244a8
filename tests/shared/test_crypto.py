"""Envelope encryption: round trip, and loud failure on tampering, moved rows and wrong keys."""

from __future__ import annotations

import os
import uuid

import pytest

from shared.crypto import DecryptionError, SecretBox


def _box(key_id: str = "k1", key: bytes | None = None) -> SecretBox:
    return SecretBox({key_id: key or os.urandom(32)}, key_id)


def test_round_trip_and_fresh_data_key_each_time() -> None:
    box = _box()
    sid = uuid.uuid4()
    key_id, wrapped, ct = box.seal(sid, "provider_credential", b"sk-secret")
    assert box.open(sid, "provider_credential", key_id, wrapped, ct) == b"sk-secret"
    _, wrapped2, ct2 = box.seal(sid, "provider_credential", b"sk-secret")
    assert wrapped2 != wrapped and ct2 != ct
    assert b"sk-secret" not in ct


def test_tampered_moved_or_wrongly_keyed_secrets_fail() -> None:
    box = _box()
    sid = uuid.uuid4()
    key_id, wrapped, ct = box.seal(sid, "byok", b"sk-secret")
    tampered = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(DecryptionError):
        box.open(sid, "byok", key_id, wrapped, tampered)
    with pytest.raises(DecryptionError):
        box.open(uuid.uuid4(), "byok", key_id, wrapped, ct)  # copied onto another row
    with pytest.raises(DecryptionError):
        box.open(sid, "webhook", key_id, wrapped, ct)  # same row id, other kind
    with pytest.raises(DecryptionError):
        _box().open(sid, "byok", key_id, wrapped, ct)  # another master key under the same id
    with pytest.raises(DecryptionError, match="not loaded"):
        _box("k2").open(sid, "byok", key_id, wrapped, ct)


def test_rewrap_moves_to_the_new_master_key() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = SecretBox({"k1": old_key}, "k1")
    sid = uuid.uuid4()
    key_id, wrapped, ct = old.seal(sid, "byok", b"v")
    both = SecretBox({"k1": old_key, "k2": new_key}, "k2")
    assert both.open(sid, "byok", key_id, wrapped, ct) == b"v"  # old rows still open during rotation
    new_id, new_wrapped = both.rewrap(sid, "byok", key_id, wrapped)
    assert new_id == "k2"
    assert SecretBox({"k2": new_key}, "k2").open(sid, "byok", new_id, new_wrapped, ct) == b"v"


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecretBox({"k1": b"short"}, "k1")
    with pytest.raises(ValueError, match="not among"):
        SecretBox({"k1": os.urandom(32)}, "k9")
