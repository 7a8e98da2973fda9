"""The fair claim (app/jobs/fair_queue.py) on exact counters, on SQLite and PostgreSQL: the order it
claims in, the weights, the lift of a key back from idle, one charge per job, concurrent claims."""
from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

from sqlalchemy import select, update

from app.infra.db import utcnow
from app.jobs import fair_queue, store
from app.jobs.fair_queue import FLOOR, W_IN, W_OUT, claim_next, estimated_cost, served_cost, settle
from app.jobs.models import FairShare, Job, JobStatus
from app.tenancy.keys import create_key

PROMPT = "x" * 40                     # 10 prompt tokens by the claim's estimate
INPUT = {"prompt": PROMPT, "max_tokens": 5}
COST = W_IN * 10 + W_OUT * 5          # what one such job is charged at its claim


def submit(sessions, owner, n=1, **kwargs) -> list[str]:
    with sessions.begin() as s:
        return [store.create_job(s, model="tiny", input=INPUT, owner=owner, **kwargs).id for _ in range(n)]


def claim(sessions, worker="w1", **kwargs) -> Job | None:
    with sessions.begin() as s:
        return claim_next(s, worker, 30, **kwargs)


def owners_of(sessions, n: int) -> list[str]:
    return [claim(sessions).owner for _ in range(n)]


def counters(sessions) -> dict[str, float]:
    with sessions() as s:
        return dict(s.execute(select(FairShare.tenant, FairShare.counter)).all())


def test_the_estimate_and_the_served_cost():
    assert estimated_cost(INPUT) == COST
    assert estimated_cost({"messages": [{"role": "user", "content": "y" * 80}], "max_tokens": 3, "n": 2}) == 20 + 12
    assert estimated_cost({"prompt": "p", "max_tokens": "many"}) == 1.0    # unreadable: the worker fails it
    assert served_cost(prompt_tokens=30, cached_tokens=16, completion_tokens=4) == 14 * W_IN + 4 * W_OUT


def test_a_later_job_of_another_key_goes_before_the_first_keys_backlog(sessions):
    submit(sessions, "key-a", 10)
    later = submit(sessions, "key-b")[0]
    first = claim(sessions)
    assert first.owner == "key-a"                         # both at 0: the older job
    assert counters(sessions) == {"key-a": COST, FLOOR: 0.0}
    second = claim(sessions)
    assert second.id == later                             # B at 0 < A at COST
    assert counters(sessions) == {"key-a": COST, "key-b": COST, FLOOR: 0.0}
    assert owners_of(sessions, 9) == ["key-a"] * 9        # then A's backlog, in arrival order
    assert counters(sessions)["key-a"] == 10 * COST and counters(sessions)[FLOOR] == 9 * COST
    assert claim(sessions) is None


def test_lane_then_priority_then_fair_share(sessions):
    flex = submit(sessions, "key-a", lane=1)[0]           # oldest, but the flex lane
    low = submit(sessions, "key-a", priority=5)[0]
    urgent = submit(sessions, "key-b", priority=0)[0]
    urgent_a = submit(sessions, "key-a", priority=0)[0]
    assert [claim(sessions).id for _ in range(4)] == [urgent, urgent_a, low, flex]


def test_weights_share_the_claims_two_to_one(sessions):
    with sessions.begin() as s:
        heavy = create_key(s, "heavy", weight=2)[0].id
        light = create_key(s, "light", weight=1)[0].id
    submit(sessions, heavy, 40)
    submit(sessions, light, 40)
    served = Counter(owners_of(sessions, 30))
    assert served == {heavy: 20, light: 10}
    shares = counters(sessions)
    assert shares[heavy] == 20 * COST / 2 and shares[light] == 10 * COST


def test_a_key_back_from_idle_is_lifted_and_banks_no_credit(sessions):
    submit(sessions, "key-a", 20)
    assert owners_of(sessions, 10) == ["key-a"] * 10      # A alone gets everything (work-conserving)
    submit(sessions, "key-b", 10)                          # B was idle all along: counter 0
    # Lifted to the queue's virtual time (A's counter at the last claim), B alternates with A
    # instead of taking its 10 jobs in a row.
    assert owners_of(sessions, 6) == ["key-b", "key-a"] * 3
    assert counters(sessions)["key-b"] >= 9 * COST


def test_a_key_back_from_idle_is_not_lifted_above_keys_whose_jobs_cost_less_than_estimated(sessions):
    submit(sessions, "key-a", 20)
    running = [claim(sessions) for _ in range(6)]          # six in flight, each charged its estimate
    for job in running:                                      # each served far below it: 1 + 1 tokens
        with sessions.begin() as s:
            store.finish_job(s, job.id, "w1", 1, store.JobResult(JobStatus.SUCCEEDED, prompt_tokens=1,
                                                                 completion_tokens=1))
            settle(s, job.id, prompt_tokens=1, cached_tokens=0, completion_tokens=1)
    assert counters(sessions)["key-a"] == 6 * served_cost(1, 0, 1)
    late = submit(sessions, "key-b")[0]
    # The virtual time follows A's counter down: B waits at most one claim of A (a running maximum
    # would lift B to A's counter with six estimates in it, and A would be served 4 more times first).
    assert late in [claim(sessions).id for _ in range(2)]


def test_excluded_keys_are_passed_over(sessions):
    submit(sessions, "key-a", 3)
    anonymous = submit(sessions, None)[0]
    b = submit(sessions, "key-b")[0]
    assert claim(sessions, exclude=frozenset({"key-a", ""})).id == b          # the newcomer reserve's claim
    assert claim(sessions, exclude=frozenset({"key-a", "key-b"})).id == anonymous
    assert claim(sessions, exclude=frozenset({"key-a", "key-b", ""})) is None
    assert claim(sessions).owner == "key-a"


