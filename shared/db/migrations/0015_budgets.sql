-- Spend budgets (issue 13, item 3): a limit per period on what one API key (api_key_id) or the whole org
-- (api_key_id null) may spend. `period` day/week/month; `window_kind` calendar (in RR_BUDGET_TIMEZONE) or
-- rolling (shared/budgets.py defines both exactly). The proxy enforces `limit_micros` in the reserve script;
-- `alert_percent` of it is the soft threshold past which rr-worker emits `budget.exceeded` (once per budget
-- per period). One budget per scope, period and window: at most 6 per key and 6 per org, which bounds the
-- reserve script's work.
-- A key's budget belongs to the key's own org: (api_key_id, org_id) must name one key of that org.
create unique index if not exists api_keys_id_org on api_keys (id, org_id);
create table if not exists budgets (
    id            bigint generated always as identity primary key,
    org_id        bigint not null references orgs(id) on delete cascade,
    api_key_id    bigint,
    period        text not null check (period in ('day', 'week', 'month')),
    window_kind   text not null check (window_kind in ('calendar', 'rolling')),
    limit_micros  bigint not null check (limit_micros > 0 and limit_micros <= 1000000000000000),
    alert_percent smallint check (alert_percent between 1 and 100),
    created_by    bigint references users(id) on delete set null,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    foreign key (api_key_id, org_id) references api_keys (id, org_id) on delete cascade
);
create unique index if not exists budgets_one_per_scope
    on budgets (org_id, coalesce(api_key_id, 0), period, window_kind);
create index if not exists budgets_key on budgets (api_key_id) where api_key_id is not null;
