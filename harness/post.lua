-- wrk script: POST the body in $WRK_BODY with content type $WRK_CONTENT_TYPE, count responses
-- by status, and print the run's figures as one JSON line (marked WRK_JSON) for
-- harness/wrk.py to parse.
--
-- Connections behave like well-behaved clients: after a refusal that carries Retry-After
-- (503 shed, 429 rate limit) a request waits that long before it is sent. Without this, a
-- closed-loop generator answered at once with 503 turns into a flood of retries that measures
-- how fast nginx can refuse, not how the service behaves.
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  waits = {}  -- Retry-After waits owed, in ms, first in first out
end

-- wrk asks delay() before each request it sends, on whichever connection is next; one Lua
-- state serves all of a thread's connections and cannot tell them apart. So the waits owed
-- are queued and paid one per request: as many waits as refusals, each as long as asked,
-- though not always by the connection that was refused.
function delay()
  if #waits == 0 then
    return 0
  end
  return table.remove(waits, 1)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local retry_after = tonumber(headers["Retry-After"] or headers["retry-after"] or "")
  if retry_after and (status == 503 or status == 429) then
    waits[#waits + 1] = retry_after * 1000
  end
end

function done(summary, latency, requests)
  local p = {}
  for _, q in ipairs({50, 75, 90, 95, 99, 99.9}) do
    p[#p + 1] = string.format('"p%s": %d', tostring(q), latency:percentile(q))
  end
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local s = {}
  for status, n in pairs(counts) do
    s[#s + 1] = string.format('"%d": %d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"statuses": {%s}, "latency_us": {%s, "mean": %.1f, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(s, ", "), table.concat(p, ", "), latency.mean, latency.max))
end
