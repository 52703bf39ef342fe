-- Move due delayed tasks from Go's delayed sorted set to the list named by their RoutingKey,
-- as Go's mover republishes them (docs/wire.md §9.3), up to ARGV[2] at a time; a prioritized
-- one goes in by its priority (priority.lua is prepended).
-- KEYS[1]  the delayed set (delayed_tasks), members = message JSON, scores = ETA in Unix ns
-- ARGV[1]  now, Unix ns
-- ARGV[2]  the most messages to move
-- ARGV[3]  the queue for a message without a usable RoutingKey (the default queue)
-- Returns  {how many moved, the score of the next delayed message or false}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, message in ipairs(due) do
  redis.call('ZREM', KEYS[1], message)
  local queue = ARGV[3]
  local ok, decoded = pcall(cjson.decode, message)
  if ok and type(decoded) == 'table' then
    local key = decoded['RoutingKey']
    if key == nil then
      -- Go matches JSON keys case-insensitively.
      for name, value in pairs(decoded) do
        if string.lower(name) == 'routingkey' then key = value end
      end
    end
    if type(key) == 'string' and key ~= '' then queue = key end
  end
  local priority = priority_of(message)
  if priority > 0 then
    push_prioritized(queue, message, priority)
  else
    redis.call('RPUSH', queue, message)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
