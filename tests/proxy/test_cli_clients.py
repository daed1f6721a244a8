"""The real command-line clients, installed from npm, against the relay in non-interactive mode: Claude Code
(`claude -p`, Anthropic Messages) and Codex CLI (`codex exec`, the Responses API), each through an
OpenAI-format and an Anthropic-format upstream (the mock). Each must print the upstream's answer and exit 0,
and the org must be charged for every model request it made.

The CLIs are installed once into a cache folder outside the repository (`$RR_NPM_CACHE`, default
`~/.cache/rocket-relay/npm-clis`); without node and npm these tests are skipped, saying so. They reach only the
local relay: telemetry, update checks and other non-essential traffic are switched off by environment and
configuration, and HOME / CODEX_HOME are temporary folders.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_billing import PRICE
from tests.proxy.test_endpoints import mock_requests

ANSWER = "tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8"
PACKAGES = ("@anthropic-ai/claude-code", "@openai/codex")


@pytest.fixture(scope="session")
def npm_bin() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Claude Code and Codex CLI tests need them")
    folder = Path(os.environ.get("RR_NPM_CACHE") or Path.home() / ".cache" / "rocket-relay" / "npm-clis")
    bin_dir = folder / "node_modules" / ".bin"
    if not ((bin_dir / "claude").exists() and (bin_dir / "codex").exists()):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "package.json").exists():
            (folder / "package.json").write_text('{"name": "rr-cli-clients", "private": true}\n')
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", *PACKAGES], cwd=folder,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"npm install failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return bin_dir


def _quiet_env(home: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "TERM")}
    return {**keep, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "NO_COLOR": "1", "CI": "1",
            "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_BUG_COMMAND": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1", "OTEL_SDK_DISABLED": "true"}


async def _tenant(factory: Factory, proxy: Server, mock: Server, api_format: str) -> tuple[str, str, int]:
    provider_id = await factory.provider(mock.url + "/v1", api_format=api_format)
    model = await factory.model(provider_id, name=f"rr-cli-{api_format}-{os.urandom(3).hex()}", price=PRICE)
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await factory.publish_config(proxy, key, model)
    return model, key, org_id


async def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, args, env=env, cwd=cwd, capture_output=True, text=True,
                                   timeout=180, stdin=subprocess.DEVNULL)


async def _assert_all_charged(db, org_id: int) -> int:
    """Every model request of the org that was answered is billed: one usage record each, none missing."""
    # What was answered is a 200 (a CLI that hangs up once the last event is in was answered in full), or
    # a request with tokens on record (one it cut short itself, billed for what it received).
    answered = await wait_for_rows(db, """select request_id from request_logs where org_id = $1
                                          and path in ('/v1/messages', '/v1/responses')
                                          and (status_code = 200 or prompt_tokens is not null)""", org_id)
    assert answered, "the CLI made no model request through the relay"
    records = await wait_for_rows(db, "select request_id, cost_micros from usage_records where org_id = $1",
                                  org_id, count=len(answered))
    assert {r["request_id"] for r in records} == {r["request_id"] for r in answered}
    assert all(r["cost_micros"] > 0 for r in records)
    return len(records)


@pytest.mark.parametrize("api_format", ["anthropic", "openai"])
async def test_claude_code_print_mode(api_format: str, npm_bin: Path, proxy: Server, mock_upstream: Server,
                                      worker, factory: Factory, db, tmp_path: Path) -> None:
    model, key, org_id = await _tenant(factory, proxy, mock_upstream, api_format)
    env = {**_quiet_env(tmp_path), "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_API_KEY": key,
           "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
           "ANTHROPIC_DEFAULT_SONNET_MODEL": model, "ANTHROPIC_DEFAULT_OPUS_MODEL": model}
    done = await _run([str(npm_bin / "claude"), "-p", "Say hello", "--output-format", "text"], env, tmp_path)
    assert done.returncode == 0, f"claude exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert ANSWER in done.stdout, done.stdout
    print(f"claude -p via {api_format}: {done.stdout.strip()!r}")  # shown with `pytest -s`
    billed = await _assert_all_charged(db, org_id)
    seen = [r for r in await mock_requests(mock_upstream) if r["model"] == model]
    upstream_path = "/v1/messages" if api_format == "anthropic" else "/v1/chat/completions"
    assert len([r for r in seen if r["path"] == upstream_path]) >= billed
    if api_format == "anthropic":  # its beta flags reached the provider, validated and unchanged
        assert all(r["anthropic_beta"] for r in seen if r["path"] == "/v1/messages")


@pytest.mark.parametrize("api_format", ["anthropic", "openai"])
async def test_codex_exec(api_format: str, npm_bin: Path, proxy: Server, mock_upstream: Server, worker,
                          factory: Factory, db, tmp_path: Path) -> None:
    model, key, org_id = await _tenant(factory, proxy, mock_upstream, api_format)
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(f'''
model = "{model}"
model_provider = "rocket-relay"
check_for_update_on_startup = false

[model_providers.rocket-relay]
name = "Rocket Relay"
base_url = "{proxy.url}/v1"
env_key = "RR_API_KEY"
wire_api = "responses"

[analytics]
enabled = false

[otel]
exporter = "none"
''')
    env = {**_quiet_env(tmp_path), "CODEX_HOME": str(codex_home), "RR_API_KEY": key}
    done = await _run([str(npm_bin / "codex"), "exec", "--skip-git-repo-check", "Say hello"], env, tmp_path)
    assert done.returncode == 0, f"codex exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert ANSWER in done.stdout, done.stdout + done.stderr
    print(f"codex exec via {api_format}: {done.stdout.strip()!r}")  # shown with `pytest -s`
    await _assert_all_charged(db, org_id)
