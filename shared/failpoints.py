"""Named fault-injection points for crash tests (`RR_FAILPOINT=<name>`).

A process whose settings name a point exits abruptly (no cleanup, no flush, like a kill -9) when it
reaches it. Unset in production, the check is one string comparison.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "FLUSHER_AFTER_COMMIT",
    "FLUSHER_AFTER_COPY",
    "FLUSHER_BEFORE_COPY",
    "STRIPE_AFTER_COMMIT",
    "STRIPE_AFTER_STORE",
    "STRIPE_BEFORE_COMMIT",
    "hit",
]

FLUSHER_BEFORE_COPY = "flusher.before_copy"
FLUSHER_AFTER_COPY = "flusher.after_copy"  # inside the transaction: rolled back by the crash
FLUSHER_AFTER_COMMIT = "flusher.after_commit"  # committed, not acknowledged: redelivered later
# Stripe webhooks (shared.payments.stripe_events): the event is stored and committed but not processed, and
# Stripe has no answer yet (it delivers again); the event's ledger entry is written but not committed
# (rolled back); its ledger entry is committed but the live balance not yet credited (the outbox is).
STRIPE_AFTER_STORE = "stripe.after_store"
STRIPE_BEFORE_COMMIT = "stripe.before_commit"
STRIPE_AFTER_COMMIT = "stripe.after_commit"

_EXIT_CODE = 77


def hit(configured: str, point: str) -> None:
    if configured == point:
        sys.stderr.write(f"failpoint {point}: exiting\n")
        sys.stderr.flush()
        os._exit(_EXIT_CODE)
