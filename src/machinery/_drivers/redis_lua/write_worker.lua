-- Record a live worker's heartbeat, forget workers whose heartbeat expired, and let both keys
-- expire when the last worker stops beating (nothing here outlives the workers).
-- KEYS[1]  the expiry index (machinery:workers), a sorted set: tag -> Unix ms until alive
-- KEYS[2]  the records (machinery:workers:info), a hash: tag -> WorkerInfo JSON
-- ARGV[1]  now, Unix ms
-- ARGV[2]  until when this worker counts as alive, Unix ms
-- ARGV[3]  the worker's tag
-- ARGV[4]  its WorkerInfo JSON ("" to forget it: it stopped)
-- Returns  how many workers are alive
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, tag in ipairs(gone) do
  redis.call('HDEL', KEYS[2], tag)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if latest[2] then
  redis.call('PEXPIREAT', KEYS[1], latest[2])
  redis.call('PEXPIREAT', KEYS[2], latest[2])
end
return redis.call('ZCARD', KEYS[1])
