"""Peers on the bench's harness: LiteLLM's proxy and Portkey's open-source gateway, installed beside the repo.

    python -m bench.peers setup [litellm,portkey]   # idempotent; installs into bench/.peers/ (gitignored)
    python -m bench.peers status                    # what is installed

LiteLLM comes from PyPI into its own virtualenv (`bench/.peers/litellm-venv`), pinned to a release published
before the March 2026 compromise of the litellm package (1.82.7 and 1.82.8 carried a credential stealer).
Portkey's gateway comes from npm into `bench/.peers/portkey` with `--ignore-scripts` (no install scripts).

`bench.overhead --peers litellm,portkey` and `bench.streams --peers ...` start them pointed at the bench's own
mock upstream on 127.0.0.1. Both run as plainly as they can: LiteLLM with a config of one model, a master
key, no database, no callbacks, no cost-map download and no telemetry; Portkey headless (no log UI), routed
by its `x-portkey-provider` and `x-portkey-custom-host` headers. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "bench" / ".peers"
LITELLM_VERSION = "1.82.6"  # the last release before the compromised 1.82.7/1.82.8 (March 2026)
PORTKEY_VERSION = "1.15.2"
# Portkey's gateway declares `@hono/node-server: ^1.3.3`, so npm picks the newest 1.x. From 1.14 on, its
# Response wrapper hands back the upstream fetch's immutable headers, and the gateway answers every streamed
# request with 500 ("TypeError: immutable" in updateHeaders; Portkey-AI/gateway issue #1389). Tried here:
# 1.19.19 and 1.14.2 fail, 1.13.8 (and 1.12, 1.11) stream.
HONO_NODE_SERVER_VERSION = "1.13.8"
LITELLM_VENV = PEERS_DIR / "litellm-venv"
PORTKEY_DIR = PEERS_DIR / "portkey"
PORTKEY_SERVER = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
PEER_NAMES = ("litellm", "portkey")
UPSTREAM_KEY = "sk-bench-upstream"  # what the peers send to the mock upstream (which ignores it)
# Anything a peer tries to reach through a proxy-aware client goes to a closed local port, never outside.
DEAD_PROXY = "http://127.0.0.1:9"


@dataclass
class Peer:
    """How to start one peer and call it."""

    name: str
    args: list[str]
    env: dict[str, str]
    ready_url: str
    url: str  # the chat completions URL
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (auth, routing)


# ---- installation -------------------------------------------------------------------------------------


def installed_litellm() -> str | None:
    """The installed LiteLLM version in the peers' virtualenv, or None."""
    python = LITELLM_VENV / "bin" / "python"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def installed_portkey() -> str | None:
    return _npm_version("@portkey-ai/gateway") if PORTKEY_SERVER.exists() else None


