-- What the batched writers (the proxies' request-log writer, the billing flusher) need to survive rows they
-- did not expect: partitions for the months their rows are actually in, whatever the clock says, and a
-- place for the rows PostgreSQL refuses.

-- Creates the monthly partition of `parent` for the (UTC) month of each of `moments` that no partition
-- covers yet; returns how many it created. Only the months given, so a batch holding one row from 1990 and
-- one from 2200 makes two partitions, not 2,500. Coverage is read from the catalog bounds (as retention
-- does), so a hand-made partition of another name counts. Same advisory lock as rr_ensure_month_partitions
-- and rr_drop_expired_partitions: creating and dropping never interleave.
create function rr_ensure_partitions_for(parent text, moments timestamptz[]) returns integer
language plpgsql as $$
declare
    month_start timestamptz;
    created integer := 0;
    part text;
begin
    perform pg_advisory_xact_lock(hashtext('rr_ensure_month_partitions'));
    for month_start in
        select distinct date_trunc('month', m at time zone 'UTC') at time zone 'UTC'
        from unnest(moments) m where m is not null and isfinite(m) order by 1
    loop
        continue when exists (
            select 1 from rr_month_partitions(parent) p
            where p.lower_bound <= month_start and month_start < p.upper_bound);
        part := format('%s_y%sm%s', parent, to_char(month_start at time zone 'UTC', 'YYYY'),
                       to_char(month_start at time zone 'UTC', 'MM'));
        execute format('create table %I partition of %I for values from (%L) to (%L)',
                       part, parent, month_start, month_start + interval '1 month');
        created := created + 1;
    end loop;
    return created;
end;
$$;

-- The month of `from_at` and `months_ahead` months after it: the partition manager's call, with the time
-- passed in by the caller rather than read from now() (so a test can fix the clock).
create function rr_ensure_month_partitions_from(parent text, from_at timestamptz, months_ahead integer)
returns integer
language sql as $$
    select rr_ensure_partitions_for(parent, array(
        select (date_trunc('month', from_at at time zone 'UTC') + make_interval(months => i)) at time zone 'UTC'
        from generate_series(0, months_ahead) i))
$$;

-- Rows a batched writer set aside because PostgreSQL (or the driver) refused them, one row each, so one bad
-- row never stops a writer and platform admins see what was set aside.
--   request_log: the row is not kept — only its request id, org and time (never its content: the model
--                string or user agent that made it fail is exactly what we must not copy around).
--   usage_event: a billing event is never dropped: `payload` is the raw stream entry (msgpack, as the
--                settle script wrote it), kept for repair, and `transaction_id` the ledger debit applied for
--                it (null when none could be, e.g. the org no longer exists), so the PostgreSQL balance
--                still matches the live balance that settle already debited.
create table rejected_rows (
    id             bigserial primary key,
    kind           text not null check (kind in ('request_log', 'usage_event')),
    request_id     text,
    org_id         bigint,
    row_created_at timestamptz,
    sqlstate       text,  -- null: refused by the driver before it reached PostgreSQL
    reason         text not null,  -- the error's class, never its message (messages may quote the value)
    shard          integer,
    stream_id      text,
    payload        bytea,
    cost_micros    bigint,
    transaction_id bigint references balance_transactions (id) on delete set null,
    rejected_at    timestamptz not null default now(),
    resolved_at    timestamptz,
    check ((kind = 'usage_event') = (payload is not null))
);
-- A billing batch replayed after an ambiguous commit keeps each event once (and debits it once).
create unique index rejected_rows_stream_key on rejected_rows (shard, stream_id) where kind = 'usage_event';
create index rejected_rows_open_idx on rejected_rows (kind, id desc) where resolved_at is null;

-- rr_drop_expired_partitions with the time given by the caller (its `now()` would make retention depend on
-- the database's clock, which a test cannot fix): drops the partitions of `parent` whose upper bound is at
-- least `keep_days` days before `at`; the month of `at` and later months are never touched. `at` is the
-- worker's clock (trusted as the writers' clocks are: they stamp the rows).
create function rr_drop_expired_partitions(parent text, keep_days integer, at timestamptz) returns integer
language plpgsql as $$
declare
    cutoff timestamptz;
    expired regclass;
    dropped integer := 0;
begin
    if keep_days is null or keep_days < 1 then
        raise exception 'keep_days must be at least 1 (got %)', keep_days;
    end if;
    if at is null then
        raise exception 'at must be a time';
    end if;
    perform pg_advisory_xact_lock(hashtext('rr_ensure_month_partitions'));
    cutoff := at - make_interval(days => keep_days);
    for expired in
        select p.partition from rr_month_partitions(parent) p
        where p.upper_bound is not null and p.upper_bound <= cutoff and p.upper_bound <= at
    loop
        execute format('drop table %s', expired);
        dropped := dropped + 1;
    end loop;
    return dropped;
end;
$$;
