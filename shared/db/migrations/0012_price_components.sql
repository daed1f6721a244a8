-- Prices with the components providers bill separately, tiers by prompt size and service tier, and usage
-- records that keep every component (see shared/money.py for how a missing component falls back).
alter table model_prices
    add column cached_input_micros_per_mtok   bigint check (cached_input_micros_per_mtok >= 0),
    add column cache_write_5m_micros_per_mtok bigint check (cache_write_5m_micros_per_mtok >= 0),
    add column cache_write_1h_micros_per_mtok bigint check (cache_write_1h_micros_per_mtok >= 0),
    add column reasoning_micros_per_mtok      bigint check (reasoning_micros_per_mtok >= 0),
    add column input_image_micros_per_mtok    bigint check (input_image_micros_per_mtok >= 0),
    add column input_audio_micros_per_mtok    bigint check (input_audio_micros_per_mtok >= 0),
    add column output_image_micros_per_mtok   bigint check (output_image_micros_per_mtok >= 0),
    add column output_audio_micros_per_mtok   bigint check (output_audio_micros_per_mtok >= 0),
    add column byok_cached_input_micros_per_mtok   bigint check (byok_cached_input_micros_per_mtok >= 0),
    add column byok_cache_write_5m_micros_per_mtok bigint check (byok_cache_write_5m_micros_per_mtok >= 0),
    add column byok_cache_write_1h_micros_per_mtok bigint check (byok_cache_write_1h_micros_per_mtok >= 0),
    add column byok_reasoning_micros_per_mtok      bigint check (byok_reasoning_micros_per_mtok >= 0),
    -- A price version is every row of a model with the same effective_from: one row per service tier
    -- ('default', 'flex', 'priority', 'batch', ...) and prompt-size tier (the row applies from this many
    -- prompt tokens up, e.g. 200000 for a long-context price).
    add column service_tier      text    not null default 'default' check (service_tier ~ '^[a-z0-9_]{1,32}$'),
    add column min_prompt_tokens integer not null default 0 check (min_prompt_tokens >= 0);
alter table model_prices drop constraint model_prices_model_effective_from_key;
alter table model_prices add constraint model_prices_version_tier_key
    unique (model, effective_from, service_tier, min_prompt_tokens);

alter table usage_records
    add column cached_input_tokens   integer not null default 0,
    add column cache_write_5m_tokens integer not null default 0,
    add column cache_write_1h_tokens integer not null default 0,
    add column reasoning_tokens      integer not null default 0,
    add column input_image_tokens    integer not null default 0,
    add column input_audio_tokens    integer not null default 0,
    add column output_image_tokens   integer not null default 0,
    add column output_audio_tokens   integer not null default 0,
    add column service_tier          text,
    add column estimated             boolean not null default false;

alter table request_logs add column estimated boolean not null default false;
