-- A consumer closing: return its processing list to the head of the queue, oldest first. Its
-- heartbeat is set to expire shortly rather than removed: a blocking take cancelled at
-- shutdown can still land a message in the list after this, and a reaper finds it by that
-- heartbeat.
-- KEYS[1]  the consumer's processing list
-- KEYS[2]  the queue
-- KEYS[3]  the queue's heartbeat sorted set
-- ARGV[1]  the consumer id (its member in KEYS[3])
-- ARGV[2]  when its heartbeat expires, Unix ms
-- Returns  how many messages went back
local returned = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do
  returned = returned + 1
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return returned
