"""Tenants for the locust scenarios (`bench/locustfile.py`): orgs, API keys and balances, created through the
control plane's platform admin API, exactly as an operator would.

Per run (a random run id names everything it creates, `locust <run> ...`):

* `RR_LOCUST_ORGS` ordinary orgs, each credited `RR_LOCUST_BALANCE_MICROS` by one admin adjustment (a ledger
  transaction, then the live balance) and given `RR_LOCUST_KEYS_PER_ORG` keys without limits;
* one org with `RR_LOCUST_LIMITED_KEYS` keys limited to `RR_LOCUST_LIMITED_RPM` requests per minute;
* `RR_LOCUST_DRAIN_ORGS` orgs credited only `RR_LOCUST_DRAIN_BALANCE_MICROS`, one key each: they run dry
  during the test and then answer 402;
* one key that is created and revoked at once (it must get 401).

The platform admin signs in with `RR_LOCUST_ADMIN_EMAIL` / `RR_LOCUST_ADMIN_PASSWORD`. Without a password,
the one `make run` generated is read from `<RR_DATA_DIR or .data>/dev.env` (`RR_DEMO_ADMIN_PASSWORD`), and
the email defaults to `make run`'s demo admin. The admin becomes owner of the orgs it creates (that is what
`POST /v1/orgs` does); `suspend_tenants` suspends them after the run, so their keys stop working.

Used by the locustfile's `test_start` hook, or on its own, to create the tenants once and reuse them across
runs or share them between distributed locust workers::

    python bench/locust_setup.py --out tenants.json      # then: RR_LOCUST_TENANTS=tenants.json locust ...
    python bench/locust_setup.py --suspend tenants.json  # afterwards: their keys stop working

Standard library only, so it runs wherever locust is installed, without the relay's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SetupConfig", "SetupError", "Tenants", "create_tenants", "load_tenants", "suspend_tenants"]

DEMO_ADMIN_EMAIL = "admin@rocket-relay.localhost"  # what `make run` seeds (control_plane.seed)


class SetupError(Exception):
    """A control-plane call failed; the message says which and how."""


def _int_env(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SetupError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise SetupError(f"{name} must be at least {minimum}")
    return value


def _dev_env_password(env: Mapping[str, str]) -> str | None:
    """`make run`'s demo admin password, from its data folder's dev.env (None if there is none)."""
    path = Path(env.get("RR_DATA_DIR") or ".data") / "dev.env"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "RR_DEMO_ADMIN_PASSWORD":
            return value.strip()
    return None


@dataclass(frozen=True)
class SetupConfig:
    control_plane: str = "http://127.0.0.1:8090"
    admin_email: str = DEMO_ADMIN_EMAIL
    admin_password: str = ""
    orgs: int = 10
    keys_per_org: int = 3
    balance_micros: int = 100_000_000  # 100 USD: never runs out in a load test
    limited_keys: int = 3
    limited_rpm: int = 5
    drain_orgs: int = 3
    drain_balance_micros: int = 300  # 0.0003 USD: a few dozen small requests

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SetupConfig:
        env = os.environ if env is None else env
        password = env.get("RR_LOCUST_ADMIN_PASSWORD") or _dev_env_password(env) or ""
        return cls(
            control_plane=(env.get("RR_LOCUST_CONTROL_PLANE") or cls.control_plane).rstrip("/"),
            admin_email=env.get("RR_LOCUST_ADMIN_EMAIL") or cls.admin_email,
            admin_password=password,
            orgs=_int_env(env, "RR_LOCUST_ORGS", cls.orgs, 1),
            keys_per_org=_int_env(env, "RR_LOCUST_KEYS_PER_ORG", cls.keys_per_org, 1),
            balance_micros=_int_env(env, "RR_LOCUST_BALANCE_MICROS", cls.balance_micros, 1),
            limited_keys=_int_env(env, "RR_LOCUST_LIMITED_KEYS", cls.limited_keys, 1),
            limited_rpm=_int_env(env, "RR_LOCUST_LIMITED_RPM", cls.limited_rpm, 1),
            drain_orgs=_int_env(env, "RR_LOCUST_DRAIN_ORGS", cls.drain_orgs, 1),
            drain_balance_micros=_int_env(env, "RR_LOCUST_DRAIN_BALANCE_MICROS", cls.drain_balance_micros, 1),
        )


@dataclass
class Tenants:
    """What the scenarios need: keys by kind, and the orgs created (to suspend them afterwards)."""

    run: str
    keys: list[str] = field(default_factory=list)  # ordinary keys: big balances, no key limits
    limited: list[dict] = field(default_factory=list)  # {"key", "rpm"}
    drain: list[dict] = field(default_factory=list)  # {"key", "org_id", "balance_micros"}
    revoked: list[str] = field(default_factory=list)
    org_ids: list[int] = field(default_factory=list)
    control_plane: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Tenants:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def load_tenants(path: str | os.PathLike) -> Tenants:
    tenants = Tenants.from_json(Path(path).read_text())
    if not (tenants.keys and tenants.limited and tenants.drain and tenants.revoked):
        raise SetupError(f"{path}: the tenants file lacks ordinary, limited, draining or revoked keys")
    return tenants


class ControlPlaneClient:
    """A tiny JSON client for the control plane (urllib: no dependency beyond the standard library)."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token: str | None = None

    def call(self, method: str, path: str, body: dict | None = None, expect: tuple[int, ...] = (200, 201)) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"accept": "application/json"}
        if data is not None:
            headers["content-type"] = "application/json"
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, ValueError) as exc:
            raise SetupError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from None
        if status not in expect:
            raise SetupError(f"{method} {path} answered {status}: {raw[:300].decode(errors='replace')}")
        return json.loads(raw) if raw else {}

    def login(self, email: str, password: str) -> None:
        if not password:
            raise SetupError("no platform admin password: set RR_LOCUST_ADMIN_PASSWORD (for `make run`, it is "
                             "printed at start-up and stored in <RR_DATA_DIR>/dev.env, which was not found)")
        self.token = self.call("POST", "/v1/auth/login", {"email": email, "password": password})["access_token"]

    def create_org(self, name: str, balance_micros: int, run: str) -> int:
        """An org (the admin is its owner) whose opening balance is one ledger adjustment."""
        org_id = self.call("POST", "/v1/orgs", {"name": name})["id"]
        self.call("POST", f"/v1/admin/orgs/{org_id}/adjustments", {
            "amount_micros": balance_micros, "reason": "locust load test: opening balance",
            "external_id": f"locust-{run}-{org_id}-opening"})
        return org_id

    def create_key(self, org_id: int, name: str, **limits: object) -> tuple[int, str]:
        created = self.call("POST", f"/v1/orgs/{org_id}/keys", {"name": name, **limits})
        return created["api_key"]["id"], created["key"]


