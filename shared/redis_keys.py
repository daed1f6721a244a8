"""Every Redis key and channel name, in one place.

All names start with the configured prefix (`RR_REDIS_PREFIX`), so several deployments or test runs share
one Redis without colliding. The billing keys of an org carry the hash tag of its shard, `{s:N}` with
N = org_id mod `billing_shards`: the scripts touch an org's balance, reservations, rate-limit window and
its shard's billing stream together, so they must live in one Redis Cluster slot. (A per-org tag,
`{org:ID}`, would put each org's stream in its own slot, and the flusher would have to poll one stream per
org; a shard tag keeps a small, fixed set of streams while still spreading orgs across the cluster.)
"""

from __future__ import annotations

__all__ = ["OrgKeys", "RedisKeys"]


class OrgKeys:
    """The billing keys of one org; built on demand from `RedisKeys.org`."""

    __slots__ = ("applied_credits", "balance", "org_id", "pending_credits", "reservations", "shard", "stream",
                 "tag")

    def __init__(self, prefix: str, org_id: int, shard: int) -> None:
        tag = self.tag = f"{prefix}{{s:{shard}}}"
        self.shard = shard
        self.org_id = org_id
        # One hash: balance, reserved, credit, epoch and the rate-limit counters of the current minute (`w`,
        # `o:r`, `o:t`, and `k<id>:w|r|t` for keys with limits of their own): one HMGET and one HSET a request.
        self.balance = f"{tag}:bal:{org_id}"
        # A zset of '<request id>:<amount>' scored by expiry (ms). (Named `rz`, not the earlier hash `res`: a
        # proxy of the earlier layout must not meet it; see docs/scaling.md, "Upgrading".)
        self.reservations = f"{tag}:rz:{org_id}"
        self.pending_credits = f"{tag}:pcred:{org_id}"
        self.applied_credits = f"{tag}:acred:{org_id}"
        self.stream = f"{tag}:billing"

    def key_spend(self, key_id: int, month: str) -> str:
        """What one API key spent in a calendar month (`YYYYMM`, UTC), for its monthly spend cap."""
        return f"{self.tag}:spend:{key_id}:{month}"

    def budget_calendar(self, scope: str, period: str, label: str) -> str:
        """Spend of one calendar budget period: `scope` is `o` (the org) or `k<key id>`, `label` the period's
        first local date (shared.budgets)."""
        return f"{self.tag}:bud:{self.org_id}:{scope}:{period}:{label}"

    def budget_rolling(self, scope: str, period: str) -> str:
        """Spend of one rolling budget window, a hash of bucket index -> spend (shared.budgets)."""
        return f"{self.tag}:budr:{self.org_id}:{scope}:{period}"


class RedisKeys:
    """Key builders bound to one prefix; built once per process."""

    __slots__ = ("_orgs", "events_channel", "mail_queue", "prefix", "shards", "webhook_queue")

    def __init__(self, prefix: str, shards: int = 16) -> None:
        self.prefix = prefix
        self.shards = shards
        # Proxies subscribe here: `key:<key prefix>` (a key changed), `config` (models, prices, routes).
        self.events_channel = f"{prefix}events"
        # Notification queues (sorted sets: delivery / mail id by due time, unix ms); PostgreSQL holds the records.
        self.webhook_queue = f"{prefix}notify:webhooks"
        self.mail_queue = f"{prefix}notify:mail"
        self._orgs: dict[int, OrgKeys] = {}

    def api_key(self, key_prefix: str) -> str:
        """Cached `KeyRecord` of one API key, by its public prefix."""
        return f"{self.prefix}apikey:{key_prefix}"

    def org(self, org_id: int) -> OrgKeys:
        keys = self._orgs.get(org_id)
        if keys is None:
            if len(self._orgs) > 500_000:
                self._orgs.clear()
            keys = self._orgs[org_id] = OrgKeys(self.prefix, org_id, org_id % self.shards)
        return keys

    def stream(self, shard: int) -> str:
        return f"{self.prefix}{{s:{shard}}}:billing"

    def flusher_lease(self, shard: int) -> str:
        return f"{self.prefix}{{s:{shard}}}:flusher-lease"

    BILLING_GROUP = "flusher"
