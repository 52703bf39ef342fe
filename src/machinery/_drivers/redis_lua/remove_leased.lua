-- On a Redis Cluster, the last step of moving due delayed tasks (see lease_due.lua): remove the
-- messages this mover leased and pushed, but only those still holding its lease. A message
-- deferred again meanwhile (taken from the queue, run, and given back for later: the same
-- bytes, a new score) is a new delayed task and must stay.
-- KEYS[1]  the delayed set (delayed_tasks)
-- ARGV[1]  the lease's score, Unix ns, as given to lease_due.lua
-- ARGV[2...] the leased messages
-- Returns  how many were removed
local lease = tonumber(ARGV[1])
local removed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == lease then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
