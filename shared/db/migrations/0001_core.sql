-- Core schema: accounts, API keys, the supply chain (models, prices, providers, routes), balances, the
-- monthly-partitioned request_logs and usage_records, and encrypted secrets.
-- Money columns are bigint micro-units (1 USD = 1,000,000) and end in _micros.

create table orgs (
    id                       bigserial primary key,
    name                     text not null check (length(name) between 1 and 200),
    code                     text not null unique check (code ~ '^[a-z0-9][a-z0-9-]{1,31}$'),
    status                   text not null default 'active' check (status in ('active', 'suspended')),
    credit_limit_micros      bigint not null default 0 check (credit_limit_micros >= 0),
    rpm_limit                integer check (rpm_limit > 0),
    tpm_limit                integer check (tpm_limit > 0),
    billing_email            text,
    alert_emails             text[] not null default '{}',
    low_balance_threshold_micros bigint,
    request_log_retention_days integer check (request_log_retention_days > 0),
    created_at               timestamptz not null default now()
);

create table users (
    id                bigserial primary key,
    email             text not null,
    password_hash     text,
    is_platform_admin boolean not null default false,
    created_at        timestamptz not null default now()
);
create unique index users_email_key on users (lower(email));

create table memberships (
    org_id     bigint not null references orgs (id) on delete cascade,
    user_id    bigint not null references users (id) on delete cascade,
    role       text not null check (role in ('owner', 'admin', 'developer', 'billing', 'viewer')),
    created_at timestamptz not null default now(),
    primary key (org_id, user_id)
);
create index memberships_user_idx on memberships (user_id);

-- A key is `rr-<prefix>_<secret>`; only the prefix and HMAC-SHA256(pepper, key) are stored.
create table api_keys (
    id                       bigserial primary key,
    org_id                   bigint not null references orgs (id) on delete cascade,
    name                     text not null default '' check (length(name) <= 200),
    prefix                   text not null unique,
    key_hash                 bytea not null unique,
    created_by               bigint references users (id) on delete set null,
    rpm_limit                integer check (rpm_limit > 0),
    tpm_limit                integer check (tpm_limit > 0),
    allowed_models           text[],
    monthly_spend_cap_micros bigint check (monthly_spend_cap_micros >= 0),
    expires_at               timestamptz,
    revoked_at               timestamptz,
    last_used_at             timestamptz,
    created_at               timestamptz not null default now()
);
create index api_keys_org_idx on api_keys (org_id);

-- Envelope-encrypted secrets: a random data key per secret (AES-256-GCM), itself wrapped by the master key
-- named by master_key_id. The row's id and kind are the associated data of both encryptions.
create table secrets (
    id            uuid primary key,
    kind          text not null,
    org_id        bigint references orgs (id) on delete cascade,
    master_key_id text not null,
    wrapped_key   bytea not null,
    ciphertext    bytea not null,
    hint          text not null default '',
    created_at    timestamptz not null default now(),
    rotated_at    timestamptz
);

-- The public model catalogue: what clients may put in `model`.
create table models (
    name       text primary key check (length(name) between 1 and 200),
    kind       text not null check (kind in ('chat', 'completion', 'embedding')),
    owned_by   text not null default 'rocket-relay',
    created_at timestamptz not null default now()
);

create table model_prices (
    id                      bigserial primary key,
    model                   text not null references models (name) on delete cascade,
    input_micros_per_mtok   bigint not null check (input_micros_per_mtok >= 0),
    output_micros_per_mtok  bigint not null check (output_micros_per_mtok >= 0),
    request_micros          bigint not null default 0 check (request_micros >= 0),
    effective_from          timestamptz not null default now(),
    created_at              timestamptz not null default now(),
    unique (model, effective_from)
);

create table providers (
    id                   bigserial primary key,
    name                 text not null unique,
    api_format           text not null default 'openai' check (api_format in ('openai', 'anthropic')),
    base_url             text not null,
    credential_secret_id uuid references secrets (id) on delete set null,
    connect_timeout_ms   integer not null default 5000 check (connect_timeout_ms > 0),
    read_timeout_ms      integer not null default 120000 check (read_timeout_ms > 0),
    status               text not null default 'active' check (status in ('active', 'disabled')),
    created_at           timestamptz not null default now()
);

