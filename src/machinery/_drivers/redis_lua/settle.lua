-- Settle one taken message other than by ack: remove it from the processing list and append
-- ARGV[2] to KEYS[2], but only if it was still there, so that a message a reaper returned to
-- the queue meanwhile is never duplicated.
-- KEYS[1]  the consumer's processing list
-- KEYS[2]  where it goes: the queue (requeue) or the dead-letter list (dead letter)
-- ARGV[1]  the message as taken
-- ARGV[2]  what to append: the message itself, or its dead letter (header line + message)
-- Returns  1 if settled here, 0 if the message was no longer in the processing list
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
