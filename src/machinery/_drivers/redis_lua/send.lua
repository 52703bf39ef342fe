-- Send tasks when the broker and the result backend are one Redis: store each PENDING state as
-- Go's SetStatePending does (SET <uuid> <json> EX <ttl>), then RPUSH the messages onto Go's
-- queue lists, in one round trip. A script runs atomically, so no worker (Go's BLPOP included)
-- can take a message before its PENDING state is there, which is the order Go's SendTask keeps.
-- KEYS[1..n]     the task UUIDs (n = ARGV[2])
-- KEYS[n+1..]    the queues, one per group of messages below
-- ARGV[1]        the states' expiry in seconds
-- ARGV[2]        n, how many states
-- ARGV[3..n+2]   the PENDING TaskState JSON of each task
-- ARGV[n+3..]    per queue: how many messages, then the messages
-- Returns        how many messages were pushed
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[2 + i], 'EX', ARGV[1])
end
local at, pushed = n + 3, 0
for q = n + 1, #KEYS do
  local count = tonumber(ARGV[at])
  for first = at + 1, at + count, 1000 do  -- unpack() has a limit on how many values it returns
    redis.call('RPUSH', KEYS[q], unpack(ARGV, first, math.min(first + 999, at + count)))
  end
  at, pushed = at + count + 1, pushed + count
end
return pushed
