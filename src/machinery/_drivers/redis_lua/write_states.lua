-- Store task states under their task UUIDs, as Go's Redis backend does (SET <uuid> <json> EX
-- <ttl>), atomically instead of Go's GET-then-SET, and publish completed ones so that a
-- waiting client wakes at once (docs/wire.md §11.1).
-- KEYS[i]      the task UUID of state i
-- ARGV[1]      the expiry in seconds (refreshed on every write)
-- ARGV[2i]     mode of state i: bit 1 keeps the CreatedAt already stored (by us or by Go) in
--              place of the one in the JSON; bit 2 publishes the value on
--              machinery:done:<uuid> (a completion)
-- ARGV[2i+1]   the TaskState JSON of state i
-- Returns      how many states were written
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  local mode = tonumber(ARGV[2 * i])
  local value = ARGV[2 * i + 1]
  if mode % 2 == 1 then
    local old = redis.call('GET', key)
    local created = old and string.match(old, '"CreatedAt"%s*:%s*"([^"]*)"') or '0001-01-01T00:00:00Z'
    value = string.gsub(value, '"CreatedAt":"[^"]*"', '"CreatedAt":"' .. created .. '"', 1)
  end
  redis.call('SET', key, value, 'EX', ttl)
  if mode >= 2 then
    redis.call('PUBLISH', 'machinery:done:' .. key, value)
  end
end
return #KEYS
