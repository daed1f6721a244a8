-- (Re)create an org's live balance from a PostgreSQL snapshot, unless one exists already.
-- balance = PostgreSQL balance - usage events of the org still in the stream after the flusher's
-- watermark (not in PostgreSQL yet) + credits applied while the balance was missing and not in the
-- snapshot. Race prevented: events and credits landing between the snapshot and this call being lost or
-- counted twice; this script sees the stream and credit markers at one instant.
-- Numbers go back to Redis as integer strings: Lua would write -0 or 1e+15, which Redis rejects.
local function int(x) return string.format('%d', x) end
local bal, res, stream, pcred, acred = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pg_balance, credit_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local watermark, org_id, epoch, dry_run = ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1'
local included = {}
for i = 7, #ARGV do included[ARGV[i]] = true end

if not dry_run and redis.call('EXISTS', bal) == 1 then return {0} end

local balance = pg_balance
local unflushed = 0
for _, entry in ipairs(redis.call('XRANGE', stream, '(' .. watermark, '+')) do
  local f = entry[2]
  if f[1] == 'o' and f[2] == org_id then
    balance = balance - tonumber(f[4])
    unflushed = unflushed + 1
  end
end
local pending = redis.call('HGETALL', pcred)
for i = 1, #pending, 2 do
  if not included[pending[i]] then balance = balance + tonumber(pending[i + 1]) end
end
if dry_run then
  local live = redis.call('HGET', bal, 'balance')
  return {2, int(balance), live or '', unflushed}
end

local reserved = 0  -- the reservations zset survived (members '<request id>:<amount>'): still held
for _, member in ipairs(redis.call('ZRANGE', res, 0, -1)) do
  reserved = reserved + tonumber(string.match(member, ':(%d+)$'))
end
redis.call('HSET', bal, 'balance', int(balance), 'reserved', int(reserved), 'credit', int(credit_limit), 'epoch', epoch)
redis.call('DEL', pcred)
for txn, _ in pairs(included) do redis.call('HSET', acred, txn, 1) end
if next(included) then redis.call('EXPIRE', acred, 7200) end
return {1, int(balance)}
