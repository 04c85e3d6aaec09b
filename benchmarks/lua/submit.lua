-- POST generateTask bodies; wrk loads this file into one Lua state per thread.
--   wrk ... -s submit.lua URL -- <mode> <nonce>
--   mode "unique": every request carries a new prompt, so every one is a cache miss
--   mode "same":   every request is the same body, so every one is a cache hit once warm
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  mode = args[1] or "unique"
  nonce = args[2] or "0"
  math.randomseed(os.time() * 1000 + (tid or 0))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  fixed = '{"request_type":"async","input":{"mode":"text-to-image","prompt":"' .. nonce .. '"}}'
end

function request()
  if mode == "same" then
    return wrk.format(nil, nil, nil, fixed)
  end
  counter = counter + 1
  local body = '{"request_type":"async","input":{"mode":"text-to-image","prompt":"bench ' ..
    nonce .. ' t' .. tid .. ' n' .. counter .. '"}}'
  return wrk.format(nil, nil, nil, body)
end
