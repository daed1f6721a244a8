-- Model quality: what the probe runner (rr-worker) sends to every route, what it finds, and the status the
-- router reads. Probes are ours (shared/quality/suite.py); only hashes and derived numbers of their answers
-- are kept, never an answer's text.

-- The router's view: healthy routes first, degraded after, failing and quarantined not at all. Set by the
-- probe runner with hysteresis (shared/quality/status.py) or by a platform admin (quarantine only so).
alter table routes add column probe_status text not null default 'healthy'
    check (probe_status in ('healthy', 'degraded', 'failing', 'quarantined'));

-- The route a model's other routes are compared with (known answers, tool calls, answer distributions,
-- usage shape). Null: the route of the provider named like the model's owner, else none (self-baselines only).
alter table models add column reference_route_id bigint references routes (id) on delete set null;

-- Per-route state of the status machine and of the schedule.
create table route_quality (
    route_id        bigint primary key references routes (id) on delete cascade,
    -- consecutive evaluations at or above each level, and below the current status (see status.py)
    degraded_streak integer not null default 0,
    failing_streak  integer not null default 0,
    clean_streak    integer not null default 0,
    -- a platform admin's override: the status stays as set until the pin is lifted
    pinned          boolean not null default false,
    pin_reason      text,
    status_since    timestamptz not null default now(),
    next_round_at   timestamptz,
    last_round_at   timestamptz,
    rounds          bigint not null default 0
);

-- One probe request and its outcome. No answer text: hashes, token counts and derived features only.
create table probe_results (
    id                 bigserial primary key,
    round_id           uuid not null,
    route_id           bigint not null references routes (id) on delete cascade,
    model              text not null,
    provider           text not null,
    upstream_model     text not null,
    suite_version      text not null,
    probe_id           text not null,
    kind               text not null check (kind in ('known_answer', 'deterministic', 'tool_call',
                                                     'long_context', 'fingerprint')),
    started_at         timestamptz not null,
    http_status        smallint,
    error_code         text,
    ttfb_ms            integer,
    total_ms           integer,
    prompt_hash        bytea not null,
    response_hash      bytea,
    prompt_chars       integer not null,
    answer_chars       integer,
    prompt_tokens      integer,
    completion_tokens  integer,
    reported_model     text,
    system_fingerprint text,
    outcome            text not null check (outcome in ('pass', 'fail', 'error', 'sample')),
    features           jsonb not null default '{}',
    cost_micros        bigint not null default 0,
    route_status       text not null
);
create index probe_results_route_idx on probe_results (route_id, started_at desc);
create index probe_results_round_idx on probe_results (round_id);
create index probe_results_started_idx on probe_results (started_at);

-- What the detectors found, with the evidence behind it, per evaluation (after each round).
create table quality_findings (
    id           bigserial primary key,
    route_id     bigint not null references routes (id) on delete cascade,
    round_id     uuid not null,
    detector     text not null,
    severity     text not null check (severity in ('degraded', 'failing')),
    confidence   double precision not null check (confidence >= 0 and confidence <= 1),
    p_value      double precision,
    evidence     jsonb not null,
    reference_route_id bigint,
    created_at   timestamptz not null default now()
);
create index quality_findings_route_idx on quality_findings (route_id, created_at desc);

-- Every change of a route's probe status: by the detectors (actor null) or by an admin (with a reason).
create table route_status_history (
    id            bigserial primary key,
    route_id      bigint not null references routes (id) on delete cascade,
    from_status   text not null,
    to_status     text not null,
    reason        text not null,
    actor_user_id bigint references users (id) on delete set null,
    round_id      uuid,
    created_at    timestamptz not null default now()
);
create index route_status_history_route_idx on route_status_history (route_id, id desc);

-- Probe spend of the platform account, per UTC day: one row per route and one for all routes (route_id 0).
-- `reserved_micros` holds the worst case of probes in flight, so concurrent runners never pass a budget.
create table probe_spend (
    day             date not null,
    route_id        bigint not null,
    spent_micros    bigint not null default 0 check (spent_micros >= 0),
    reserved_micros bigint not null default 0 check (reserved_micros >= 0),
    probes          integer not null default 0,
    refused         integer not null default 0,
    primary key (day, route_id)
);

-- Per-request evidence: the probe status of the route that served the request, when it served it.
alter table request_logs add column route_status text;
