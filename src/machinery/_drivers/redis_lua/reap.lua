-- Return every message of consumers whose heartbeat has expired to the head of the queue,
-- and forget those consumers. Atomic, so two reapers never both return one list.
-- KEYS[1]  the queue's heartbeat sorted set (machinery:heartbeats:<queue>), scored by the
--          Unix time in ms until which each consumer counts as alive
-- KEYS[2]  the queue
-- ARGV[1]  now, Unix ms
-- ARGV[2]  the processing-list prefix (machinery:processing:<queue>:)
-- Returns  how many messages went back
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local returned = 0
for _, consumer in ipairs(dead) do
  local processing = ARGV[2] .. consumer
  while redis.call('LMOVE', processing, KEYS[2], 'RIGHT', 'LEFT') do
    returned = returned + 1
  end
  redis.call('ZREM', KEYS[1], consumer)
end
return returned
