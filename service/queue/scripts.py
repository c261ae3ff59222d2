"""The queue's Lua scripts: every state change of a job is one of them, run atomically by Redis.

Each script is fenced by (worker, attempts) where a worker writes (`owned`): a worker that lost its job to another
(it was presumed dead) cannot overwrite the new owner's result. Every script is safe to repeat, so a retry after a
lost reply does no harm. `SCRIPTS` holds the full sources (the shared prelude, then the script), by name; the
client (service/queue/client.py) registers them and says what it passes as KEYS and ARGV (the comments here).
"""

from __future__ import annotations

from service.queue.keys import GROUP

EVENTS_MAXLEN = 256  # events kept per job (approximately): progress of a long job needs no more for SSE resume
DEAD_MAXLEN = 10_000  # dead letters kept (approximately)
JOB_SLOT = "@JOB@"  # where a job id goes in the per-job key names `claim` receives

# Per-job keys come in groups of four (Keys.per_job): hash, events, image, mask.

_PRELUDE = """
local function event(key, ttl, body)
  redis.call('XADD', key, 'MAXLEN', '~', '@EVENTS_MAXLEN@', '*', 'data', cjson.encode(body))
  redis.call('PEXPIRE', key, ttl)
end
local function ack(stream, entry)
  redis.call('XACK', stream, '@GROUP@', entry)
  redis.call('XDEL', stream, entry)
end
local function live(ttl, job, events, image, mask)
  for _, key in ipairs({job, events, image, mask}) do redis.call('PEXPIRE', key, ttl) end
end
local function owned(job, consumer, attempt)
  local v = redis.call('HMGET', job, 'worker', 'attempts', 'status')
  if v[1] == consumer and v[2] == attempt then return v[3] end
  return false
end
local function delivered(stream)
  -- the consumer group's last delivered entry id on `stream` ('0-0' when no group yet); the stream must exist
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
    if f['name'] == '@GROUP@' then last = f['last-delivered-id'] end
  end
  return last
end
local function past_deadline(job, now, default_s)
  local v = redis.call('HMGET', job, 'created', 'deadline_s')
  local deadline = v[2] or default_s
  if tonumber(now) - tonumber(v[1]) > tonumber(deadline) then
    return 'deadline exceeded: not started within ' .. deadline .. ' s of submission'
  end
  return false
end
local function settle(job, events, image, mask, status, err, now, ttl, results)
  redis.call('HSET', job, 'status', status, 'finished', now, 'results', results)
  if err then redis.call('HSET', job, 'error', err) end
  local v = redis.call('HMGET', job, 'step', 'total')
  event(events, ttl, {type=status, status=status, step=tonumber(v[1]), total=tonumber(v[2]), results=results,
                      error=err or nil, at=tonumber(now)})
  redis.call('PEXPIRE', job, ttl)
  redis.call('DEL', image, mask)
end
local function take(stream, dead, argv, entry, id, job, events, image, mask)
  -- count a delivery of `entry` (job `id`) to argv[1], or settle a job that must not run (see _TAKE's ARGV);
  -- {entry, HGETALL} when it may run
  local consumer, now, live_ttl, final_ttl, max_attempts = argv[1], argv[2], tonumber(argv[3]), tonumber(argv[4]),
                                                            tonumber(argv[6])
  local status = redis.call('HGET', job, 'status')
  local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
  if (not status) or status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    ack(stream, entry)
  elseif redis.call('HGET', job, 'cancel') == '1' then
    settle(job, events, image, mask, 'cancelled', false, now, final_ttl, 0)
    ack(stream, entry)
  elseif argv[7] == '1' and attempts >= max_attempts then
    local err = 'gave up after ' .. attempts .. ' attempts: the workers running it stopped responding'
    settle(job, events, image, mask, 'failed', err, now, final_ttl, 0)
    redis.call('XADD', dead, 'MAXLEN', '~', '@DEAD_MAXLEN@', '*', 'job', id, 'model', argv[8],
               'attempts', attempts, 'error', err, 'at', now)
    ack(stream, entry)
  elseif status == 'queued' and past_deadline(job, now, argv[5]) then
    settle(job, events, image, mask, 'failed', past_deadline(job, now, argv[5]), now, final_ttl, 0)
    ack(stream, entry)
  else
    redis.call('HINCRBY', job, 'attempts', 1)
    redis.call('HSET', job, 'status', 'queued', 'worker', consumer, 'step', 0)
    if status == 'running' then
      redis.call('HSET', job, 'total', 0)
      event(events, live_ttl, {type='requeued', status='queued', step=0, total=0, results=0, at=tonumber(now)})
    end
    live(live_ttl, job, events, image, mask)
    return {entry, redis.call('HGETALL', job)}
  end
  return false
end
"""

