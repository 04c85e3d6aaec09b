-- GET statusTask of a random task from a file of ids (one per line), so the
-- gateway's in-memory views do not answer every poll.
--   wrk ... -s status.lua URL -- <ids file>
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  ids = {}
  for line in io.lines(args[1]) do
    if #line > 0 then table.insert(ids, line) end
  end
  math.randomseed(os.time() * 1000 + (tid or 0))
end

function request()
  local id = ids[math.random(#ids)]
  return wrk.format("GET", "/api/v1/statusTask/grok-image?taskId=" .. id)
end
