-- Settle one request: release its reservation, debit the real cost, append the usage event to the billing
-- stream — atomically, so a debit never exists without its event (and the event is what PostgreSQL gets).
-- Race prevented: a retried settle (reply lost) charging twice. The reservation is the guard: only the
-- call that removes it debits. If the reservation vanished because Redis lost its data (the balance was
-- rebuilt since: another epoch), the event is still appended and the rebuilt balance debited.
-- Numbers go back to Redis as integer strings: Lua would write -0 or 1e+15, which Redis rejects.
local function int(x) return string.format('%d', x) end
local bal, res, rexp, rl, stream, spend = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local rid, cost, token_delta = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local key_id, org_id, epoch, payload = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
-- The reservation's budget counters at KEYS[7...], each with ARGV[7 + i]: '' (a calendar counter) or the
-- rolling bucket it was counted in.
local n_budgets = #KEYS - 6

local held = redis.call('HGET', res, rid)
local has_balance = redis.call('EXISTS', bal) == 1
if held then
  redis.call('HDEL', res, rid)
  redis.call('ZREM', rexp, rid)
  redis.call('HINCRBY', bal, 'reserved', int(0 - tonumber(held)))
  local delta = int(cost - tonumber(held))
  if redis.call('EXISTS', spend) == 1 then redis.call('INCRBY', spend, delta) end
  -- Budgets: the reservation counted there is corrected to the real cost (unless the counter or bucket is
  -- gone: a period long over).
  for i = 1, n_budgets do
    local counter, bucket = KEYS[6 + i], ARGV[7 + i]
    if bucket == '' then
      if redis.call('EXISTS', counter) == 1 then redis.call('INCRBY', counter, delta) end
    elseif redis.call('HEXISTS', counter, bucket) == 1 then
      redis.call('HINCRBY', counter, bucket, delta)
    end
  end
elseif has_balance and redis.call('HGET', bal, 'epoch') == epoch then
  return 0  -- already settled by an earlier call (or expired after the proxy died): never charge twice
end
if has_balance then redis.call('HINCRBY', bal, 'balance', int(0 - cost)) end
if token_delta ~= 0 and redis.call('EXISTS', rl) == 1 then
  redis.call('HINCRBY', rl, 'k' .. key_id .. ':t', int(token_delta))
  redis.call('HINCRBY', rl, 'o:t', int(token_delta))
end
if payload ~= '' then redis.call('XADD', stream, '*', 'o', org_id, 'c', int(cost), 'd', payload) end
return 1
