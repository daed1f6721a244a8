"""Named fault-injection points for crash tests (`RR_FAILPOINT=<name>`).

A process whose settings name a point exits abruptly (no cleanup, no flush, like a kill -9) when it
reaches it. Unset in production, the check is one string comparison.
"""

from __future__ import annotations

import os
import sys

__all__ = ["FLUSHER_AFTER_COMMIT", "FLUSHER_AFTER_COPY", "FLUSHER_BEFORE_COPY", "hit"]

FLUSHER_BEFORE_COPY = "flusher.before_copy"
FLUSHER_AFTER_COPY = "flusher.after_copy"  # inside the transaction: rolled back by the crash
FLUSHER_AFTER_COMMIT = "flusher.after_commit"  # committed, not acknowledged: redelivered later

_EXIT_CODE = 77


def hit(configured: str, point: str) -> None:
    if configured == point:
        sys.stderr.write(f"failpoint {point}: exiting\n")
        sys.stderr.flush()
        os._exit(_EXIT_CODE)
