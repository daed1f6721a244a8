-- Control plane: the append-only audit log of every mutation made through the portal or platform admin.
-- No foreign keys on purpose: deleting a user or an org must neither fail nor rewrite history.

create table audit_log (
    id            bigserial primary key,
    created_at    timestamptz not null default now(),
    actor_user_id bigint,
    actor_email   text,
    -- the actor's role in `org_id` when acting as a member, or 'platform_admin'
    actor_role    text not null,
    org_id        bigint,
    action        text not null,
    target_type   text not null,
    target_id     text,
    -- {"field": {"before": …, "after": …}} for the fields that changed; secrets appear as "[redacted]"
    changes       jsonb not null default '{}',
    ip            inet
);
create index audit_log_org_idx on audit_log (org_id, id desc);
create index audit_log_actor_idx on audit_log (actor_user_id, id desc);

-- Append-only: the database itself refuses to change or remove an entry, whoever asks.
create function rr_audit_log_append_only() returns trigger
language plpgsql as $$
begin
    raise exception 'audit_log is append-only (% refused)', tg_op using errcode = 'insufficient_privilege';
end;
$$;

create trigger audit_log_no_update_delete before update or delete on audit_log
    for each row execute function rr_audit_log_append_only();
create trigger audit_log_no_truncate before truncate on audit_log
    for each statement execute function rr_audit_log_append_only();