create table routes (
    id             bigserial primary key,
    model          text not null references models (name) on delete cascade,
    provider_id    bigint not null references providers (id) on delete cascade,
    upstream_model text not null,
    priority       integer not null default 0,
    weight         integer not null default 100 check (weight > 0),
    status         text not null default 'active' check (status in ('active', 'degraded', 'disabled')),
    created_at     timestamptz not null default now(),
    unique (model, provider_id, upstream_model)
);

create table org_balances (
    org_id         bigint primary key references orgs (id) on delete cascade,
    balance_micros bigint not null default 0,
    updated_at     timestamptz not null default now()
);

-- One row per change of a balance; an org's balance equals the sum of its rows.
create table balance_transactions (
    id            bigserial primary key,
    org_id        bigint not null references orgs (id) on delete cascade,
    kind          text not null check (kind in ('topup', 'usage', 'refund', 'adjustment', 'payment_reversal')),
    amount_micros bigint not null,
    external_id   text,
    reason        text,
    actor_user_id bigint references users (id) on delete set null,
    created_at    timestamptz not null default now()
);
create index balance_transactions_org_idx on balance_transactions (org_id, created_at desc);
create unique index balance_transactions_external_key on balance_transactions (kind, external_id)
    where external_id is not null;

-- Request metadata, never bodies. request_id is ours (unique); client_request_id is the client's own.
create table request_logs (
    created_at         timestamptz not null,
    request_id         text not null,
    client_request_id  text,
    org_id             bigint,
    api_key_id         bigint,
    model              text,
    provider           text,
    route_id           bigint,
    upstream_model     text,
    reported_model     text,
    path               text not null,
    method             text not null,
    status_code        smallint not null,
    error_code         text,
    stream             boolean not null default false,
    latency_ms         integer not null,
    ttfb_ms            integer,
    prompt_tokens      integer,
    completion_tokens  integer,
    total_tokens       integer,
    attempts           smallint not null default 0,
    cost_micros        bigint,
    client_ip          inet,
    user_agent         text,
    primary key (created_at, request_id)
) partition by range (created_at);
create index request_logs_org_idx on request_logs (org_id, created_at desc, request_id);
create index request_logs_key_idx on request_logs (api_key_id, created_at desc);

create table usage_records (
    created_at        timestamptz not null,
    request_id        text not null,
    org_id            bigint not null,
    api_key_id        bigint,
    model             text not null,
    provider          text,
    route_id          bigint,
    prompt_tokens     integer not null default 0,
    completion_tokens integer not null default 0,
    cost_micros       bigint not null default 0,
    price_id          bigint,
    byok              boolean not null default false,
    primary key (created_at, request_id)
) partition by range (created_at);
create index usage_records_org_idx on usage_records (org_id, created_at desc);

-- Creates the monthly partitions of `parent` from the current month to `months_ahead` months on.
-- Serialised by an advisory lock so concurrent callers (migrate, proxies, partition manager) don't race.
create function rr_ensure_month_partitions(parent text, months_ahead integer) returns integer
language plpgsql as $$
declare
    month_start timestamptz;
    created integer := 0;
    part text;
begin
    perform pg_advisory_xact_lock(hashtext('rr_ensure_month_partitions'));
    for i in 0..months_ahead loop
        month_start := date_trunc('month', now() at time zone 'UTC') at time zone 'UTC'
                       + make_interval(months => i);
        part := format('%s_y%sm%s', parent, to_char(month_start at time zone 'UTC', 'YYYY'),
                       to_char(month_start at time zone 'UTC', 'MM'));
        if to_regclass(part) is null then
            execute format('create table %I partition of %I for values from (%L) to (%L)',
                           part, parent, month_start, month_start + interval '1 month');
            created := created + 1;
        end if;
    end loop;
    return created;
end;
$$;

select rr_ensure_month_partitions('request_logs', 2);
select rr_ensure_month_partitions('usage_records', 2);
