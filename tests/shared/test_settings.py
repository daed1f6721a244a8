"""Settings: one frozen, typed object; a bad setting is named in one line; secrets never printed."""

from __future__ import annotations

import base64

import pytest

from shared.settings import Settings, SettingsError, load_settings

BASE = {
    "DATABASE_URL": "postgresql://u:dbpass@127.0.0.1/db",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "RR_KEY_PEPPER": "pepper-pepper-pepper",
    "RR_MASTER_KEY": base64.b64encode(b"k" * 32).decode(),
}


def test_defaults_and_types() -> None:
    settings = load_settings({**BASE, "RR_PROXY_WORKERS": "3", "RR_UPSTREAM_READ_TIMEOUT_S": "2.5"})
    assert settings.proxy_workers == 3
    assert settings.upstream_read_timeout_s == 2.5
    assert settings.max_body_bytes == 4 * 1024 * 1024
    assert settings.master_key_bytes == b"k" * 32
    with pytest.raises(AttributeError):
        settings.proxy_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"REDIS_URL": ""}, "REDIS_URL is required but not set"),
        ({"RR_LOG_BATCH_SIZE": "many"}, "RR_LOG_BATCH_SIZE is malformed"),
        ({"RR_MAX_BODY_BYTES": "-1"}, "RR_MAX_BODY_BYTES must be greater than zero"),
        ({"RR_KEY_PEPPER": "short"}, "RR_KEY_PEPPER must be at least 16 characters"),
        ({"RR_MASTER_KEY": "!!notbase64!!"}, "RR_MASTER_KEY must be base64 of exactly 32 bytes"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must be a postgres URL"),
        ({"RR_REDIS_PREFIX": "a b"}, "RR_REDIS_PREFIX may only hold"),
        ({"RR_METRICS_TOKEN": "short"}, "RR_METRICS_TOKEN must be 16 to 256 visible ASCII"),
        ({"RR_METRICS_TOKEN": "sixteen-chars-ok\r\nX-Injected: 1"}, "RR_METRICS_TOKEN must be 16 to 256 visible"),
        ({"RR_METRICS_TOKEN": "with space inside it"}, "RR_METRICS_TOKEN must be 16 to 256 visible ASCII"),
        ({"RR_METRICS_INTERVAL_S": "0"}, "RR_METRICS_INTERVAL_S must be greater than zero"),
        ({"RR_WORKER_METRICS_PORT": "70000"}, "RR_WORKER_METRICS_PORT must be a TCP port"),
        ({"RR_LOG_FORMAT": "xml"}, "RR_LOG_FORMAT must be json or text"),
    ],
)
def test_bad_settings_are_named(change: dict, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**BASE, **change})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_repr_hides_secrets() -> None:
    text = repr(load_settings({**BASE, "RR_METRICS_TOKEN": "metrics-token-0123456789"}))
    for secret in ("dbpass", "pepper-pepper-pepper", BASE["RR_MASTER_KEY"], "metrics-token-0123456789"):
        assert secret not in text
    assert "proxy_port=8080" in text
    assert isinstance(load_settings(BASE), Settings)


def test_read_url_defaults_to_the_primary_and_must_be_postgres() -> None:
    assert load_settings(BASE).database_read_url == ""  # empty: the control plane reads from DATABASE_URL
    replica = "postgresql://reader:replpass@replica.internal/db?application_name=rr-cp-read"
    settings = load_settings({**BASE, "RR_DATABASE_READ_URL": replica})
    assert settings.database_read_url == replica
    assert "replpass" not in repr(settings)  # a replica's URL can carry a password too
    for bad in ("mysql://replica/db", "replica.internal:5432/db", "http://replica/db"):
        with pytest.raises(SettingsError) as info:
            load_settings({**BASE, "RR_DATABASE_READ_URL": bad})
        assert str(info.value) == ("RR_DATABASE_READ_URL must be a postgres URL (postgresql://…), or empty to "
                                   "read from DATABASE_URL")