def create_tenants(config: SetupConfig, log=print) -> Tenants:
    """Create the orgs and keys of one run (a few dozen control-plane calls); returns their keys."""
    cp = ControlPlaneClient(config.control_plane)
    cp.login(config.admin_email, config.admin_password)
    run = secrets.token_hex(3)
    tenants = Tenants(run=run, control_plane=config.control_plane)
    for i in range(config.orgs):
        org_id = cp.create_org(f"locust {run} org {i}", config.balance_micros, run)
        tenants.org_ids.append(org_id)
        for k in range(config.keys_per_org):
            tenants.keys.append(cp.create_key(org_id, f"locust {run} key {k}")[1])
    org_id = cp.create_org(f"locust {run} limited", config.balance_micros, run)
    tenants.org_ids.append(org_id)
    for k in range(config.limited_keys):
        key = cp.create_key(org_id, f"locust {run} limited {k}", rpm_limit=config.limited_rpm)[1]
        tenants.limited.append({"key": key, "rpm": config.limited_rpm})
    for i in range(config.drain_orgs):
        org_id = cp.create_org(f"locust {run} drain {i}", config.drain_balance_micros, run)
        tenants.org_ids.append(org_id)
        key = cp.create_key(org_id, f"locust {run} drain")[1]
        tenants.drain.append({"key": key, "org_id": org_id, "balance_micros": config.drain_balance_micros})
    key_id, key = cp.create_key(tenants.org_ids[0], f"locust {run} revoked")
    cp.call("DELETE", f"/v1/orgs/{tenants.org_ids[0]}/keys/{key_id}", expect=(200, 204))
    tenants.revoked.append(key)
    log(f"locust setup: run {run}: {len(tenants.org_ids)} orgs, {len(tenants.keys)} ordinary keys, "
        f"{len(tenants.limited)} keys at {config.limited_rpm} rpm, {len(tenants.drain)} draining orgs "
        f"({config.drain_balance_micros} µ$ each), 1 revoked key, via {config.control_plane}")
    return tenants


def suspend_tenants(tenants: Tenants, config: SetupConfig) -> int:
    """Suspend the run's orgs (their keys stop working at every proxy); returns how many."""
    cp = ControlPlaneClient(tenants.control_plane or config.control_plane)
    cp.login(config.admin_email, config.admin_password)
    for org_id in tenants.org_ids:
        cp.call("PATCH", f"/v1/admin/orgs/{org_id}", {"status": "suspended"})
    return len(tenants.org_ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Create (or suspend) the orgs and keys of the locust scenarios via the control plane. "
                    "Sizes and credentials come from the RR_LOCUST_* variables (see bench/locustfile.py).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the tenants (with their API keys: keep it private) to this file")
    group.add_argument("--suspend", metavar="FILE", help="suspend the orgs of a tenants file")
    args = parser.parse_args(argv)
    try:
        config = SetupConfig.from_env()
        if args.suspend:
            count = suspend_tenants(load_tenants(args.suspend), config)
            print(f"suspended {count} orgs")
            return
        tenants = create_tenants(config)
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(tenants.to_json())
        print(f"wrote {args.out}")
    except SetupError as exc:
        sys.exit(f"locust_setup: {exc}")


if __name__ == "__main__":
    main()
