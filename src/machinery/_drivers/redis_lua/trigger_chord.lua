-- Flip ChordTriggered in a group's stored metadata, unless a Go worker holds Go's global
-- TriggerChordMutex: a script runs atomically, so this is Go's critical section without
-- holding the mutex across round trips (docs/wire.md §11.1).
-- KEYS[1]  TriggerChordMutex
-- KEYS[2]  the group UUID (GroupMeta JSON)
-- ARGV[1]  the expiry in seconds
-- Returns  1 flipped by us, 0 already set, -1 no such group, -2 JSON this script cannot
--          edit in place, -3 the mutex is held
if redis.call('EXISTS', KEYS[1]) == 1 then return -3 end
local value = redis.call('GET', KEYS[2])
if not value then return -1 end
if string.find(value, '"ChordTriggered":true', 1, true) then return 0 end
local flipped, count = string.gsub(value, '"ChordTriggered":false', '"ChordTriggered":true', 1)
if count == 0 then return -2 end
redis.call('SET', KEYS[2], flipped, 'EX', ARGV[1])
return 1
