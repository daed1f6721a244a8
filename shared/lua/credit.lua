-- Apply a committed ledger credit or debit (top-up, adjustment, refund, reversal) to the live balance.
-- Race prevented: a retried call applying twice, and a rebuild that already counted this transaction
-- (it marks the transactions of its snapshot as applied). Without a live balance the amount is parked in
-- the pending-credits hash, which the next rebuild adds unless its snapshot already holds it.
local bal, pcred, acred = KEYS[1], KEYS[2], KEYS[3]
local txn, amount = ARGV[1], ARGV[2]  -- kept as the caller's integer string
if redis.call('HSETNX', acred, txn, 1) == 0 then return 0 end
redis.call('EXPIRE', acred, 7200)
if redis.call('EXISTS', bal) == 1 then
  redis.call('HINCRBY', bal, 'balance', amount)
  return 1
end
redis.call('HSET', pcred, txn, amount)
return 2
