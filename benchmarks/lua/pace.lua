-- Appended for paced runs (run.py defines pace_mean_ms above it). wrk puts a
-- timer before every request only when delay() exists. Exponential think time
-- per connection makes arrivals roughly Poisson at the offered rate, so latency
-- is measured at a fixed load, not at saturation where it is only queueing.
function delay()
  return -math.log(1 - math.random()) * pace_mean_ms
end
