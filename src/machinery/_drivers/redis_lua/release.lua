-- A consumer closing: return its processing list to the head of the queue, oldest first. Its
-- heartbeat is set to expire shortly rather than removed: a blocking take cancelled at
-- shutdown can still land a message in the list after this, and a reaper finds it by that
-- heartbeat. The heartbeat set itself then expires once every heartbeat in it has, unless a
-- consumer that died still holds messages (they wait there for the next reaper).
-- KEYS[1]  the consumer's processing list
-- KEYS[2]  the queue
-- KEYS[3]  the queue's heartbeat sorted set
-- ARGV[1]  the consumer id (its member in KEYS[3])
-- ARGV[2]  when its heartbeat expires, Unix ms
-- ARGV[3]  the processing-list prefix (machinery:processing:<queue>:)
-- Returns  how many messages went back
local returned = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do
  returned = returned + 1
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local members = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
local latest = 0
for i = 1, #members, 2 do
  if members[i] ~= ARGV[1] and redis.call('LLEN', ARGV[3] .. members[i]) > 0 then
    return returned
  end
  local score = tonumber(members[i + 1])
  if score > latest then latest = score end
end
-- A little after the latest heartbeat: the grace of this close, or a live consumer's (whose
-- next beat makes the set persistent again).
redis.call('PEXPIREAT', KEYS[3], math.floor(latest) + 1000)
return returned
