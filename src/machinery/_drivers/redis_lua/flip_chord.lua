-- Flip ChordTriggered in a group's stored metadata, on the group's key alone (on a Redis
-- Cluster, where Go's TriggerChordMutex is in another slot; the caller holds that mutex).
-- KEYS[1]  the group UUID (GroupMeta JSON)
-- ARGV[1]  the expiry in seconds
-- Returns  1 flipped by us, 0 already set, -1 no such group, -2 JSON this script cannot
--          edit in place
local value = redis.call('GET', KEYS[1])
if not value then return -1 end
if string.find(value, '"ChordTriggered":true', 1, true) then return 0 end
local flipped, count = string.gsub(value, '"ChordTriggered":false', '"ChordTriggered":true', 1)
if count == 0 then return -2 end
redis.call('SET', KEYS[1], flipped, 'EX', ARGV[1])
return 1
