-- Book a run under a rate limit, by the generic cell rate algorithm: the key holds the
-- theoretical arrival time of the next run; a run may go when that is at most (burst - 1)
-- intervals ahead, and each booking moves it on by one interval. Redis's own clock is used,
-- so that every worker agrees on "now".
-- KEYS[1]  the task's rate key (machinery_rate_<task name>)
-- ARGV[1]  the interval between runs, in microseconds
-- ARGV[2]  the burst (runs at once), at least 1
-- Returns  the microseconds until the booked run (0: now)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local arrival = tonumber(redis.call('GET', KEYS[1]) or now)
if arrival < now then arrival = now end
local wait = arrival - (tonumber(ARGV[2]) - 1) * interval - now
local following = arrival + interval
redis.call('SET', KEYS[1], string.format('%.0f', following), 'PX', math.ceil((following - now) / 1000) + 1000)
if wait > 0 then return math.ceil(wait) end
return 0
