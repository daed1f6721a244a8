"""`POST /v1/webhooks/stripe`: Stripe's events, verified and stored before they are acknowledged.

The order is what makes a crash harmless: verify the signature (400 and nothing stored if it is wrong or
stale), store the reduced event in `stripe_events` and commit, only then answer 200. A process that dies
before the commit never answered, so Stripe delivers again; one that dies after it left the event in the
queue, where the next delivery (a duplicate id, stored once) or rr-worker processes it. Processing runs
inline after the commit so that a top-up shows at once, but its failure never turns the answer into an
error: the event is safe in the queue.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Controller, Request, post

from control_plane.common import CP, DEPENDENCIES
from control_plane.errors import BadRequest, ServiceUnavailable
from control_plane.permissions import require
from shared import failpoints
from shared.payments.stripe_account import load_stripe_config
from shared.payments.stripe_events import HANDLED_TYPES, BadWebhook, store_event, verify_event

__all__ = ["WebhooksController"]

log = logging.getLogger("rocket_relay.control_plane")

INLINE_EVENTS = 20  # events processed in the webhook request (this one, and those it unblocked)


class WebhookAck(msgspec.Struct, frozen=True):
    received: bool
    duplicate: bool  # this event id was stored before (Stripe delivers at least once)
    ignored: bool  # a type we do not act on (acknowledged, not stored)


class WebhooksController(Controller):
    path = "/v1/webhooks"
    dependencies = DEPENDENCIES
    tags = ("webhooks",)

    @post("/stripe", guards=[require("public")], status_code=200, opt={"errors": (503,)})
    async def stripe_webhook(self, cp: CP, request: Request) -> WebhookAck:
        """Stripe's webhook endpoint (configure it in Stripe with the signing secret set in admin/stripe).
        Answers 400 to a bad signature or a timestamp outside the tolerance, 503 while unconfigured."""
        payload = await request.body()
        config = await load_stripe_config(cp.pool, cp.box)
        if not config.webhook_secret:
            raise ServiceUnavailable("Stripe webhooks are not configured.", code="stripe_not_configured")
        try:
            event = verify_event(payload, request.headers.get("stripe-signature"), config.webhook_secret,
                                 cp.settings.stripe_webhook_tolerance_s)
        except BadWebhook as exc:
            raise BadRequest(str(exc), code="invalid_webhook") from None
        if event["type"] not in HANDLED_TYPES:
            return WebhookAck(True, False, True)
        stored = await store_event(cp.pool, event)
        failpoints.hit(cp.settings.failpoint, failpoints.STRIPE_AFTER_STORE)
        try:
            await cp.stripe_events.process_due(INLINE_EVENTS)
        except Exception as exc:  # the event is stored: rr-worker or the next delivery processes it
            log.error("processing Stripe events after receipt failed (%s)", type(exc).__name__, exc_info=exc)
        return WebhookAck(True, not stored, False)
