-- Put every dead letter of a queue back on it, oldest first, and empty the dead-letter list.
-- KEYS[1]  the dead-letter list (machinery:dead:<queue>); each element is a JSON header
--          line (queue, reason, time), a newline, then the message exactly as it was
-- KEYS[2]  the queue
-- Returns  how many went back
local letters = redis.call('LRANGE', KEYS[1], 0, -1)
for _, letter in ipairs(letters) do
  local newline = string.find(letter, '\n', 1, true)
  redis.call('RPUSH', KEYS[2], string.sub(letter, newline + 1))
end
redis.call('DEL', KEYS[1])
return #letters