# KEYS: job, stream (the job's priority's), events, image, mask, idempotency, then every stream of the model (its depth)
# ARGV: id, model, request, fingerprint, now, live ttl ms, idempotency ttl ms, max depth, use idempotency, image, mask,
#       deadline s (the most seconds it may wait to start), owner (the submitting API key's id; '' without keys),
#       priority, work (sample-steps: steps x n, for the queue position's ETA), the priority's rank (1 = high)
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ARGV[1]} end
if ARGV[9] == '1' then
  local prior = redis.call('GET', KEYS[6])
  if prior then return {'duplicate', prior} end
end
local depth = 0
for i = 7, #KEYS do depth = depth + redis.call('XLEN', KEYS[i]) end
if depth >= tonumber(ARGV[8]) then return {'full', tostring(depth)} end
local ahead = 0  -- waiting (unclaimed) jobs of its priority and above: XLEN minus the group's pending entries
for i = 7, 6 + tonumber(ARGV[16]) do
  local n, pending = redis.call('XLEN', KEYS[i]), redis.pcall('XPENDING', KEYS[i], '@GROUP@')
  ahead = ahead + n - ((type(pending) == 'table' and tonumber(pending[1])) or 0)
end
local ttl = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'model', ARGV[2], 'status', 'queued', 'request', ARGV[3], 'fp', ARGV[4],
           'created', ARGV[5], 'step', 0, 'total', 0, 'attempts', 0, 'results', 0, 'cancel', 0)
