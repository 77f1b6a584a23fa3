-- cycles through /recommend bodies: 20-item histories of ml-100k ids, topk 10
local bodies = {}
for k = 0, 199 do
  local ids = {}
  for j = 1, 20 do ids[#ids + 1] = '"' .. tostring(((k * 7 + j * 13) % 1600) + 1) .. '"' end
  bodies[#bodies + 1] = '{"sequence":[' .. table.concat(ids, ",") .. '],"topk":10}'
end
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json"}, bodies[(i % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50=%.2fms p99=%.2fms non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
