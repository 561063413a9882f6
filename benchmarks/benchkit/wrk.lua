-- wrk script of the benchmarks: picks the path, prints the results as one JSON line.
-- Arguments after "--": the view ("item", "sleep" or "tx") and the number of items.

local view = "item"
local items = 1000

function init(args)
  view = args[1] or view
  items = tonumber(args[2] or items)
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
end

function request()
  if view == "item" then
    return wrk.format("GET", "/item/" .. math.random(1, items) .. "/")
  end
  return wrk.format("GET", "/" .. view .. "/")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'DGPB-RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
