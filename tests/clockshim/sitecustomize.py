"""Sets the wall clock of a test's child process (and of its own children: granian's workers).

Python imports `sitecustomize` at start-up from the path, so a process started with this folder on
PYTHONPATH and `RR_TEST_PROCESS_CLOCK=<ISO time>` runs with time-machine's clock starting there and ticking
(`time.time()`, `datetime.now()`; the monotonic clock is not moved). Tests only: it is how a test puts a
proxy on either side of a budget period's end (tests/proxy/test_budgets.py).
"""

import os

_clock = os.environ.get("RR_TEST_PROCESS_CLOCK")
if _clock:
    import datetime

    import time_machine

    time_machine.travel(datetime.datetime.fromisoformat(_clock.replace("Z", "+00:00")), tick=True).start()
