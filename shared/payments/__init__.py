"""Money in: Stripe top-ups and subscriptions, reviewed crypto top-ups — each credited exactly once.

- `ledger`: cents ↔ micro-units, ledger entries inside a payment's transaction, and the outbox that gets
  each committed entry onto the live (Redis) balance even when the process dies right after the commit.
- `stripe_account`: the platform's Stripe settings (encrypted), the `stripe` client, customers, Checkout.
- `stripe_events`: webhook events verified, reduced to identifiers and amounts, stored as a durable queue,
  and processed each in one transaction with its ledger effect.
- `networks`: crypto networks, their hash and address formats, and the chain-verifier seam.
"""
