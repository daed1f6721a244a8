-- Settle requests: release each one's reservation, debit its real cost, append its usage event to the
-- billing stream — atomically, so a debit never exists without its event (and the event is what PostgreSQL
-- gets). A proxy settles all the requests of one event-loop turn (of one shard: one cluster slot) in one call.
-- Race prevented: a retried settle (reply lost) charging twice. The reservation is the guard: only the
-- call that removes it debits. If the reservation vanished because Redis lost its data (the balance was
-- rebuilt since: another epoch), the event is still appended and the rebuilt balance debited.
-- Lean by design (it runs for every request): ZREM, one HMGET and one HSET of the org's hash, one XADD.
-- Numbers go back to Redis as integer strings: Lua would write -0 or 1e+15, which Redis rejects.
local function int(x) return string.format('%d', x) end

-- One request. KEYS from k: balance, reservations, stream, spend, then `nb` budget counters; ARGV from a:
-- rid, held, cost, token delta, key id, org id, epoch, payload, window, spend capped, then `nb` buckets
-- ('' for a calendar counter, else the rolling bucket it was counted in).
local function settle(k, a, nb)
  local bal, rz, stream, spend = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local rid, held, cost, token_delta = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local key_id, org_id, epoch, payload, window = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
  local spend_capped = ARGV[a + 9] == '1'  -- the reservation was counted in the key's monthly spend

  local removed = redis.call('ZREM', rz, rid .. ':' .. int(held)) == 1
  local kw, kt = 'k' .. key_id .. ':w', 'k' .. key_id .. ':t'
  local b = redis.call('HMGET', bal, 'balance', 'reserved', 'epoch', 'w', 'o:t', kw, kt)
  if not removed and b[1] and b[3] == epoch then
    return 0  -- already settled by an earlier call (or expired after the proxy died): never charge twice
  end
  if b[1] then
    local set = {'balance', int(tonumber(b[1]) - cost)}
    if removed then set[3], set[4] = 'reserved', int(tonumber(b[2] or 0) - held) end
    -- The window's token counters held the estimate: corrected to the real count (if still that window).
    if token_delta ~= 0 then
      if b[4] == window then set[#set + 1], set[#set + 2] = 'o:t', int(tonumber(b[5] or 0) + token_delta) end
      if b[6] == window then set[#set + 1], set[#set + 2] = kt, int(tonumber(b[7] or 0) + token_delta) end
    end
    redis.call('HSET', bal, unpack(set))
  end
  if removed then
    local delta = int(cost - held)
    if spend_capped and redis.call('EXISTS', spend) == 1 then redis.call('INCRBY', spend, delta) end
    -- Budgets: the reservation counted there is corrected to the real cost (unless the counter or bucket
    -- is gone: a period long over).
    for i = 1, nb do
      local counter, bucket = KEYS[k + 3 + i], ARGV[a + 9 + i]
      if bucket == '' then
        if redis.call('EXISTS', counter) == 1 then redis.call('INCRBY', counter, delta) end
      elseif redis.call('HEXISTS', counter, bucket) == 1 then
        redis.call('HINCRBY', counter, bucket, delta)
      end
    end
  end
  if payload ~= '' then redis.call('XADD', stream, '*', 'o', org_id, 'c', int(cost), 'd', payload) end
  return 1
end

-- ARGV[1]: how many requests; each then takes 1 + 10 + nb ARGV (nb first) and 4 + nb KEYS.
local results, k, a = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local nb = tonumber(ARGV[a])
  results[i] = settle(k, a + 1, nb)
  k, a = k + 4 + nb, a + 11 + nb
end
return results
