"""docker-compose.yml against the Compose Specification's JSON schema (vendored: tests/fixtures/compose-spec/),
and against what this project requires of a deployment: health checks, restart policies and resource limits
on every long-running service, Redis with an AOF fsynced before each reply, migrations before any process
that uses the schema, and only settings that exist."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from shared.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json").read_text())
ONE_SHOT = {"migrate", "seed"}
USES_SCHEMA = {"seed", "worker", "proxy", "control-plane"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    assert errors(compose()) == []


@pytest.mark.parametrize("breakage", ["unknown_key", "bad_restart_type", "bad_healthcheck", "bad_limits"])
def test_the_schema_check_catches_a_broken_file(breakage: str) -> None:
    doc = copy.deepcopy(compose())
    proxy = doc["services"]["proxy"]
    if breakage == "unknown_key":
        proxy["healtcheck"] = proxy.pop("healthcheck")
    elif breakage == "bad_restart_type":
        proxy["restart"] = ["always"]
    elif breakage == "bad_healthcheck":
        proxy["healthcheck"]["intervall"] = "5s"  # a misspelt key
    else:
        proxy["deploy"]["resources"]["limits"]["memory"] = {"gb": 1}
    assert errors(doc), f"{breakage} passed the schema"


def test_every_long_running_service_has_a_health_check_a_restart_policy_and_limits() -> None:
    for name, service in compose()["services"].items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory"} <= limits.keys(), f"{name}: no CPU and memory limits"
        if name in ONE_SHOT:
            assert service["restart"].startswith("on-failure"), f"{name}: a one-shot job retries on failure only"
            continue
        assert service.get("restart") in ("always", "unless-stopped"), f"{name}: no restart policy"
        assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"


def test_redis_keeps_an_aof_fsynced_before_each_reply() -> None:
    command = compose()["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
    assert options["--maxmemory-policy"] == "noeviction"  # an evicted balance would be money lost
    assert "/data" in " ".join(compose()["services"]["redis"]["volumes"])


def test_migrations_run_before_every_process_that_uses_the_schema() -> None:
    services = compose()["services"]
    for name in USES_SCHEMA:
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_every_relay_setting_in_the_file_exists() -> None:
    known = set(ENV_NAMES.values())
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\b(RR_[A-Z0-9_]+)\s*:", text)) | set(re.findall(r"\$\{(RR_[A-Z0-9_]+)", text))
    assert used and used <= known, f"not settings: {sorted(used - known)}"


def test_prometheus_scrapes_every_process_with_the_token() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"rr-proxy", "rr-control-plane", "rr-worker"}
    for job in jobs.values():
        assert job["authorization"]["type"] == "Bearer" and "credentials_file" in job["authorization"]
    services = compose()["services"]
    ports = {"rr-proxy": "8080", "rr-control-plane": "8090", "rr-worker": "9464"}
    for job, port in ports.items():
        (target,) = jobs[job]["static_configs"][0]["targets"]
        host, _, p = target.partition(":")
        assert host in services and p == port
