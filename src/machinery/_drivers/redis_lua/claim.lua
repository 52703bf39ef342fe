-- Hold a key for a while unless someone holds it (a unique task's key).
-- KEYS[1]  the key (machinery_unique_<key>)
-- ARGV[1]  our value (the task UUID)
-- ARGV[2]  for how long, ms
-- Returns  false if we hold it now, else the holder's value
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
