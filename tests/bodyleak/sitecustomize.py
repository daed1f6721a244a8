"""Makes a test's child proxy log every request body on purpose: the deliberate leak that the privacy canary
(tests/test_privacy_canary.py) must catch end to end, with no switch for it in product code.

Python imports `sitecustomize` at start-up from the path, so a process started with this folder on PYTHONPATH
and `RR_TEST_LOG_BODIES=1` (and its children: granian's workers) reads bodies through a `BodyReader.read`
wrapped to also log them as a careless debugging change would. Tests only.
"""

import os

if os.environ.get("RR_TEST_LOG_BODIES") == "1":
    import functools
    import logging

    from proxy.http import BodyReader

    _read = BodyReader.read
    _log = logging.getLogger("rocket_relay.proxy")

    @functools.wraps(_read)
    async def _read_and_log(self, receive, declared, client):
        body = await _read(self, receive, declared, client)
        _log.warning("body %s", body.decode(errors="replace"))
        return body

    BodyReader.read = _read_and_log
