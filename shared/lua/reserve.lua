-- Rate-limit check and balance reservation for one request, in one atomic call.
-- Race prevented: two proxies checking the same balance or counter and both passing. Everything is read
-- and written here, in one script, so concurrent requests of one org serialise on Redis.
-- Numbers go back to Redis as integer strings: Lua would write -0 or 1e+15, which Redis rejects.
local function int(x) return string.format('%d', x) end
local bal, res, rexp, rl, spend = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rid = ARGV[1]
local amount = tonumber(ARGV[2])
local est_tokens = tonumber(ARGV[3])
local key_id = ARGV[4]
local key_rpm, key_tpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local org_rpm, org_tpm = tonumber(ARGV[7]), tonumber(ARGV[8])
local now_ms, ttl_ms = tonumber(ARGV[9]), tonumber(ARGV[10])
local spend_cap = tonumber(ARGV[11] or 0)  -- the key's monthly spend cap (0: none)
-- Budgets (shared/budgets.py): ARGV[12] of them, each 4 ARGV from ARGV[13] and its counter at KEYS[5 + i]:
--   'c' (calendar), limit, counter lifetime (s), period end (ms: the reset time), or
--   'r' (rolling), limit, the bucket of now, bucket length (ms); the window is the last 24 buckets.
local n_budgets = tonumber(ARGV[12] or 0)
local ROLLING_BUCKETS = 24

-- Release the reservations of requests whose proxy died before settling (they would hold money forever).
local stale = redis.call('ZRANGEBYSCORE', rexp, '-inf', now_ms, 'LIMIT', 0, 50)
for _, id in ipairs(stale) do
  local held = redis.call('HGET', res, id)
  if held then
    redis.call('HDEL', res, id)
    redis.call('HINCRBY', bal, 'reserved', int(0 - tonumber(held)))
  end
  redis.call('ZREM', rexp, id)
end

-- No live balance (first use, or Redis lost its data): the caller rebuilds it from PostgreSQL and retries.
if redis.call('EXISTS', bal) == 0 then return {0} end

-- Fixed one-minute windows; check every limit before counting any, so a refusal counts nothing.
local kr, kt = 'k' .. key_id .. ':r', 'k' .. key_id .. ':t'
local c = redis.call('HMGET', rl, kr, kt, 'o:r', 'o:t')
local used_kr, used_kt = tonumber(c[1] or 0), tonumber(c[2] or 0)
local used_or, used_ot = tonumber(c[3] or 0), tonumber(c[4] or 0)
if key_rpm > 0 and used_kr + 1 > key_rpm then return {1, 'requests', key_rpm, 0} end
if org_rpm > 0 and used_or + 1 > org_rpm then return {1, 'requests', org_rpm, 0} end
if key_tpm > 0 and used_kt + est_tokens > key_tpm then return {1, 'tokens', key_tpm, key_tpm - used_kt} end
if org_tpm > 0 and used_ot + est_tokens > org_tpm then return {1, 'tokens', org_tpm, org_tpm - used_ot} end

local b = redis.call('HMGET', bal, 'balance', 'reserved', 'credit', 'epoch')
local available = tonumber(b[1]) + tonumber(b[3] or 0) - tonumber(b[2] or 0)
if amount > available then return {2, available} end
-- The key's spend this month counts reservations too, corrected to the real cost at settlement.
if spend_cap > 0 then
  local spent = tonumber(redis.call('GET', spend) or 0)
  if spent + amount > spend_cap then return {4, spend_cap, spent} end
end
-- Budgets count reservations the same way. Race prevented: concurrent requests each seeing room under the
-- limit and together passing it; check and count happen here, in one script, and every budget is checked
-- before any is counted, so a refusal counts nothing.
for i = 1, n_budgets do
  local at, counter = 12 + (i - 1) * 4, KEYS[5 + i]
  local kind, limit, a, b = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local spent, resets_ms = 0, b
  if kind == 'c' then
    spent = tonumber(redis.call('GET', counter) or 0)
  else
    local buckets, fields = {}, redis.call('HGETALL', counter)
    for j = 1, #fields, 2 do
      local bucket, v = tonumber(fields[j]), tonumber(fields[j + 1])
      if bucket <= a - ROLLING_BUCKETS then
        redis.call('HDEL', counter, fields[j])  -- out of the window (changes no sum)
      else
        spent = spent + v
        buckets[#buckets + 1] = {bucket, v}
      end
    end
    if spent + amount > limit then
      -- The reset: when enough old buckets have left the window for this request to fit (everything gone,
      -- if it never fits).
      table.sort(buckets, function(x, y) return x[1] < y[1] end)
      local left = spent
      resets_ms = (a + ROLLING_BUCKETS) * b
      for _, bv in ipairs(buckets) do
        left = left - bv[2]
        if left + amount <= limit then resets_ms = (bv[1] + ROLLING_BUCKETS) * b break end
      end
    end
  end
  if spent + amount > limit then return {5, i, limit, spent, resets_ms} end
end

if spend_cap > 0 then
  redis.call('INCRBY', spend, int(amount))
  redis.call('EXPIRE', spend, 3456000)  -- 40 days: past the end of its month
end
for i = 1, n_budgets do
  local at, counter = 12 + (i - 1) * 4, KEYS[5 + i]
  if ARGV[at + 1] == 'c' then
    redis.call('INCRBY', counter, int(amount))
    redis.call('EXPIRE', counter, ARGV[at + 3])
  else
    local a, b = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
    redis.call('HINCRBY', counter, ARGV[at + 3], int(amount))
    -- Kept while a bucket is in the window, plus a reservation's lifetime so settlement can correct it.
    redis.call('PEXPIRE', counter, int((a + ROLLING_BUCKETS) * b - now_ms + ttl_ms))
  end
end

redis.call('HINCRBY', bal, 'reserved', int(amount))
redis.call('HSET', res, rid, int(amount))
redis.call('ZADD', rexp, int(now_ms + ttl_ms), rid)
redis.call('HINCRBY', rl, kr, 1)
redis.call('HINCRBY', rl, kt, int(est_tokens))
redis.call('HINCRBY', rl, 'o:r', 1)
redis.call('HINCRBY', rl, 'o:t', int(est_tokens))
redis.call('PEXPIRE', rl, 120000)
-- The tightest remaining requests / tokens across key and org limits (-1: unlimited).
local rem_r, lim_r, rem_t, lim_t = -1, -1, -1, -1
if key_rpm > 0 then rem_r, lim_r = key_rpm - used_kr - 1, key_rpm end
if org_rpm > 0 and (rem_r < 0 or org_rpm - used_or - 1 < rem_r) then rem_r, lim_r = org_rpm - used_or - 1, org_rpm end
if key_tpm > 0 then rem_t, lim_t = key_tpm - used_kt - est_tokens, key_tpm end
if org_tpm > 0 and (rem_t < 0 or org_tpm - used_ot - est_tokens < rem_t) then
  rem_t, lim_t = org_tpm - used_ot - est_tokens, org_tpm
end
return {3, b[4] or '', lim_r, rem_r, lim_t, rem_t}
