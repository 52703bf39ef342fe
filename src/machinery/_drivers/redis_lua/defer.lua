-- Give a taken message back for later: move it from the processing list into Go's delayed
-- set, due at ARGV[2], only if it was still there (a reaper may have returned it meanwhile).
-- Go's mover and ours both release it to the list its RoutingKey names (docs/wire.md §9.3).
-- KEYS[1]  the consumer's processing list
-- KEYS[2]  the delayed set (delayed_tasks)
-- ARGV[1]  the message as taken
-- ARGV[2]  when it is due, Unix ns (the set's score, as Go scores ETAs)
-- Returns  1 deferred, 0 the message was no longer in the processing list
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
