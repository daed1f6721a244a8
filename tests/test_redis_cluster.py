"""The money tests on a 3-master Redis Cluster: a second pytest session over a selected set of test files
with `RR_TEST_REDIS_CLUSTER=1` (tests/conftest.py then starts the cluster of tests/redis_cluster.py and sets
RR_REDIS_CLUSTER for every process). The Lua scripts, the billing streams, the key cache and the rate
limits run unchanged; any CROSSSLOT error fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

MONEY_TESTS = [
    "tests/proxy/test_billing.py",
    "tests/proxy/test_rate_limits.py",
    "tests/proxy/test_reservation_bounds.py",
    "tests/shared/test_billing_scripts.py",
    "tests/shared/test_flusher.py",
    "tests/proxy/test_ledger_durability.py",
]


def test_money_tests_pass_on_a_redis_cluster() -> None:
    env = {**os.environ, "RR_TEST_REDIS_CLUSTER": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                           *MONEY_TESTS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    output = done.stdout + done.stderr
    assert "CROSSSLOT" not in output, output[-4000:]
    assert done.returncode == 0, output[-4000:]
    print(output.strip().splitlines()[-1])
