-- BYOK: an org's own credential per provider (envelope-encrypted in `secrets`), and the price rule for
-- requests served with it (a per-model price setting: zero, or a platform fee).

create table org_provider_credentials (
    org_id      bigint not null references orgs (id) on delete cascade,
    provider_id bigint not null references providers (id) on delete cascade,
    secret_id   uuid not null references secrets (id),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (org_id, provider_id)
);

alter table model_prices
    add column byok_input_micros_per_mtok  bigint not null default 0 check (byok_input_micros_per_mtok >= 0),
    add column byok_output_micros_per_mtok bigint not null default 0 check (byok_output_micros_per_mtok >= 0),
    add column byok_request_micros         bigint not null default 0 check (byok_request_micros >= 0);

alter table request_logs add column byok boolean not null default false;
