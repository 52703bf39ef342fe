-- The records of the workers whose heartbeat has not expired.
-- KEYS[1]  the expiry index (machinery:workers)
-- KEYS[2]  the records (machinery:workers:info)
-- ARGV[1]  now, Unix ms
-- Returns  the WorkerInfo JSON of each live worker, in tag order
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')
table.sort(live)
if #live == 0 then return {} end
local records = redis.call('HMGET', KEYS[2], unpack(live))
local out = {}
for _, record in ipairs(records) do
  if record then out[#out + 1] = record end
end
return out
