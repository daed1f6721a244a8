"""Notifications: org events (an outbox in PostgreSQL), outbound webhooks and mail."""
