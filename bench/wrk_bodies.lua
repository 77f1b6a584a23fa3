-- wrk script for bench/run.py: POST each request body of a file (one JSON document a line) in turn,
-- count answers that are not 2xx (wrk itself counts only >= 400, and only socket errors otherwise),
-- and print one JSON line of results in done().
--   wrk -t1 -c32 -d10s -s bench/wrk_bodies.lua http://127.0.0.1:3000/recommend -- bodies.jsonl

local requests = {}
local next_index = 0
non2xx = 0 -- global: done() reads it from every thread with thread:get()
local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    local headers = { ["Content-Type"] = "application/json" }
    for line in io.lines(args[1]) do
        if #line > 0 then
            requests[#requests + 1] = wrk.format("POST", nil, headers, line)
        end
    end
    if #requests == 0 then
        error("no request bodies in " .. tostring(args[1]))
    end
end

function request()
    next_index = next_index % #requests + 1
    return requests[next_index]
end

function response(status, headers, body)
    if status < 200 or status > 299 then
        non2xx = non2xx + 1
    end
end

function done(summary, latency, requests)
    local bad = 0
    for _, thread in ipairs(threads) do
        bad = bad + thread:get("non2xx")
    end
    local e = summary.errors
    io.write(string.format(
        '{"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, '
            .. '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
        summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
        latency:percentile(50), latency:percentile(99), latency.max, latency.mean
    ))
end
