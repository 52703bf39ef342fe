-- Publish prioritized messages onto one queue, each behind those of its priority or higher.
-- KEYS[1]  the queue
-- ARGV     pairs: priority (1-9), message
-- Returns  how many were placed
for i = 1, #ARGV, 2 do
  push_prioritized(KEYS[1], ARGV[i + 1], tonumber(ARGV[i]))
end
return #ARGV / 2
