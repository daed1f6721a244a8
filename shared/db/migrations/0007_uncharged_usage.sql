-- Usage an upstream delivered beyond the request's reservation (it ignored the output cap the relay
-- forwarded, or a prompt cost more than its bound): the org is charged at most the reservation, and the
-- rest is kept here, per request, for platform admins (GET /v1/admin/uncharged-usage).
alter table usage_records add column uncharged_micros bigint not null default 0
    check (uncharged_micros >= 0);
create index usage_records_uncharged on usage_records (created_at) where uncharged_micros > 0;
