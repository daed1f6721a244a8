"""`rr-dev` (`make run`) starts the control plane beside the proxy, prints `control plane: http://…` and a
demo platform-admin login that works; and `rr-create-admin` makes a platform admin on a real deployment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from shared.embedded import free_port
from shared.settings import Settings
from tests.conftest import ROOT, settings_env
from tests.control_plane.conftest import CONTROL_PLANE_OVERRIDES, PASSWORD, isolated_database


def test_make_run_starts_the_control_plane_and_prints_a_working_admin_login(servers, settings: Settings) -> None:
    with isolated_database(servers[0], settings, "dev") as isolated, tempfile.TemporaryDirectory() as data:
        env = settings_env(isolated, proxy_port=free_port(), control_plane_port=free_port(),
                           **CONTROL_PLANE_OVERRIDES)
        env.update(RR_DATA_DIR=data, RR_MOCK_PORT=str(free_port()))
        env.pop("UPSTREAM_BASE_URL", None)
        out_path = Path(data) / "out.txt"
        with out_path.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "shared.dev"], env=env, cwd=ROOT, stdout=out,
                                       stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while "Press Ctrl-C" not in out_path.read_text():
                assert process.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(0.2)
            text = out_path.read_text()
            [url] = re.findall(r"^control plane: (http://127\.0\.0\.1:\d+)$", text, re.MULTILINE)
            [(email, password)] = re.findall(r"Admin login (\S+) / (\S+)", text)
            login = httpx.post(url + "/v1/auth/login", json={"email": email, "password": password})
            assert login.status_code == 200, login.text
            me = httpx.get(url + "/v1/me", headers={"authorization": f"Bearer {login.json()['access_token']}"})
            assert me.json()["is_platform_admin"] is True
            assert [(m["org_code"], m["role"]) for m in me.json()["memberships"]] == [("demo", "owner")]
            assert httpx.get(url + "/openapi.json").status_code == 200

            # The printed top-up works against the local Stripe, whose webhook credits the demo org.
            assert "Top up the demo org by card (the local Stripe at http://127.0.0.1:" in text
            [(org_id, amount)] = re.findall(r"/v1/orgs/(\d+)/payments/stripe-checkout .*amount_micros\\?\":(\d+)",
                                            text)
            auth = {"authorization": f"Bearer {login.json()['access_token']}"}
            before = httpx.get(f"{url}/v1/orgs/{org_id}/balance", headers=auth).json()["balance_micros"]
            started = httpx.post(f"{url}/v1/orgs/{org_id}/payments/stripe-checkout", headers=auth,
                                 json={"amount_micros": int(amount)})
            assert started.status_code == 201, started.text + out_path.read_text()
            assert httpx.post(started.json()["url"] + "/pay", timeout=10).status_code == 200
            balance = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                balance = httpx.get(f"{url}/v1/orgs/{org_id}/balance", headers=auth).json()["balance_micros"]
                if balance == before + int(amount):
                    break
                time.sleep(0.2)
            assert balance == before + int(amount), (balance, (Path(data) / "local-stripe.log").read_text()[-2000:])
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, out_path.read_text()


def test_create_admin_command(settings: Settings, db) -> None:
    email = f"ops-{os.getpid()}-{time.monotonic_ns()}@example.com"
    command = [sys.executable, "-m", "control_plane.seed", email, "--password-stdin"]
    done = subprocess.run(command, input=PASSWORD + "\n", env=settings_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"platform admin {email}" in done.stdout and PASSWORD not in done.stdout + done.stderr
    short = subprocess.run(command, input="short\n", env=settings_env(settings), cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert short.returncode != 0 and "at least 10 characters" in short.stderr
