-- Placing a message by priority; prepended to the scripts that need it (LuaScript.load).
-- The head of a queue holds its prioritized messages, highest first and oldest first within a
-- priority, then the rest in order. Go's BLPOP and our LMOVE both take from the head, so Go
-- workers honour the order too (docs/wire.md §9.6).
local function priority_of(message)
  local ok, decoded = pcall(cjson.decode, message)
  if ok and type(decoded) == 'table' and type(decoded['Priority']) == 'number' then
    return math.min(decoded['Priority'], 9)
  end
  return 0
end

-- Insert a message of priority p (1-9) behind every message of priority p or higher. The probe
-- doubles and then halves, so the cost grows with the prioritized head, not with the queue.
local function push_prioritized(queue, message, p)
  local length = redis.call('LLEN', queue)
  local lo, hi = 0, 1
  while hi <= length and priority_of(redis.call('LINDEX', queue, hi - 1)) >= p do
    lo, hi = hi, hi * 2
  end
  if hi > length then hi = length end
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if priority_of(redis.call('LINDEX', queue, mid)) >= p then lo = mid + 1 else hi = mid end
  end
  if lo == 0 then
    redis.call('LPUSH', queue, message)
  elseif lo >= length then
    redis.call('RPUSH', queue, message)
  else
    -- LINSERT finds its pivot from the head; an identical earlier message only moves this one up.
    redis.call('LINSERT', queue, 'BEFORE', redis.call('LINDEX', queue, lo), message)
  end
end
