"""retry_outage: an outage error is retried with a growing pause until the budget is spent; any
other error is raised at once."""
from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from app.infra.retry import retry_outage
from tests.support.outages import dropped_connection


class Clock:
    def __init__(self):
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def failing(times: int, error):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return fn, calls


def test_an_outage_is_retried_with_a_growing_pause_until_it_passes():
    clock = Clock()
    fn, calls = failing(4, dropped_connection())
    assert retry_outage(fn, what="t", seconds=30, sleep=clock.sleep, clock=clock) == "done"
    assert len(calls) == 5 and len(clock.pauses) == 4
    assert all(0.05 <= p <= 0.1 for p in clock.pauses[:1]) and clock.pauses[3] > clock.pauses[0]
    assert max(clock.pauses) <= 2.0


def test_redis_errors_count_as_an_outage_too():
    clock = Clock()
    fn, calls = failing(1, redis_errors.ConnectionError("refused"))
    assert retry_outage(fn, what="t", seconds=5, sleep=clock.sleep, clock=clock) == "done"


def test_the_last_error_is_raised_once_the_budget_is_spent():
    clock = Clock()
    fn, calls = failing(10**6, dropped_connection())
    with pytest.raises(Exception) as raised:
        retry_outage(fn, what="t", seconds=10, sleep=clock.sleep, clock=clock)
    assert "server closed the connection" in str(raised.value)
    assert clock.now == pytest.approx(10.0) and 5 < len(calls) < 20


def test_other_errors_are_not_retried():
    clock = Clock()
    fn, calls = failing(1, ValueError("a bug"))
    with pytest.raises(ValueError):
        retry_outage(fn, what="t", seconds=10, sleep=clock.sleep, clock=clock)
    assert len(calls) == 1 and clock.pauses == []