def _npm_version(package: str) -> str | None:
    try:
        return json.loads((PORTKEY_DIR / "node_modules" / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def setup_litellm(python: str) -> None:
    if installed_litellm() == LITELLM_VERSION:
        print(f"litellm {LITELLM_VERSION}: already installed in {LITELLM_VENV.relative_to(ROOT)}")
        return
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if not (LITELLM_VENV / "bin" / "pip").exists():
        subprocess.run([python, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    print(f"litellm {installed_litellm()}: installed in {LITELLM_VENV.relative_to(ROOT)}")


def setup_portkey() -> None:
    if installed_portkey() == PORTKEY_VERSION and _npm_version("@hono/node-server") == HONO_NODE_SERVER_VERSION:
        print(f"@portkey-ai/gateway {PORTKEY_VERSION}: already installed in {PORTKEY_DIR.relative_to(ROOT)}")
        return
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise SystemExit("portkey: needs node and npm (apt-get install nodejs npm)")
    PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
    (PORTKEY_DIR / "package.json").write_text(json.dumps({
        "name": "rr-bench-peers", "private": True, "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION},
        "overrides": {"@hono/node-server": HONO_NODE_SERVER_VERSION}}, indent=2) + "\n")
    subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=PORTKEY_DIR, check=True)
    print(f"@portkey-ai/gateway {installed_portkey()} (@hono/node-server {_npm_version('@hono/node-server')}): "
          f"installed in {PORTKEY_DIR.relative_to(ROOT)}")


# ---- running ------------------------------------------------------------------------------------------


def parse_peers(spec: str) -> list[str]:
    """`litellm,portkey` -> the names, checked, in the given order, without duplicates."""
    names = list(dict.fromkeys(n.strip().lower() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}")
    return names


def clean_env() -> dict[str, str]:
    """The environment of a peer: none of the bench's database/Redis/relay settings, no way out."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RR_", "DATABASE_", "REDIS_", "LITELLM_", "PORTKEY_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update({"HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "NO_PROXY": "127.0.0.1,localhost",
                "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "no_proxy": "127.0.0.1,localhost"})
    return env


def litellm_config(model: str, upstream_base: str, master_key: str) -> str:
    """LiteLLM's proxy config: one OpenAI-compatible model at the mock upstream, nothing else switched on.

    (JSON is valid YAML, so no YAML writer is needed.)"""
    return json.dumps({
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": upstream_base, "api_key": UPSTREAM_KEY}}],
        "litellm_settings": {"drop_params": True, "telemetry": False, "turn_off_message_logging": True,
                             "callbacks": [], "success_callback": [], "failure_callback": [],
                             "request_timeout": 600},
        "general_settings": {"master_key": master_key, "disable_spend_logs": True,
                             "disable_error_logs": True, "allow_requests_on_db_unavailable": True},
    }, indent=2)


# uvicorn's logging for LiteLLM: warnings and errors only, no access log line per request (the relay has none).
UVICORN_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False}},
}


def litellm_peer(tmp: Path, port: int, upstream_base: str, model: str, workers: int, master_key: str) -> Peer:
    if installed_litellm() is None:
        raise SystemExit("litellm is not installed: run `python -m bench.peers setup litellm` (or make bench-peers)")
    config, log_config = tmp / "litellm.json", tmp / "litellm-logging.json"
    config.write_text(litellm_config(model, upstream_base, master_key))
    log_config.write_text(json.dumps(UVICORN_LOGGING))
    env = clean_env()
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the model cost map at start
                "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True",
                "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True"})
    args = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", str(workers), "--telemetry", "False",
            "--log_config", str(log_config)]
    return Peer("litellm", args, env, f"http://127.0.0.1:{port}/health/liveliness",
                f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {master_key}"})


def portkey_peer(port: int, upstream_base: str) -> Peer:
    if installed_portkey() is None:
        raise SystemExit("portkey is not installed: run `python -m bench.peers setup portkey` (or make bench-peers)")
    if shutil.which("node") is None:
        raise SystemExit("portkey: node is not on PATH")
    env = clean_env()
    env["NODE_ENV"] = "production"
    args = ["node", str(PORTKEY_SERVER), f"--port={port}", "--headless"]
    return Peer("portkey", args, env, f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/v1/chat/completions",
                {"Authorization": f"Bearer {UPSTREAM_KEY}", "x-portkey-provider": "openai",
                 "x-portkey-custom-host": upstream_base})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.peers", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="install the peers (idempotent)")
    s.add_argument("names", nargs="?", default=",".join(PEER_NAMES), help="comma-separated: litellm,portkey")
    s.add_argument("--python", default=shutil.which("python3") or sys.executable,
                   help="interpreter for LiteLLM's virtualenv (default: python3 on PATH)")
    sub.add_parser("status", help="print what is installed")
    args = p.parse_args(argv)
    if args.command == "status":
        print(f"litellm: {installed_litellm() or 'not installed'} (wanted {LITELLM_VERSION})")
        print(f"portkey: {installed_portkey() or 'not installed'} (wanted {PORTKEY_VERSION}), @hono/node-server "
              f"{_npm_version('@hono/node-server') or 'not installed'} (wanted {HONO_NODE_SERVER_VERSION})")
        return
    failed = []
    for name in parse_peers(args.names):
        try:
            setup_litellm(args.python) if name == "litellm" else setup_portkey()
        except (subprocess.CalledProcessError, SystemExit) as exc:
            print(f"{name}: setup failed: {exc}", file=sys.stderr)
            failed.append(name)
    if failed:
        raise SystemExit(f"setup failed for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
