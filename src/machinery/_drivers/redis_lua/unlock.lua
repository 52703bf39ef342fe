-- redsync's release of a mutex: delete it only if it still holds our value.
-- KEYS[1]  the mutex key (TriggerChordMutex)
-- ARGV[1]  the value we set when taking it
-- Returns  1 deleted, 0 held by someone else (or expired)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
else
  return 0
end
