-- Money in: Stripe top-ups and subscriptions, reviewed crypto top-ups (shared/payments/).
-- What is kept of a payment is what the data-processing summary names: Stripe customer, checkout, payment
-- and subscription identifiers; crypto transaction hash, sender address, network, amount and review status.
-- Never card details, names, emails or addresses from Stripe: webhook events are reduced to identifiers and
-- amounts before they are stored.

-- The platform's Stripe account: its secret key and webhook signing secret (envelope-encrypted in
-- `secrets`), and the API base (null: Stripe's own; `make run` points it at a local Stripe).
create table stripe_config (
    id                boolean primary key default true check (id),
    secret_key_id     uuid references secrets (id) on delete set null,
    webhook_secret_id uuid references secrets (id) on delete set null,
    api_base          text check (api_base ~ '^https?://[\x21-\x7e]+$'),
    -- 'dev': written by `make run` for its local Stripe (replaced on each run); 'admin': set by an admin
    origin            text not null default 'admin' check (origin in ('admin', 'dev')),
    updated_at        timestamptz not null default now()
);

-- One Stripe customer per org, created on first need.
create table stripe_customers (
    org_id      bigint primary key references orgs (id) on delete cascade,
    customer_id text not null unique,
    created_at  timestamptz not null default now()
);

-- Subscription plans: a price per month (whole cents) and the allowance each paid invoice credits.
create table billing_plans (
    id                       bigserial primary key,
    name                     text not null unique check (length(name) between 1 and 100),
    price_cents              bigint not null check (price_cents > 0),
    monthly_allowance_micros bigint not null check (monthly_allowance_micros > 0),
    active                   boolean not null default true,
    created_at               timestamptz not null default now()
);

create table stripe_subscriptions (
    subscription_id  text primary key,
    org_id           bigint not null references orgs (id) on delete cascade,
    plan_id          bigint references billing_plans (id) on delete set null,
    status           text not null,
    checkout_session_id text unique,
    -- `created` of the newest subscription event applied: an older event arriving late changes nothing
    event_created    bigint not null default 0,
    updated_at       timestamptz not null default now()
);
create index stripe_subscriptions_org_idx on stripe_subscriptions (org_id);

-- Every payment of an org, by Stripe or crypto. amount_micros: asked for (Stripe checkout), paid (Stripe
-- invoice) or claimed (crypto); credited_micros: what the ledger was credited; reversed_micros: refunded
-- or lost in disputes (debited again).
create table payments (
    id                         bigserial primary key,
    org_id                     bigint not null references orgs (id) on delete cascade,
    method                     text not null check (method in ('stripe', 'crypto')),
    purpose                    text not null check (purpose in ('topup', 'subscription')),
    status                     text not null check (status in ('pending', 'succeeded', 'refunded',
                                   'partially_refunded', 'disputed', 'approved', 'rejected', 'failed')),
    amount_micros              bigint not null check (amount_micros >= 0),
    credited_micros            bigint not null default 0 check (credited_micros >= 0),
    reversed_micros            bigint not null default 0 check (reversed_micros >= 0),
    -- Stripe: the highest cumulative refunded amount (cents) applied, so refund events in any order
    -- debit each refunded cent once
    refunded_cents             bigint not null default 0 check (refunded_cents >= 0),
    paid_cents                 bigint,
    currency                   text not null default 'usd',
    transaction_id             bigint references balance_transactions (id),
    stripe_customer_id         text,
    stripe_checkout_session_id text unique,
    stripe_payment_intent_id   text unique,
    stripe_charge_id           text unique,
    stripe_invoice_id          text unique,
    stripe_subscription_id     text,
    plan_id                    bigint references billing_plans (id) on delete set null,
    crypto_network             text,
    -- normalised (lower-case hex, no 0x): unique across all orgs and networks, so one transfer is
    -- claimed once
    crypto_tx_hash             text unique,
    crypto_sender_address      text,
    chain_check                text,
    review_reason              text check (length(review_reason) <= 500),
    reviewer_user_id           bigint references users (id) on delete set null,
    reviewed_at                timestamptz,
    created_by                 bigint references users (id) on delete set null,
    created_at                 timestamptz not null default now(),
    updated_at                 timestamptz not null default now(),
    succeeded_at               timestamptz,
    check ((method = 'crypto') = (crypto_tx_hash is not null))
);
create index payments_org_idx on payments (org_id, id desc);
create index payments_review_idx on payments (status, id) where method = 'crypto';

-- The durable queue of Stripe webhook events: stored (verified, reduced to identifiers and amounts) in the
-- webhook request's transaction, answered 200 only after commit, processed each in a transaction with
-- its ledger effect. A row stays after processing: a redelivered event id is recognised forever.
create table stripe_events (
    id             text primary key,
    type           text not null,
    stripe_created bigint not null,
    facts          jsonb not null,
    received_at    timestamptz not null default now(),
    -- 'pending': to process; 'waiting': refers to a payment not yet known (retried as others arrive);
    -- 'processed'; 'held': could not be applied (unsupported currency, unknown payment for too long ...),
    -- kept for a platform admin
    status         text not null default 'pending'
                   check (status in ('pending', 'waiting', 'processed', 'held')),
    attempts       integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    outcome        text,
    processed_at   timestamptz
);
create index stripe_events_todo_idx on stripe_events (next_attempt_at) where status in ('pending', 'waiting');

-- Ledger rows whose live (Redis) balance update is not confirmed yet: written in the ledger entry's
-- transaction, deleted once the credit script ran. A process that died in between leaves the row, and
-- rr-worker applies it (the credit script is idempotent on the transaction id).
create table pending_live_credits (
    transaction_id bigint primary key references balance_transactions (id) on delete cascade,
    created_at     timestamptz not null default now()
);
