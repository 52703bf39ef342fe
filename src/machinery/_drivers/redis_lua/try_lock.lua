-- Go's periodic lock (docs/wire.md §12) in one atomic step: take the key if it is free, or if
-- the deadline it holds has passed. Deadlines are compared as decimal strings: Lua numbers
-- are doubles, and Unix nanoseconds are beyond 2^53, so tonumber() would round them.
-- KEYS[1]  the lock key (machinery_lock_<program><entry><spec>)
-- ARGV[1]  our deadline, Unix ns, as a decimal string (the value Go stores)
-- ARGV[2]  now, Unix ns, as a decimal string
-- ARGV[3]  the key's TTL in ms (until the deadline)
-- Returns  1 taken, 0 held by someone else
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then return 1 end
local held = redis.call('GET', KEYS[1])
local now = ARGV[2]
if held and string.match(held, '^[1-9]%d*$') and (#now > #held or (#now == #held and now > held)) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
