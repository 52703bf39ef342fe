-- Take up to ARGV[1] messages from a queue into a consumer's processing list, oldest first.
-- KEYS[1]  the queue (Go's list, e.g. machinery_tasks)
-- KEYS[2]  the consumer's processing list (machinery:processing:<queue>:<consumer>)
-- ARGV[1]  the most messages to take
-- Returns  the messages taken, in queue order (possibly none)
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local message = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not message then break end
  out[i] = message
end
return out
