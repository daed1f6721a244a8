-- Retention of the monthly-partitioned tables: partitions whose whole range lies before the retention
-- window are dropped. Bounds come from the catalog (pg_inherits + relpartbound), never from partition names,
-- so a renamed or hand-made partition is judged by what it can hold.

-- The range partitions of `parent` with their bounds; null where a bound is MINVALUE/MAXVALUE (or for a
-- default partition, which has neither).
create function rr_month_partitions(parent text)
returns table (partition regclass, lower_bound timestamptz, upper_bound timestamptz)
language sql stable
-- pg_get_expr prints the bounds with the session's DateStyle and TimeZone; ISO reads back unambiguously.
set datestyle = 'ISO, YMD'
as $$
    select c.oid::regclass,
           (regexp_match(b.expr, $re$FROM \('([^']+)'\)$re$))[1]::timestamptz,
           (regexp_match(b.expr, $re$TO \('([^']+)'\)$re$))[1]::timestamptz
    from pg_inherits i
    join pg_class c on c.oid = i.inhrelid
    cross join lateral (select pg_get_expr(c.relpartbound, c.oid) as expr) b
    where i.inhparent = parent::regclass and c.relispartition
    order by 2 nulls first
$$;

-- Drops the partitions of `parent` whose upper bound is at least `keep_days` days in the past, so every row
-- they could hold is older than the window; the current and future months are never touched. Returns how
-- many were dropped. Shares rr_ensure_month_partitions' lock, so creating and dropping never interleave.
-- Dropping a partition takes an ACCESS EXCLUSIVE lock on the parent: callers should set a lock_timeout
-- rather than queue every writer of the table behind a long reader.
create function rr_drop_expired_partitions(parent text, keep_days integer) returns integer
language plpgsql as $$
declare
    cutoff timestamptz;
    expired regclass;
    dropped integer := 0;
begin
    if keep_days is null or keep_days < 1 then
        raise exception 'keep_days must be at least 1 (got %)', keep_days;
    end if;
    perform pg_advisory_xact_lock(hashtext('rr_ensure_month_partitions'));
    cutoff := now() - make_interval(days => keep_days);
    for expired in
        select p.partition from rr_month_partitions(parent) p
        where p.upper_bound is not null and p.upper_bound <= cutoff and p.upper_bound <= now()
    loop
        execute format('drop table %s', expired);
        dropped := dropped + 1;
    end loop;
    return dropped;
end;
$$;
