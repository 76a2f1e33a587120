-- wrk script of scripts/build-pgo.sh's training load: of every 10 requests,
-- 8 GETs, a POST with a Content-Length body and a POST with a chunked body
-- (the backends read both whole). Prints one line of counts when done.
local turn = {}

-- The requests are made once the address (and so the Host header) is known.
init = function(args)
  local body = "name=rollcall&value=" .. string.rep("x", 200)
  for i = 1, 8 do turn[i] = wrk.format("GET", "/") end
  turn[9] = wrk.format("POST", "/form", { ["Content-Length"] = #body }, body)
  turn[10] = "POST /upload HTTP/1.1\r\nHost: " .. wrk.headers["Host"] ..
    "\r\nTransfer-Encoding: chunked\r\n\r\n" ..
    string.format("%x\r\n%s\r\n0\r\n\r\n", #body, body)
end
local n = 0

request = function()
  n = n % #turn + 1
  return turn[n]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("TRAINED requests=%d errors=%d non2xx=%d\n", summary.requests,
    e.connect + e.read + e.write + e.timeout, e.status))
end
