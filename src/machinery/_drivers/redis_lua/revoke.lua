-- Record a revocation until ARGV[3], and bump the version workers poll.
-- KEYS[1]  the revoked set (machinery:{revoked}): task UUID -> Unix ms until which it holds
-- KEYS[2]  the UUIDs to stop if they run (machinery:{revoked}:terminate), a set
-- KEYS[3]  the version (machinery:{revoked}:version), a counter
-- ARGV[1]  now, Unix ms
-- ARGV[2]  the task UUID
-- ARGV[3]  until when, Unix ms (the results' expiry)
-- ARGV[4]  "1" to stop the task if it runs, "0" to skip it only
-- Returns  the new version
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  redis.call('SREM', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
if ARGV[4] == '1' then redis.call('SADD', KEYS[2], ARGV[2]) else redis.call('SREM', KEYS[2], ARGV[2]) end
local version = redis.call('INCR', KEYS[3])
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], latest) end
return version
