-- A consumer's heartbeat: alive until ARGV[2]. The set stays while anyone beats (a close may
-- have let it expire; see release.lua).
-- KEYS[1]  the queue's heartbeat sorted set (machinery:heartbeats:<queue>)
-- ARGV[1]  the consumer id
-- ARGV[2]  alive until, Unix ms
-- Returns  1
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PERSIST', KEYS[1])
return 1
