-- Rate-limit check and balance reservation for requests, each atomic; a proxy sends the reservations of one
-- event-loop turn (of one shard: one cluster slot) in one call, and each gets its own answer.
-- Race prevented: two proxies checking the same balance or counter and both passing. Everything is read
-- and written here, in one script, so concurrent requests of one org serialise on Redis.
-- Lean by design (it runs for every request): the org's balance, reservations total and its and its keys'
-- rate-limit counters are fields of one hash, read with one HMGET and written with one HSET; the
-- reservation itself is one ZADD. Budgets and spend caps cost commands only where they are set.
-- Numbers go back to Redis as integer strings: Lua would write -0 or 1e+15, which Redis rejects.
local function int(x) return string.format('%d', x) end

-- One request. KEYS from k: balance, reservations, spend, then its budget counters; ARGV from a (after the
-- request's budget count): rid, amount, est tokens, key id, key rpm, key tpm, org rpm, org tpm, now (ms),
-- ttl (ms), the key's monthly spend cap (0: none), window (the unix minute: counters of another minute
-- count as zero), sweep ('1': release expired reservations first; the caller asks about once a second),
-- then per budget (shared/budgets.py) 4 ARGV:
--   'c' (calendar), limit, counter lifetime (s), period end (ms: the reset time), or
--   'r' (rolling), limit, the bucket of now, bucket length (ms); the window is the last 24 buckets.
local ROLLING_BUCKETS = 24
local function reserve(k, a, n_budgets)
  local bal, rz, spend = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local rid = ARGV[a]
  local amount = tonumber(ARGV[a + 1])
  local est_tokens = tonumber(ARGV[a + 2])
  local key_id = ARGV[a + 3]
  local key_rpm, key_tpm = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local org_rpm, org_tpm = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local now_ms, ttl_ms = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local spend_cap = tonumber(ARGV[a + 10])
  local window = ARGV[a + 11]
  local sweep = ARGV[a + 12] == '1'
  local count_org = org_rpm > 0 or org_tpm > 0
  local count_key = key_rpm > 0 or key_tpm > 0
  local kw, kr, kt = 'k' .. key_id .. ':w', 'k' .. key_id .. ':r', 'k' .. key_id .. ':t'
  local b = redis.call('HMGET', bal, 'balance', 'reserved', 'credit', 'epoch', 'w', 'o:r', 'o:t', kw, kr, kt)
  -- No live balance (first use, or Redis lost its data): the caller rebuilds it from PostgreSQL and retries.
  if not b[1] then return {0} end
  local reserved = tonumber(b[2] or 0)

  -- Release the reservations of requests whose proxy died before settling (they would hold money forever).
  -- A member is '<request id>:<amount>', so the amount comes with it.
  if sweep then
    local stale = redis.call('ZRANGEBYSCORE', rz, '-inf', now_ms, 'LIMIT', 0, 50)
    if #stale > 0 then
      for _, member in ipairs(stale) do reserved = reserved - tonumber(string.match(member, ':(%d+)$')) end
      redis.call('ZREM', rz, unpack(stale))
      redis.call('HSET', bal, 'reserved', int(reserved))
    end
  end

  local used_or, used_ot, used_kr, used_kt = 0, 0, 0, 0
  if b[5] == window then used_or, used_ot = tonumber(b[6] or 0), tonumber(b[7] or 0) end
  if b[8] == window then used_kr, used_kt = tonumber(b[9] or 0), tonumber(b[10] or 0) end
  -- Check every limit before counting any, so a refusal counts nothing.
  if key_rpm > 0 and used_kr + 1 > key_rpm then return {1, 'requests', key_rpm, 0} end
  if org_rpm > 0 and used_or + 1 > org_rpm then return {1, 'requests', org_rpm, 0} end
  if key_tpm > 0 and used_kt + est_tokens > key_tpm then return {1, 'tokens', key_tpm, key_tpm - used_kt} end
  if org_tpm > 0 and used_ot + est_tokens > org_tpm then return {1, 'tokens', org_tpm, org_tpm - used_ot} end

  local available = tonumber(b[1]) + tonumber(b[3] or 0) - reserved
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
    local at, counter = a + 12 + (i - 1) * 4, KEYS[k + 2 + i]
    local kind, limit, now_b, bl = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
    local spent, resets_ms = 0, bl
    if kind == 'c' then
      spent = tonumber(redis.call('GET', counter) or 0)
    else
      local buckets, fields = {}, redis.call('HGETALL', counter)
      for j = 1, #fields, 2 do
        local bucket, v = tonumber(fields[j]), tonumber(fields[j + 1])
        if bucket <= now_b - ROLLING_BUCKETS then
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
        resets_ms = (now_b + ROLLING_BUCKETS) * bl
        for _, bv in ipairs(buckets) do
          left = left - bv[2]
          if left + amount <= limit then resets_ms = (bv[1] + ROLLING_BUCKETS) * bl break end
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
    local at, counter = a + 12 + (i - 1) * 4, KEYS[k + 2 + i]
    if ARGV[at + 1] == 'c' then
      redis.call('INCRBY', counter, int(amount))
      redis.call('EXPIRE', counter, ARGV[at + 3])
    else
      local now_b, bl = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
      redis.call('HINCRBY', counter, ARGV[at + 3], int(amount))
      -- Kept while a bucket is in the window, plus a reservation's lifetime so settlement can correct it.
      redis.call('PEXPIRE', counter, int((now_b + ROLLING_BUCKETS) * bl - now_ms + ttl_ms))
    end
  end

  local set = {'reserved', int(reserved + amount)}
  if count_org then
    set[#set + 1], set[#set + 2] = 'w', window
    set[#set + 1], set[#set + 2] = 'o:r', int(used_or + 1)
    set[#set + 1], set[#set + 2] = 'o:t', int(used_ot + est_tokens)
  end
  if count_key then
    set[#set + 1], set[#set + 2] = kw, window
    set[#set + 1], set[#set + 2] = kr, int(used_kr + 1)
    set[#set + 1], set[#set + 2] = kt, int(used_kt + est_tokens)
  end
  redis.call('HSET', bal, unpack(set))
  redis.call('ZADD', rz, int(now_ms + ttl_ms), rid .. ':' .. int(amount))
  -- The tightest remaining requests / tokens across key and org limits (-1: unlimited).
  local rem_r, lim_r, rem_t, lim_t = -1, -1, -1, -1
  if key_rpm > 0 then rem_r, lim_r = key_rpm - used_kr - 1, key_rpm end
  if org_rpm > 0 and (rem_r < 0 or org_rpm - used_or - 1 < rem_r) then rem_r, lim_r = org_rpm - used_or - 1, org_rpm end
  if key_tpm > 0 then rem_t, lim_t = key_tpm - used_kt - est_tokens, key_tpm end
  if org_tpm > 0 and (rem_t < 0 or org_tpm - used_ot - est_tokens < rem_t) then
    rem_t, lim_t = org_tpm - used_ot - est_tokens, org_tpm
  end
  return {3, b[4] or '', lim_r, rem_r, lim_t, rem_t}
end

-- ARGV[1]: how many requests; each then takes 1 + 13 + 4 * nb ARGV (nb, its budget count, first) and
-- 3 + nb KEYS. The reply: one answer per request.
local results, k, a = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local nb = tonumber(ARGV[a])
  results[i] = reserve(k, a + 1, nb)
  k, a = k + 3 + nb, a + 14 + 4 * nb
end
return results