def test_a_keys_new_job_is_left_a_moment_to_the_worker_running_its_jobs(sessions):
    submit(sessions, "key-a", 4)
    submit(sessions, "key-b", 3)
    young = utcnow()                                        # B's jobs are under AFFINITY_SECONDS old at it
    later = young + timedelta(seconds=fair_queue.AFFINITY_SECONDS)
    assert claim(sessions, worker="w1", now=young).owner == "key-a"
    assert claim(sessions, worker="w2", exclude=frozenset({"key-b"}), now=later).owner == "key-a"   # on both
    assert claim(sessions, worker="w1", now=young).owner == "key-b"   # B on w1 only
    with sessions.begin() as s:                             # B served far less than A: first in fair order
        s.execute(update(FairShare).where(FairShare.tenant == "key-a").values(counter=10 * COST))
    floor = counters(sessions)[FLOOR]
    assert claim(sessions, worker="w2", now=young).owner == "key-a"   # w2's task: A's job, B's is w1's for now
    assert counters(sessions)[FLOOR] == floor               # (not A's counter: B, passed over, is below it)
    assert claim(sessions, worker="w3", exclude=frozenset({"key-a"}), now=young, reserve=True) is None   # w3's reserve
    assert claim(sessions, worker="w2", now=young, affinity=False).owner == "key-b"   # w2 keeps no reserve: at once
    # w2 now runs one of B's jobs too: for w3, B is held by w1 and w2; w1's reserve takes it
    assert claim(sessions, worker="w3", exclude=frozenset({"key-a"}), now=young, reserve=True) is None
    assert claim(sessions, worker="w1", exclude=frozenset({"key-a"}), now=young, reserve=True).owner == "key-b"
    submit(sessions, "key-b")
    waited = utcnow() + timedelta(seconds=fair_queue.AFFINITY_SECONDS)
    assert claim(sessions, worker="w3", exclude=frozenset({"key-a"}), now=waited, reserve=True).owner == "key-b"
    submit(sessions, "key-b")
    with sessions.begin() as s:                             # only B waits: w4's task takes it at once (never idle)
        s.execute(update(Job).where(Job.owner == "key-a", Job.status == JobStatus.QUEUED.value)
                  .values(status=JobStatus.CANCELED.value))
    assert claim(sessions, worker="w4", now=utcnow()).owner == "key-b"


def test_a_claim_that_leaves_keys_out_does_not_move_the_virtual_time(sessions):
    submit(sessions, "key-a", 2)
    submit(sessions, "key-b", 2)
    claim(sessions), claim(sessions)                       # one each: both backlogged, counters COST
    with sessions.begin() as s:                            # B has been served far more than A
        s.execute(update(FairShare).where(FairShare.tenant == "key-b").values(counter=10 * COST))
    floor = counters(sessions)[FLOOR]
    assert claim(sessions, exclude=frozenset({"key-a"})).owner == "key-b"
    assert counters(sessions)[FLOOR] == floor             # not B's 10 x COST: A, left out, is far below


def test_settle_replaces_the_estimate_and_a_rerun_is_not_charged_again(sessions):
    job_id = submit(sessions, "key-a")[0]
    job = claim(sessions)
    assert job.id == job_id and job.fair_charge == COST
    with sessions.begin() as s:                            # its worker stops: handed back, claimed again
        assert store.release_job(s, job_id, "w1", 1)
    assert claim(sessions, worker="w2").attempts == 2
    assert counters(sessions)["key-a"] == COST
    with sessions.begin() as s:                            # that worker is lost: its lease runs out
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert claim(sessions, worker="w3") is None            # not queued: only the task of that job takes it
    rerun = claim(sessions, worker="w3", hint=job_id)
    assert rerun.id == job_id and rerun.attempts == 3
    assert counters(sessions)["key-a"] == COST
    with sessions.begin() as s:
        assert store.finish_job(s, job_id, "w3", 3, store.JobResult(JobStatus.SUCCEEDED, prompt_tokens=12,
                                                                    cached_tokens=4, completion_tokens=3))
        settle(s, job_id, prompt_tokens=12, cached_tokens=4, completion_tokens=3)
    served = served_cost(12, 4, 3)
    with sessions() as s:
        share = s.get(FairShare, "key-a")
        assert share.counter == served and share.served_tokens == 15
        assert s.get(Job, job_id).fair_charge == served


def test_a_job_never_charged_settles_to_nothing(sessions):
    job_id = submit(sessions, "key-a")[0]
    with sessions.begin() as s:                            # claimed the fifo way
        store.claim_job(s, job_id, "w1", 30)
        settle(s, job_id, prompt_tokens=10, cached_tokens=0, completion_tokens=5)
    assert counters(sessions) == {}


def test_concurrent_claims_take_each_job_once_and_lose_no_charge(sessions):
    ids = set(submit(sessions, "key-a", 40))
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := claim(sessions, worker=name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == sorted(ids)                  # every job once, none twice
    assert counters(sessions)["key-a"] == 40 * COST       # relative updates: no charge lost to a race
    with sessions() as s:
        assert {w for (w,) in s.execute(select(Job.worker_id))} <= {f"w{i}" for i in range(4)}


def test_the_shares_view(sessions):
    submit(sessions, "key-a")
    claim(sessions)
    with sessions() as s:
        shares = fair_queue.shares(s)
    assert set(shares) == {"key-a"} and shares["key-a"]["counter"] == COST
