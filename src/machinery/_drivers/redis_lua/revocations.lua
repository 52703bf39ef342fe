-- The live revocations, unless the version is still the one the caller has.
-- KEYS[1]  the revoked set (machinery:{revoked})
-- KEYS[2]  the UUIDs to stop if they run (machinery:{revoked}:terminate)
-- KEYS[3]  the version (machinery:{revoked}:version)
-- ARGV[1]  now, Unix ms
-- ARGV[2]  the version the caller has
-- Returns  false when unchanged, else {version, uuid1, terminate1 ("1"/"0"), uuid2, ...}
local version = redis.call('GET', KEYS[3]) or '0'
if version == ARGV[2] then return false end
local out = {version}
for _, uuid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  out[#out + 1] = uuid
  out[#out + 1] = tostring(redis.call('SISMEMBER', KEYS[2], uuid))
end
return out
