"""Process settings: read once from the environment into one frozen, typed object.

Every process (proxy, workers, control plane, CLI commands) calls `load_settings()` at start-up and passes
the result down explicitly; nothing reads `os.environ` after that. A missing or malformed setting raises
`SettingsError` with one line naming the environment variable, which entry points print before exiting.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import zoneinfo
from collections.abc import Mapping

import msgspec
import msgspec.structs

__all__ = ["ENV_NAMES", "Settings", "SettingsError", "load_settings"]


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the environment variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str
    # A read-only copy (a streaming replica) for the control plane's heavy, lag-tolerant reads: usage, request
    # logs, the audit log, admin usage. Empty: those reads use database_url too.
    database_read_url: str = ""
    redis_url: str
    # Server-side secret mixed into API key hashes (HMAC-SHA256); rotating it invalidates every key.
    key_pepper: str
    # Base64 of 32 bytes: wraps the data keys of encrypted secrets (BYOK credentials, webhook secrets).
    master_key: str
    master_key_id: str = "k1"
    # Earlier master keys, still able to open secrets during a rotation: "id:base64,id:base64".
    old_master_keys: str = ""
    # Every Redis key and channel starts with this, so test runs and tenants of one Redis don't collide.
    redis_prefix: str = "rr:"
    # REDIS_URL is one node of a Redis Cluster (any master): commands are routed by their keys' slots.
    redis_cluster: bool = False

    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    proxy_workers: int = 1
    max_body_bytes: int = 4 * 1024 * 1024
    # A request body must arrive whole within this long (408 otherwise; proxy and control plane), and one
    # client address may have at most this many requests still sending their body at once, per proxy worker
    # process (429 past that).
    body_read_timeout_s: float = 30.0
    # A client that has not sent its whole request head after this long is cut (granian closes it).
    header_read_timeout_s: float = 10.0
    max_unfinished_requests_per_client: int = 64

    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 120.0
    upstream_pool_size: int = 1000
    # The pipelined Redis connections of the hot-path script calls (per proxy process), and the timeout
    # after which an unanswered Redis call fails the request (503) instead of hanging it.
    redis_pipeline_connections: int = 1
    redis_timeout_s: float = 5.0

    key_cache_ttl_s: float = 5.0
    key_negative_cache_ttl_s: float = 2.0
    redis_key_cache_ttl_s: int = 300
    config_refresh_interval_s: float = 30.0

    log_batch_size: int = 1000
    log_flush_interval_ms: int = 200
    log_buffer_max: int = 100_000

    # Failover: routes tried per request, within this budget; breakers open after N failures in a row.
    max_attempts: int = 3
    failover_budget_s: float = 30.0
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 10.0

    # Billing. Keys of one org share the hash tag of its shard ({s:N}); each shard has one billing stream.
    billing_shards: int = 16
    reservation_ttl_s: int = 3600
    max_request_duration_s: int = 1800
    default_max_output_tokens: int = 4096
    # What one request may ask for at most (400 beyond): output tokens per choice, and choices (n, best_of).
    # A reservation is cap × choices of output, so these also bound what one request can hold.
    max_output_tokens: int = 1_000_000
    max_choices: int = 128
    # Prompt tokens reserved per image reference on top of the body's bytes: an image given by URL costs
    # far more tokens than its bytes in the body (a high-detail image: ~1,100 for OpenAI, ~1,600 Anthropic).
    reserve_tokens_per_image: int = 3000
    default_org_rpm: int = 0  # 0: unlimited
    default_org_tpm: int = 0
    flusher_batch_size: int = 2000
    flusher_block_ms: int = 500
    flusher_interval_ms: int = 200  # a shard's stream is read at most this often unless it has a backlog
    flusher_lease_ms: int = 10_000
    # Usage recovery (rr-worker, shared/workers/recovery.py): billed answers whose usage event Redis lost are
    # billed from the request log, once a settle for them can no longer be under way nor their event still
    # be waiting in the stream: this long after the request started (at least the reservation lifetime,
    # which bounds a settle's retries, plus a margin for clock skew between hosts). Looked for this often.
    usage_recovery_grace_s: float = 3900.0
    usage_recovery_interval_s: float = 60.0
    # Metrics (shared/metrics/, docs/metrics.md). `GET /metrics` of every process answers only to
    # `Authorization: Bearer <metrics_token>`; with no token set, metrics are off (404, no worker listener).
    # The granian workers of one proxy or control plane leave a snapshot in `metrics_dir` every
    # `metrics_interval_s` (empty: a fresh temporary directory per server); rr-worker serves its own on
    # worker_metrics_host:worker_metrics_port.
    metrics_token: str = ""
    metrics_dir: str = ""
    metrics_interval_s: float = 1.0
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = 9464
    # Log lines: "json" (one object per line: time, level, logger, message, request_id where there is one)
    # or "text".
    log_format: str = "json"
    # Test-only fault injection: a named point where a worker process exits abruptly (see shared.failpoints).
    failpoint: str = ""

    # Only when the direct peer is one of `trusted_proxies` is the client address taken from this header.
    trusted_proxy_header: str = ""
    trusted_proxies: str = "127.0.0.1/32,::1/128"

    # Control plane (portal and platform admin), see control_plane/.
    control_plane_host: str = "127.0.0.1"
    control_plane_port: int = 8090
    control_plane_workers: int = 1
    # HS256 key of portal access tokens (>= 32 chars); empty: derived from key_pepper with HKDF-SHA256.
    jwt_secret: str = ""
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 30 * 86400
    # The portal's cookies carry Secure: "auto" unless the control plane listens on a loopback address
    # (plain-HTTP local use), "always", or "never" (behind a proxy that is reached over plain HTTP, tests).
    portal_secure_cookies: str = "auto"
    # Failed logins allowed per window (see control_plane/limits.py; unknown emails count too): per client IP
    # and email; per client IP over all emails; per email over all IPs, past which only IPs that have not
    # failed for that email may still try (so that no one elsewhere can lock its owner out).
    login_window_s: int = 900
    login_max_failures_per_ip_email: int = 10
    login_max_failures_per_ip: int = 50
    login_max_failures_per_email: int = 100
    # Argon2id cost of password hashes (argon2-cffi's RFC 9106 low-memory profile by default).
    password_time_cost: int = 3
    password_memory_kib: int = 65536
    # Bounds of the request-log retention (days) an org may choose for itself.
    log_retention_min_days: int = 1
    log_retention_max_days: int = 400
    # Retention of orgs that chose none (within the bounds above). rr-worker deletes older rows in batches
    # and drops request_logs partitions wholly older than log_retention_max_days, which no org may exceed.
    log_retention_default_days: int = 90
    # usage_records are billing evidence: their partitions are dropped only once wholly older than this.
    usage_retention_days: int = 2555  # about 7 years
    # How often rr-worker enforces retention, and at most how many request-log rows one delete removes.
    retention_interval_s: float = 3600.0
    retention_batch_size: int = 5000
    # New prices apply no sooner than this after they are entered: every proxy must have loaded a price
    # (change event, or at worst its periodic refresh) before any request can start under it.
    price_min_lead_s: float = 60.0

    # Model-quality probes (rr-worker, shared/workers/probes.py): a round per route every interval (± jitter
    # as a fraction), one probe request at a time per route at most every probe_gap_ms, paid from the
    # platform's probe budgets (µ$ per route per UTC day, and for all routes per day), never by an org.
    probe_enabled: bool = True
    probe_interval_s: float = 900.0
    probe_jitter: float = 0.2
    probe_poll_interval_s: float = 5.0
    probe_gap_ms: int = 250
    probe_concurrency: int = 4
    probe_route_budget_micros: int = 2_000_000
    probe_daily_budget_micros: int = 20_000_000
    probe_long_context_chars: int = 4000
    # Detection windows (rounds) and the status hysteresis (evaluations to go up / to come down a step).
    probe_window_rounds: int = 10
    probe_baseline_rounds: int = 20
    probe_status_up: int = 2
    probe_status_down: int = 3
    probe_retention_days: int = 90
    # Payments (shared/payments/). Stripe's keys are platform settings in the database (admin-editable,
    # encrypted), not environment variables. A webhook whose signature is older than this is refused.
    stripe_webhook_tolerance_s: int = 300
    stripe_timeout_s: float = 20.0
    # rr-worker processes Stripe events the webhook request did not (a crash, a failed Redis call) once they
    # are this old, leaving fresh ones to the request that stored them.
    stripe_sweep_delay_s: float = 10.0
    # Bounds of one Stripe top-up (whole cents) and of one crypto claim.
    topup_min_micros: int = 5_000_000
    topup_max_micros: int = 10_000_000_000
    # Where Stripe Checkout sends the customer back to (`?checkout=success|cancel` is appended).
    checkout_return_url: str = "http://127.0.0.1:8090/"
    # Budgets (shared/budgets.py): the IANA time zone of calendar days, weeks and months.
    budget_timezone: str = "UTC"

    # Notifications (shared/notify/, rr-worker's notify loop): mail and signed outbound webhooks.
    notify_enabled: bool = True
    notify_interval_s: float = 1.0  # how often the loop looks for new events and due deliveries
    # Development and tests only: lets webhook endpoints be plain http and private/loopback addresses.
    webhook_allow_insecure: bool = False
    webhook_timeout_s: float = 10.0  # one delivery attempt, connect to last byte
    # Retries: the n-th retry waits min(base × 2^(n-1), max) ± jitter (a fraction), for at most max_attempts
    # attempts (the defaults span about seven hours).
    webhook_backoff_base_s: float = 10.0
    webhook_backoff_max_s: float = 3600.0
    webhook_backoff_jitter: float = 0.2
    webhook_max_attempts: int = 15
    # After a secret rotation the previous secret also signs (a second signature) for this long by default.
    webhook_rotation_overlap_s: int = 86400
    smtp_timeout_s: float = 20.0
    mail_backoff_base_s: float = 30.0
    mail_backoff_max_s: float = 3600.0
    mail_max_attempts: int = 8
    # rr-worker's retention deletes delivery records and mail records older than these.
    webhook_delivery_retention_days: int = 30
    mail_retention_days: int = 90

    def __post_init__(self) -> None:
        _check_positive(self, "proxy_port", "proxy_workers", "max_body_bytes", "upstream_pool_size",
                        "log_batch_size", "log_flush_interval_ms", "log_buffer_max",
                        "redis_pipeline_connections", "redis_timeout_s", "body_read_timeout_s", "header_read_timeout_s",
                        "max_unfinished_requests_per_client")
        _check_positive(self, "upstream_connect_timeout_s", "upstream_read_timeout_s", "key_cache_ttl_s",
                        "billing_shards", "reservation_ttl_s", "max_request_duration_s", "default_max_output_tokens",
                        "max_output_tokens", "max_choices", "reserve_tokens_per_image",
                        "flusher_batch_size", "flusher_block_ms", "flusher_interval_ms", "flusher_lease_ms",
                        "max_attempts",
                        "failover_budget_s", "breaker_threshold", "breaker_cooldown_s")
        _check_positive(self, "control_plane_port", "control_plane_workers", "access_token_ttl_s",
                        "refresh_token_ttl_s", "login_window_s", "login_max_failures_per_ip",
                        "login_max_failures_per_ip_email",
                        "login_max_failures_per_email", "password_time_cost", "password_memory_kib",
                        "log_retention_min_days", "price_min_lead_s")
        _check_positive(self, "metrics_interval_s")
        if self.metrics_token and not re.fullmatch(r"[\x21-\x7e]{16,256}", self.metrics_token):
            raise SettingsError(f"{ENV_NAMES['metrics_token']} must be 16 to 256 visible ASCII characters")
        if not 0 <= self.worker_metrics_port <= 65535:
            raise SettingsError(f"{ENV_NAMES['worker_metrics_port']} must be a TCP port (0: off)")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"{ENV_NAMES['log_format']} must be json or text")
        _check_positive(self, "usage_retention_days", "retention_interval_s", "retention_batch_size")
        _check_positive(self, "probe_interval_s", "probe_poll_interval_s", "probe_concurrency", "probe_window_rounds",
                        "probe_baseline_rounds", "probe_status_up", "probe_status_down", "probe_retention_days",
                        "probe_long_context_chars")
        if not 0 <= self.probe_jitter < 1:
            raise SettingsError(f"{ENV_NAMES['probe_jitter']} must be within [0, 1)")
        if min(self.probe_gap_ms, self.probe_route_budget_micros, self.probe_daily_budget_micros) < 0:
            raise SettingsError(f"{ENV_NAMES['probe_gap_ms']}, {ENV_NAMES['probe_route_budget_micros']} and "
                                f"{ENV_NAMES['probe_daily_budget_micros']} cannot be negative")
        _check_positive(self, "stripe_webhook_tolerance_s", "stripe_timeout_s", "topup_min_micros")
        _check_positive(self, "notify_interval_s", "webhook_timeout_s", "webhook_backoff_base_s",
                        "webhook_backoff_max_s", "webhook_max_attempts", "webhook_rotation_overlap_s", "smtp_timeout_s",
                        "mail_backoff_base_s", "mail_backoff_max_s", "mail_max_attempts",
                        "webhook_delivery_retention_days", "mail_retention_days")
        if not 0 <= self.webhook_backoff_jitter < 1:
            raise SettingsError(f"{ENV_NAMES['webhook_backoff_jitter']} must be within [0, 1)")
        if self.topup_max_micros < self.topup_min_micros:
            raise SettingsError(f"{ENV_NAMES['topup_max_micros']} must be at least {ENV_NAMES['topup_min_micros']}")
        if self.topup_min_micros % 10_000 or self.topup_max_micros % 10_000:
            raise SettingsError(f"{ENV_NAMES['topup_min_micros']} and {ENV_NAMES['topup_max_micros']} must be "
                                "whole cents (multiples of 10000)")
        if not re.fullmatch(r"https?://[\x21-\x7e]+", self.checkout_return_url):
            raise SettingsError(f"{ENV_NAMES['checkout_return_url']} must be an http(s) URL")
        try:
            zoneinfo.ZoneInfo(self.budget_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise SettingsError(f"{ENV_NAMES['budget_timezone']} must be an IANA time zone such as UTC or "
                                "Europe/Berlin") from None
        if self.log_retention_max_days < self.log_retention_min_days:
            raise SettingsError(f"{ENV_NAMES['log_retention_max_days']} must be at least "
                                f"{ENV_NAMES['log_retention_min_days']}")
        if not self.log_retention_min_days <= self.log_retention_default_days <= self.log_retention_max_days:
            raise SettingsError(f"{ENV_NAMES['log_retention_default_days']} must lie between "
                                f"{ENV_NAMES['log_retention_min_days']} and {ENV_NAMES['log_retention_max_days']}")
        if self.portal_secure_cookies not in ("auto", "always", "never"):
            raise SettingsError(f"{ENV_NAMES['portal_secure_cookies']} must be auto, always or never")
        if self.jwt_secret and len(self.jwt_secret) < 32:
            raise SettingsError(f"{ENV_NAMES['jwt_secret']} must be at least 32 characters")
        _check_positive(self, "usage_recovery_interval_s")
        if self.usage_recovery_grace_s < self.reservation_ttl_s:
            # Sooner, a settle still retrying could append the event after the recovery billed the answer.
            raise SettingsError(f"{ENV_NAMES['usage_recovery_grace_s']} must be at least "
                                f"{ENV_NAMES['reservation_ttl_s']}")
        if self.max_request_duration_s >= self.reservation_ttl_s:
            raise SettingsError(f"{ENV_NAMES['max_request_duration_s']} must be below {ENV_NAMES['reservation_ttl_s']}")
        if len(self.key_pepper) < 16:
            raise SettingsError(f"{ENV_NAMES['key_pepper']} must be at least 16 characters")
        try:
            raw = base64.b64decode(self.master_key, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise SettingsError(f"{ENV_NAMES['master_key']} must be base64 of exactly 32 bytes")
        try:
            old = self.old_master_keys_map
        except (binascii.Error, ValueError):
            old = {"": b""}
        if any(len(v) != 32 or not k for k, v in old.items()):
            raise SettingsError(f"{ENV_NAMES['old_master_keys']} must be id:base64-of-32-bytes, comma separated")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{0,64}", self.redis_prefix):
            raise SettingsError(f"{ENV_NAMES['redis_prefix']} may only hold letters, digits and _.:-")
        for scheme, field in (("postgres", "database_url"), ("redis", "redis_url")):
            if not getattr(self, field).startswith((scheme, "unix")):
                raise SettingsError(f"{ENV_NAMES[field]} must be a {scheme} URL")
        if self.database_read_url and not self.database_read_url.startswith(("postgres", "unix")):
            raise SettingsError(f"{ENV_NAMES['database_read_url']} must be a postgres URL (postgresql://…), or "
                                f"empty to read from {ENV_NAMES['database_url']}")

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug prints: never show the secrets.
        shown = ", ".join(
            f"{f}={'***' if f in _SECRET_FIELDS else repr(getattr(self, f))}" for f in self.__struct_fields__
        )
        return f"Settings({shown})"

    @property
    def master_key_bytes(self) -> bytes:
        return base64.b64decode(self.master_key)

    def effective_log_retention_days(self, org_days: int | None) -> int:
        """The request-log retention that applies to an org: its own, else the platform default, always within
        the platform bounds (which may have changed since the org chose its value)."""
        days = self.log_retention_default_days if org_days is None else org_days
        return min(max(days, self.log_retention_min_days), self.log_retention_max_days)

    @property
    def old_master_keys_map(self) -> dict[str, bytes]:
        keys = {}
        for item in filter(None, (part.strip() for part in self.old_master_keys.split(","))):
            key_id, _, value = item.partition(":")
            keys[key_id] = base64.b64decode(value)
        return keys


def _check_positive(settings: Settings, *fields: str) -> None:
    for field in fields:
        if getattr(settings, field) <= 0:
            raise SettingsError(f"{ENV_NAMES[field]} must be greater than zero")


_SECRET_FIELDS = frozenset({"key_pepper", "master_key", "old_master_keys", "jwt_secret", "database_url",
                            "database_read_url", "redis_url", "metrics_token"})

ENV_NAMES: dict[str, str] = {
    name: (name.upper() if name in ("database_url", "redis_url") else f"RR_{name.upper()}")
    for name in Settings.__struct_fields__
}


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build `Settings` from environment variables (`DATABASE_URL`, `REDIS_URL`, `RR_*`)."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {
        field: env[var] for field, var in ENV_NAMES.items() if env.get(var, "") != ""
    }
    raw.update(overrides)
    for field in msgspec.structs.fields(Settings):
        if field.required and field.name not in raw:
            raise SettingsError(f"{ENV_NAMES[field.name]} is required but not set")
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        field = _field_of(str(exc))
        name = ENV_NAMES.get(field, field)
        raise SettingsError(f"{name} is malformed: {str(exc).split(' - at ')[0]}") from None


def _field_of(message: str) -> str:
    match = re.search(r"\$\.(\w+)", message)
    return match.group(1) if match else "?"
