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
  redis.call('INCRBY', spend, int(amount))
  redis.call('EXPIRE', spend, 3456000)  -- 40 days: past the end of its month
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
