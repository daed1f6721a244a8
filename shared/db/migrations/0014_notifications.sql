-- Notifications (issue 13): mail and signed outbound webhooks, fanned out from `event_outbox`.
-- Nothing here holds a body of a request or an answer, nor a receiver's response: ids, addresses, statuses,
-- counts and times. Secrets (the SMTP password, webhook signing secrets) are `secrets` rows.

-- The platform's SMTP account (one row), set by platform admins. tls_mode 'none' only for a loopback host.
create table if not exists smtp_config (
    id                 boolean primary key default true check (id),
    host               text not null check (host ~ '^[A-Za-z0-9.:\[\]-]{1,253}$'),
    port               integer not null check (port between 1 and 65535),
    tls_mode           text not null check (tls_mode in ('implicit', 'starttls', 'none')),
    username           text check (length(username) <= 254),
    password_secret_id uuid references secrets (id),
    from_address       text not null check (length(from_address) between 3 and 254),
    updated_at         timestamptz not null default now()
);

-- Low-balance detection: whether each alert is armed, and how many crossings it announced (the dedupe key
-- of the next one). Updated in the transaction that moves the balance (the flusher's batch, a ledger entry).
create table if not exists balance_alert_state (
    org_id             bigint primary key references orgs (id) on delete cascade,
    low_armed          boolean not null default true,
    low_crossings      integer not null default 0,
    depleted_armed     boolean not null default true,
    depleted_crossings integer not null default 0,
    updated_at         timestamptz not null default now()
);

-- An org's webhook endpoints. During a rotation the previous secret keeps signing (a second signature)
-- until previous_secret_expires_at.
create table if not exists webhook_endpoints (
    id                         bigserial primary key,
    org_id                     bigint not null references orgs (id) on delete cascade,
    url                        text not null check (length(url) between 8 and 2048),
    description                text not null default '' check (length(description) <= 500),
    event_types                text[] not null check (cardinality(event_types) >= 1),
    secret_id                  uuid not null references secrets (id),
    previous_secret_id         uuid references secrets (id),
    previous_secret_expires_at timestamptz,
    active                     boolean not null default true,
    created_by                 bigint references users (id) on delete set null,
    created_at                 timestamptz not null default now(),
    updated_at                 timestamptz not null default now()
);
create index if not exists webhook_endpoints_org_idx on webhook_endpoints (org_id) where active;

-- One delivery of one event to one endpoint (a replay is a new row naming the one it replays). Only our own
-- record of each attempt: status, attempts, the last response code and latency, an error class.
create table if not exists webhook_deliveries (
    id               bigserial primary key,
    org_id           bigint not null references orgs (id) on delete cascade,
    endpoint_id      bigint not null references webhook_endpoints (id) on delete cascade,
    event_id         bigint not null references event_outbox (id) on delete cascade,
    event_type       text not null,
    status           text not null default 'pending' check (status in ('pending', 'succeeded', 'failed', 'refused')),
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null,
    last_attempt_at  timestamptz,
    response_status  integer,
    latency_ms       integer,
    error            text check (length(error) <= 200),
    replay_of        bigint references webhook_deliveries (id) on delete set null,
    created_at       timestamptz not null,
    completed_at     timestamptz
);
create index if not exists webhook_deliveries_due_idx on webhook_deliveries (next_attempt_at) where status = 'pending';
create index if not exists webhook_deliveries_endpoint_idx on webhook_deliveries (endpoint_id, id);
create index if not exists webhook_deliveries_created_idx on webhook_deliveries (created_at);

-- One mail: who it goes to and which template, never its rendered body (rendered at each attempt from the
-- template and the event). A mail that finally fails stays 'failed' for platform admins to see.
create table if not exists mail_messages (
    id              bigserial primary key,
    org_id          bigint references orgs (id) on delete cascade,
    event_id        bigint references event_outbox (id) on delete cascade,
    template        text not null check (template in ('balance_low', 'balance_depleted', 'payment_receipt',
                                                      'payment_failed', 'test')),
    recipients      text[] not null check (cardinality(recipients) between 1 and 50),
    status          text not null default 'pending' check (status in ('pending', 'sent', 'failed')),
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null,
    last_attempt_at timestamptz,
    error           text check (length(error) <= 200),
    created_at      timestamptz not null,
    sent_at         timestamptz
);
create index if not exists mail_messages_due_idx on mail_messages (next_attempt_at) where status = 'pending';
create index if not exists mail_messages_failed_idx on mail_messages (id) where status = 'failed';
create index if not exists mail_messages_created_idx on mail_messages (created_at);