redis.call('HSET', KEYS[1], 'deadline_s', ARGV[12], 'owner', ARGV[13], 'priority', ARGV[14], 'ahead', ahead)
if ARGV[10] ~= '' then redis.call('SET', KEYS[4], ARGV[10], 'PX', ttl) end
if ARGV[11] ~= '' then redis.call('SET', KEYS[5], ARGV[11], 'PX', ttl) end
redis.call('HSET', KEYS[1], 'entry', redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'work', ARGV[15]))
redis.call('PEXPIRE', KEYS[1], ttl)
event(KEYS[3], ttl, {type='queued', status='queued', step=0, total=0, results=0, at=tonumber(ARGV[5])})
if ARGV[9] == '1' then redis.call('SET', KEYS[6], ARGV[1] .. ' ' .. ARGV[4], 'PX', ARGV[7]) end
return {'new', ARGV[1]}
"""

# After XAUTOCLAIM (reclaim): count the delivery, or settle jobs that must not run.
# KEYS: stream, dead, then 4 per entry.  ARGV: consumer, now, live ttl, final ttl, deadline s, max attempts,
# reclaim (0/1), model, then per entry: entry id, job id.  Returns {entry, HGETALL} per job to run.
_TAKE = """
local out = {}
for i = 1, (#ARGV - 8) / 2 do
  local b = 4 * i - 1
  local taken = take(KEYS[1], KEYS[2], ARGV, ARGV[7 + 2 * i], ARGV[8 + 2 * i], KEYS[b], KEYS[b + 1], KEYS[b + 2],
                     KEYS[b + 3])
  if taken then out[#out + 1] = taken end
end
return out
"""

# New entries for a consumer (claim): XREADGROUP and `take` in one step, remembered under the claim's token, so that a
# retry after a lost reply (the same token) answers the jobs the first try took instead of leaving them pending until
# the visibility timeout. KEYS: stream, dead, the token's record.  ARGV: as `take` (reclaim 0), then count, the
# record's ttl ms, and the four per-job key names of the job id JOB_SLOT (Keys.per_job), whose names are made here
# from each entry's job id (the entries are read here; standalone Redis).  Returns {entry, HGETALL} per job to run.
_CLAIM = """
local stream, dead, record, consumer = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local function job_keys(id)
  local out = {}
  for k = 11, 14 do
    local a, b = string.find(ARGV[k], '@JOB@', 1, true)
    out[#out + 1] = string.sub(ARGV[k], 1, a - 1) .. id .. string.sub(ARGV[k], b + 1)
  end
  return out
end
local out = {}
local prior = redis.call('LRANGE', record, 0, -1)
if #prior > 0 then  -- a retry: the jobs the first try took, still waiting for this consumer
  for i = 1, #prior, 2 do
    local job = job_keys(prior[i + 1])[1]
    local v = redis.call('HMGET', job, 'status', 'worker')
    if v[1] == 'queued' and v[2] == consumer then out[#out + 1] = {prior[i], redis.call('HGETALL', job)} end
  end
  return out
end
local reply = redis.call('XREADGROUP', 'GROUP', '@GROUP@', consumer, 'COUNT', ARGV[9], 'STREAMS', stream, '>')
for _, entry in ipairs((reply and reply[1] and reply[1][2]) or {}) do
  local fields, id = entry[2], nil
  for j = 1, #fields, 2 do if fields[j] == 'job' then id = fields[j + 1] end end
  if id then
    local k = job_keys(id)
    local taken = take(stream, dead, ARGV, entry[1], id, k[1], k[2], k[3], k[4])
    if taken then
      out[#out + 1] = taken
      redis.call('RPUSH', record, entry[1], id)
    end
  else
    ack(stream, entry[1])
  end
end
if #out > 0 then redis.call('PEXPIRE', record, ARGV[10]) end
return out
"""

# KEYS: stream, then 4 per claim.  ARGV: consumer, now, live ttl, then per claim: entry, attempt, total steps.
_START = """
local stream, consumer, now, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, (#ARGV - 3) / 3 do
  local entry, attempt, total, b = ARGV[1 + 3 * i], ARGV[2 + 3 * i], ARGV[3 + 3 * i], 4 * i - 2
  local job, events, image, mask = KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3]
  local status = owned(job, consumer, attempt)
  if status == 'queued' then
    redis.call('HSET', job, 'status', 'running', 'started', now, 'step', 0, 'total', total)
    event(events, ttl, {type='started', status='running', step=0, total=tonumber(total), results=0, at=tonumber(now)})
    redis.call('XCLAIM', stream, '@GROUP@', consumer, 0, entry, 'JUSTID')
    live(ttl, job, events, image, mask)
    out[i] = 'ok'
  elseif status == 'running' then
    out[i] = 'ok'
  elseif status == 'cancelled' then
    ack(stream, entry)
    out[i] = 'cancelled'
  else
    out[i] = 'lost'
  end
end
return out
"""

# Progress of running jobs, or a keep-alive of claimed ones (step ''): resets the entries' idle time.
# KEYS: stream, then 4 per claim.  ARGV: consumer, now, live ttl, step, total, then per claim: entry, attempt,
# preview (a base64 PNG carried by the progress event, or '').
_PROGRESS = """
local stream, consumer, now, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, (#ARGV - 5) / 3 do
  local entry, attempt, preview, b = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i], 4 * i - 2
  local job, events, image, mask = KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3]
  local status = owned(job, consumer, attempt)
  if status == 'cancelled' then
    out[i] = 'cancel'
  elseif status ~= 'running' and status ~= 'queued' then
    out[i] = 'lost'
  else
    if ARGV[4] ~= '' and status == 'running' then
      redis.call('HSET', job, 'step', ARGV[4], 'total', ARGV[5])
      local body = {type='progress', status='running', step=tonumber(ARGV[4]), total=tonumber(ARGV[5]),
                    results=0, at=tonumber(now)}
      if preview ~= '' then body['preview'] = preview end
      event(events, ttl, body)
    end
    redis.call('XCLAIM', stream, '@GROUP@', consumer, 0, entry, 'JUSTID')
    live(ttl, job, events, image, mask)
    out[i] = redis.call('HGET', job, 'cancel') == '1' and 'cancel' or 'ok'
  end
end
return out
"""

# Terminal state by the owning worker: results stored first, XACK last, all in one script. The results' bytes are
# added to the owner's stored bytes (service/quotas.py), which expire with them: a zset of '<entry id> <bytes>'
# scored by their expiry (Redis clock, ms) and a running total (a settle retried after a lost reply counts nothing
# twice).
# KEYS: stream, 4 per job, owner's stored zset, owner's stored total, result keys...
# ARGV: consumer, attempt, entry, now, final ttl, status, error, count the bytes (1/0), PNGs...
_SETTLE = """
local status = owned(KEYS[2], ARGV[1], ARGV[2])
if status == ARGV[6] then return 'ok' end
if status ~= 'queued' and status ~= 'running' then return 'lost' end
local ttl = tonumber(ARGV[5])
local bytes = 0
for i = 8, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ttl)
  bytes = bytes + #ARGV[i + 1]
end
if ARGV[8] == '1' and bytes > 0 then
  local t = redis.call('TIME')
  local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
  redis.call('ZADD', KEYS[6], expiry, ARGV[3] .. ' ' .. bytes)
  redis.call('INCRBY', KEYS[7], bytes)
  redis.call('PEXPIRE', KEYS[6], ttl)
  redis.call('PEXPIRE', KEYS[7], ttl)
end
if ARGV[6] == 'succeeded' then redis.call('HSET', KEYS[2], 'step', redis.call('HGET', KEYS[2], 'total')) end
settle(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[6], ARGV[7] ~= '' and ARGV[7], ARGV[4], ttl, #KEYS - 7)
ack(KEYS[1], ARGV[3])
return 'ok'
"""

# KEYS: stream, 4 per job.  ARGV: now, final ttl, live ttl.  Returns the status after, or nil if no such job.
_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return false end
if status == 'queued' then
  settle(KEYS[2], KEYS[3], KEYS[4], KEYS[5], 'cancelled', false, ARGV[1], tonumber(ARGV[2]), 0)
  ack(KEYS[1], redis.call('HGET', KEYS[2], 'entry'))
  return 'cancelled'
end
if status == 'running' and redis.call('HGET', KEYS[2], 'cancel') ~= '1' then
  redis.call('HSET', KEYS[2], 'cancel', 1)
  local v = redis.call('HMGET', KEYS[2], 'step', 'total')
  event(KEYS[3], tonumber(ARGV[3]), {type='cancel_requested', status='running', step=tonumber(v[1]),
                                     total=tonumber(v[2]), results=0, at=tonumber(ARGV[1])})
end
return status
"""

# A job never delivered to a worker whose deadline has passed fails now, as a claim would fail it: so a job that no
# worker takes (none running for its model) ends at its deadline for whoever reads it, instead of staying queued.
# KEYS: stream, 4 per job.  ARGV: now, final ttl, default deadline s.  Returns the status after (nil: no such job).
_EXPIRE = """
local v = redis.call('HMGET', KEYS[2], 'status', 'attempts')
if not v[1] then return false end
local late = v[1] == 'queued' and tonumber(v[2] or '0') == 0 and past_deadline(KEYS[2], ARGV[1], ARGV[3])
if late then
  settle(KEYS[2], KEYS[3], KEYS[4], KEYS[5], 'failed', late, ARGV[1], tonumber(ARGV[2]), 0)
  ack(KEYS[1], redis.call('HGET', KEYS[2], 'entry'))
  return 'failed'
end
return v[1]
"""

# Where each of a model's streams stands, for a claim in priority order with aging. KEYS: the streams.
# Returns per stream {the group's last delivered id, the oldest entry no worker has been given ('' if none)}, then
# the server's TIME.
_HEADS = """
local out = {}
for i, stream in ipairs(KEYS) do
  out[i] = {'0-0', ''}
  if redis.call('EXISTS', stream) == 1 then
    local last = delivered(stream)
    local e = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
    out[i] = {last, e[1] and e[1][1] or ''}
  end
end
out[#out + 1] = redis.call('TIME')
return out
"""

# A queued job's place: the jobs workers will take before it, counted in priority order without aging (aging can
# only move a job forward once it has waited), and their work. KEYS: job, then the model's streams, highest first.
# Returns nil (not queued), or {jobs ahead, their sample-steps}; a job claimed and waiting in a worker is next: 0.
_POSITION = """
local v = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'priority', 'entry')
if v[1] ~= 'queued' then return false end
if tonumber(v[2] or '0') > 0 then return {0, 0} end
local mine = ({high = 2, normal = 3, low = 4})[v[3] or 'normal'] or 3
local ahead, work = 0, 0
for i = 2, mine do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local last = i == mine and ('(' .. v[4]) or '+'
    for _, e in ipairs(redis.call('XRANGE', KEYS[i], '(' .. delivered(KEYS[i]), last)) do
      ahead = ahead + 1
      local f = e[2]
      for j = 1, #f, 2 do if f[j] == 'work' then work = work + tonumber(f[j + 1]) end end
    end
  end
end
return {ahead, work}
"""

# KEYS: idempotency.  ARGV: the value it must still hold.  Drops a key whose job record has expired.
_FORGET = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _lua(body: str) -> str:
    """The prelude and `body`, with the constants filled in."""
    source = _PRELUDE + body
    tokens = {"@GROUP@": GROUP, "@EVENTS_MAXLEN@": str(EVENTS_MAXLEN), "@DEAD_MAXLEN@": str(DEAD_MAXLEN)}
    for token, value in tokens.items():
        source = source.replace(token, value)
    return source


SCRIPTS: dict[str, str] = {name: _lua(body) for name, body in {
    "submit": _SUBMIT, "take": _TAKE, "claim": _CLAIM, "start": _START, "progress": _PROGRESS, "settle": _SETTLE,
    "cancel": _CANCEL, "expire": _EXPIRE, "forget": _FORGET, "heads": _HEADS, "position": _POSITION}.items()}
