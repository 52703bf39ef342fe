-- On a Redis Cluster, the first step of moving due delayed tasks (the queues are in other
-- slots, so no script can push them): lease up to ARGV[2] due messages to the caller by moving
-- their score to ARGV[3]. Other movers, ours and Go's, then see them as not yet due. The caller
-- pushes them to their queues and then removes them; if it dies before removing them they
-- become due again at ARGV[3] and are moved again (at-least-once: a duplicate, never a loss).
-- KEYS[1]  the delayed set (delayed_tasks), members = message JSON, scores = ETA in Unix ns
-- ARGV[1]  now, Unix ns
-- ARGV[2]  the most messages to lease
-- ARGV[3]  the end of the lease, Unix ns
-- Returns  {the leased messages, in ETA order; the score of the next delayed message or false}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, message in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], message)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {due, nxt[2] or false}
