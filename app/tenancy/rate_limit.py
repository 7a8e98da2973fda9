"""Requests per minute per key: a GCRA token bucket in Redis (one Lua call per request, atomic, so
every API process shares the budget). A key may burst its whole minute's allowance, then gets one
request every 60/limit seconds; a refused request learns exactly when the next one will be allowed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from redis import Redis

# KEYS[1]: the key's bucket. ARGV: now (s), interval (s per request), burst (requests).
# The value is the theoretical arrival time (TAT) of the next request; a request is allowed when
# TAT - burst * interval <= now, and then moves TAT on by one interval.
_GCRA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat + interval - burst * interval
if allow_at > now then
  return {0, tostring(allow_at - now)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, '0'}
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_seconds: int = 0    # whole seconds, rounded up (the Retry-After header)


class RateLimiter:
    def __init__(self, redis: Redis, key_prefix: str):
        self.redis = redis
        self.key_prefix = key_prefix
        self._script = redis.register_script(_GCRA)

    def hit(self, owner: str, per_minute: int, now: float | None = None) -> RateDecision:
        interval = 60.0 / per_minute
        allowed, wait = self._script(keys=[f"{self.key_prefix}:ratelimit:{owner}"],
                                     args=[repr(time.time() if now is None else now), repr(interval), per_minute])
        if int(allowed):
            return RateDecision(True)
        return RateDecision(False, max(1, math.ceil(float(wait))))
