"""The fair order of the queue between the API and the workers (`GENQ_SCHEDULING=fair`).

The fair order lives in the database, the record, and the claim applies it: a worker's Celery task
is only a wake-up that says "one more job is waiting". Whatever its job id, the woken worker claims
the job the fair order puts first (`claim_next`), in one transaction:

1. the most urgent level among claimable jobs: lane (service tier: `default` before `flex`), then
   priority (0 first);
2. among the owners (API keys) with jobs at that level, the one with the smallest virtual token
   counter (the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models",
   OSDI 2024), then the one whose oldest job is oldest;
3. that owner's oldest job at that level (arrival order within a key).

A key's job younger than AFFINITY_SECONDS whose key runs only on other workers is left to them
(`held_elsewhere`): passed over by a newcomer-reserve claim, and by a task's claim while another key
has a job waiting (where workers keep a newcomer reserve, which will take it), so a light key's jobs
gather on one worker (one engine shares its steps with it, and its prompts find that engine's prefix
cache).

Counters are kept in `fair_shares`, one row per tenant. A claim charges the job's estimated cost
(`W_IN` per prompt token, roughly 4 characters, plus `W_OUT` per requested output token, divided
by the key's weight); when the job ends (`settle`) the charge is replaced by the tokens actually
served (prompt tokens computed, cached ones not, and output tokens). A tenant that was idle when its
oldest waiting job arrived (no claim of it since) is lifted to the queue's virtual time (the row
`*`: the smallest effective counter at the latest claim, which follows the backlogged keys' counters
down as well as up), so idling banks no credit and a new key starts level with the busy ones. Every job is charged once (`jobs.fair_charge` is written with the
charge, in the claim's transaction), so a job re-run after its worker was lost costs its owner
nothing more: no drift.

Why the claim and not Redis: each job has one task, so tasks and claimable jobs stay in step
(a task whose own job was taken by an earlier wake-up claims another one; a spare task finds
nothing and ends). Several workers claim concurrently: on PostgreSQL the chosen job row is locked
`FOR UPDATE SKIP LOCKED`, so a concurrent claim takes the next job instead of waiting; the counter
updates are relative (`counter + charge`), so concurrent charges add up. A worker that dies
mid-job keeps its charge; the reconciler re-sends the job once the lease expires and the re-run is
not charged again. A Redis restart loses tasks, not order: the reconciler re-sends a task for every
job queued longer than `GENQ_REQUEUE_AFTER_SECONDS`, and the counters were never in Redis.

`GENQ_SCHEDULING=fifo` bypasses all of this: a task claims its own job (`store.claim_job`), the
Celery queue's (priority, arrival) order, as before fair sharing.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, case, func, insert, literal, or_, select, text, true, update
from sqlalchemy.orm import Session

from app.infra.db import utcnow
from app.jobs import store
from app.jobs.models import CLAIMABLE, FairShare, Job, JobStatus
from app.tenancy.keys import DEFAULT_WEIGHT, ApiKey

log = logging.getLogger(__name__)

W_IN = 1.0              # a prompt token's cost (worker/engine/fairness.py charges the engine's the same)
W_OUT = 2.0             # an output token's cost
CHARS_PER_TOKEN = 4     # the claim's prompt estimate (the job's text; its tokens are counted by the worker)
FLOOR = "*"             # the fair_shares row holding the queue's virtual time
CLAIM_TRIES = 8         # a claim that loses every race this many times gives up (the task claims nothing)
AFFINITY_SECONDS = 0.5  # how long a key's new job is left to the worker already running its jobs

_jobs = Job.__table__
_shares = FairShare.__table__
_keys = ApiKey.__table__
_claimable = text(CLAIMABLE)


def tenant_of(owner: str | None) -> str:
    return owner or ""


def estimated_cost(job_input: dict) -> float:
    """A job's cost before it runs: its text's length in tokens (about), and every output token it
    asks for (`max_tokens` per sample). An input the worker cannot read (it fails the job) costs 1."""
    try:
        if job_input.get("messages") is not None:
            chars = sum(len(str(m.get("content") or "")) for m in job_input["messages"] if isinstance(m, dict))
        else:
            chars = len(str(job_input.get("prompt") or ""))
        samples = int(job_input.get("n") or 1)
        return W_IN * max(1, chars // CHARS_PER_TOKEN) + W_OUT * int(job_input.get("max_tokens") or 1) * samples
    except (AttributeError, TypeError, ValueError):
        return 1.0


def served_cost(prompt_tokens: int | None, cached_tokens: int | None, completion_tokens: int | None) -> float:
    """What a finished job cost: the prompt tokens computed (not those from the prefix cache) and
    every output token."""
    computed = max((prompt_tokens or 0) - (cached_tokens or 0), 0)
    return W_IN * computed + W_OUT * (completion_tokens or 0)


@dataclass(slots=True)
class Candidate:
    """One owner with claimable jobs at the top level, and where it stands."""
    tenant: str
    owner: str | None
    oldest_id: str
    oldest_created_at: datetime
    counter: float            # as stored (0 for a tenant never charged)
    returning: bool           # idle when its oldest waiting job arrived: lifted to the floor
    weight: float = DEFAULT_WEIGHT   # its key's weight (DEFAULT_WEIGHT without a key, or for an unknown one)

    def effective(self, floor: float) -> float:
        return max(self.counter, floor) if self.returning else self.counter


def candidates(session: Session, exclude: frozenset[str] = frozenset(), *, hint: str | None = None,
               now: datetime | None = None) -> tuple[tuple[int, int] | None, list[Candidate], float, str | None]:
    """The top (lane, priority) among claimable jobs, its owners as candidates, the floor, and
    `hint` where that job is running on a lease that expired before `now` (a lost worker's: its task
    claims it first), else None. `exclude`: tenants not to consider at all (their jobs are as if absent).

    One statement where any job is claimable (the level, each owner's oldest job there, its arrival,
    its key's weight, its counter and the floor), built once per shape (`_candidates_statement`): the
    claim's hottest path."""
    named = sorted(t for t in exclude if t)
    statement = _candidates_statement("" in exclude, bool(named), hint is not None)
    params = {"excluded": named, "hint": hint, "now": now or utcnow()}
    rows = session.execute(statement, params).all()
    if not rows:
        return None, [], 0.0, None if hint is None else session.scalar(_orphan_statement(), params)
    found = []
    for row in rows:
        returning = row.last_claim_at is None or row.last_claim_at < row.created_at
        found.append(Candidate(tenant_of(row.owner), row.owner, row.oldest_id, row.created_at,
                               0.0 if row.counter is None else row.counter, returning,
                               DEFAULT_WEIGHT if row.weight is None else float(row.weight)))
    floor = rows[0].floor
    return ((rows[0].lane, rows[0].priority), found, 0.0 if floor is None else floor,
            None if hint is None else rows[0].orphan)


@functools.cache
def _orphan_statement():
    """The hinted job's id where it is running on a lease that expired (params `hint`, `now`)."""
    return select(_jobs.c.id).where(_jobs.c.id == bindparam("hint"), _jobs.c.status == JobStatus.RUNNING.value,
                                    _jobs.c.lease_expires_at < bindparam("now"))


@functools.cache
def _candidates_statement(exclude_keyless: bool, exclude_named: bool, with_hint: bool):
    """`candidates`' statement for one shape: whether jobs without a key are excluded, whether
    named keys are (param `excluded`, a list), whether the hinted job's orphan check rides along."""
    allowed = [_jobs.c.owner.is_not(None)] if exclude_keyless else []
    if exclude_named:
        allowed.append(or_(_jobs.c.owner.is_(None), _jobs.c.owner.not_in(bindparam("excluded", expanding=True))))
    top = (select(_jobs.c.lane, _jobs.c.priority).where(_claimable, *allowed)
           .order_by(_jobs.c.lane, _jobs.c.priority).limit(1).cte("top_level"))
    # The oldest job per owner at that level (ids are time-ordered), then its arrival time.
    oldest = (select(_jobs.c.owner, func.min(_jobs.c.id).label("oldest_id"))
              .select_from(_jobs.join(top, and_(_jobs.c.lane == top.c.lane, _jobs.c.priority == top.c.priority)))
              .where(_claimable, *allowed).group_by(_jobs.c.owner).cte("oldest"))
    first = _jobs.alias("oldest_job")
    columns = [top.c.lane, top.c.priority, oldest.c.owner, oldest.c.oldest_id, first.c.created_at, _keys.c.weight,
               _shares.c.counter, _shares.c.last_claim_at,
               select(_shares.c.counter).where(_shares.c.tenant == FLOOR).correlate(None).scalar_subquery().label("floor")]
    if with_hint:
        columns.append(_orphan_statement().correlate(None).scalar_subquery().label("orphan"))
    return select(*columns).select_from(
        oldest.join(first, first.c.id == oldest.c.oldest_id).join(top, true())
        .outerjoin(_keys, _keys.c.id == oldest.c.owner)
        .outerjoin(_shares, _shares.c.tenant == func.coalesce(oldest.c.owner, "")))


def keys_at_share(running: list[str], threads: int, weights: dict[str, float] | None = None) -> frozenset[str]:
    """The keys a worker's newcomer reserve leaves out: among the keys of its `running` jobs (one
    entry a job) and one newcomer of weight 1, those holding at least their weighted share of its
    task `threads`: threads x w / (the weights of its keys + 1). The shares add up to fewer than
    the threads, so a key alone is always left out (its flood filled them), as are many keys with a
    job each; a key with a job or two running beside a flood is under its share, so its next job
    starts in the reserve too instead of waiting for one of the flood's to end; a key of weight 2
    beside one of weight 1 holds about twice the seats before it is left out. `weights`: tenant ->
    weight (1 where missing)."""
    held = Counter(running)
    weights = weights or {}
    total = sum(weights.get(tenant, 1.0) for tenant in held) + 1.0
    return frozenset(tenant for tenant, n in held.items() if n >= threads * weights.get(tenant, 1.0) / total)


def claim_next(session: Session, worker_id: str, lease_seconds: float, *, hint: str | None = None,
               exclude: frozenset[str] = frozenset(), now: datetime | None = None, reserve: bool = False,
               affinity: bool = True) -> Job | None:
    """Claim the job the fair order puts first, for `worker_id`; None when no job is claimable.

    `hint` is the id the waking task carries: when that job is running on an expired lease (its
    worker was lost), it is claimed first, as `store.claim_job` would (it was chosen fairly before).
    `exclude`: tenants whose jobs are not to be claimed (a worker's newcomer reserve leaves out the
    keys holding their share of its task threads: `keys_at_share`).
    `reserve`: the claim is a newcomer reserve's, which passes over a key held elsewhere
    (`held_elsewhere`) whatever else waits; a task's claim passes over it only while another key
    has a job waiting, and only with `affinity` (a worker without a newcomer reserve says False:
    no reserve would take the job it passes over).
    """
    now = now or utcnow()
    if session.get_bind().dialect.name == "sqlite":
        # a write first, so that the claim holds SQLite's write lock from its first statement (a
        # read first would have to upgrade, and could find the database locked); PostgreSQL locks rows
        _ensure_rows(session, [FLOOR])
    for attempt in range(CLAIM_TRIES):
        level, found, floor, orphan = candidates(session, exclude, hint=hint if attempt == 0 else None, now=now)
        if orphan is not None:
            return store.claim_job(session, orphan, worker_id, lease_seconds, now=now)
        if not found:
            return None
        order = lambda c: (c.effective(floor), c.oldest_id)   # noqa: E731
        best = min(found, key=order)
        passed_over = False
        if (reserve or affinity) and _young(best, now):
            # a key's jobs go to the worker already running them (its prefix cache, and one engine's
            # steps shared with that key instead of every worker's); the newcomer reserve leaves
            # them to it, a task's claim takes them where nothing else waits (never idle). Only
            # young keys can be held, so where the first in order is not young nothing changes.
            held = held_elsewhere(session, worker_id, found, now)
            kept = [c for c in found if c.tenant not in held]
            if best.tenant in held and (kept or reserve):
                if not kept:
                    return None
                best, passed_over = min(kept, key=order), True
        job = store.claim_first(session, level[0], level[1], best.owner, worker_id, lease_seconds, now=now)
        if job is None:
            continue      # all taken by concurrent claims since: look again
        # (a claim that left keys out, or passed one over, did not choose the smallest counter of all)
        _charge(session, job, best, floor, now, advance_floor=not exclude and not passed_over)
        return job
    log.warning("fair claim: lost %d races in a row; this wake-up claims nothing", CLAIM_TRIES)
    return None


def _young(candidate: Candidate, now: datetime) -> bool:
    return 0 <= (now - candidate.oldest_created_at).total_seconds() < AFFINITY_SECONDS


def held_elsewhere(session: Session, worker_id: str, found: list[Candidate], now: datetime) -> set[str]:
    """The candidates' tenants whose oldest waiting job is younger than AFFINITY_SECONDS and whose
    running jobs (on a live lease) are all on other workers than `worker_id` (theirs to claim first).
    An age below 0 (the API host's clock ahead of this one) is not young: no affinity, never a wait."""
    young = [c for c in found if _young(c, now)]
    if not young:
        return set()
    owners = [c.owner for c in young if c.owner is not None]
    which = [_jobs.c.owner.in_(owners)] if owners else []
    if len(owners) < len(young):
        which.append(_jobs.c.owner.is_(None))
    running = session.execute(select(_jobs.c.owner, _jobs.c.worker_id).where(
        _jobs.c.status == JobStatus.RUNNING.value, _jobs.c.lease_expires_at >= now, or_(*which)).distinct()).all()
    here = {tenant_of(owner) for owner, worker in running if worker == worker_id}
    return {tenant_of(owner) for owner, worker in running if worker != worker_id} - here


def _charge(session: Session, job: Job, chosen: Candidate, floor: float, now: datetime,
            advance_floor: bool = True) -> None:
    """The claim's bookkeeping: lift the tenant if it is back from idle, charge the job's estimate
    once, advance the queue's virtual time (not from a claim that left some keys out: its choice
    is not the smallest counter of all)."""
    effective = chosen.effective(floor)
    cost = 0.0
    if job.fair_charge is None:
        cost = estimated_cost(job.input)
        # Conditional: of two claims of one job (possible only across a lost lease), one charges.
        charged = session.execute(update(_jobs).where(_jobs.c.id == job.id, _jobs.c.fair_charge.is_(None))
                                  .values(fair_charge=cost))
        if charged.rowcount != 1:
            cost = 0.0
        job.fair_charge = cost
    _update_share(session, chosen.tenant, counter=_at_least(_shares.c.counter, effective) + cost / chosen.weight,
                  last_claim_at=now)
    # The virtual time is the smallest effective counter at this claim, not a running maximum: a
    # settlement that lowers the backlogged keys' counters (a job served fewer tokens than its
    # estimate) lowers it too, so a key back from idle is never lifted above them.
    if advance_floor:
        _update_share(session, FLOOR, counter=effective, last_claim_at=now)


def settle(session: Session, job_id: str, prompt_tokens: int | None, cached_tokens: int | None,
           completion_tokens: int | None) -> None:
    """A job ended (in the transaction that wrote its result): replace its estimated charge by what
    it was served, and count the tokens. Nothing for a job the fair claim never charged."""
    row = session.execute(select(_jobs.c.owner, _jobs.c.fair_charge, _keys.c.weight)
                          .outerjoin(_keys, _keys.c.id == _jobs.c.owner).where(_jobs.c.id == job_id)).first()
    if row is None or row.fair_charge is None:
        return
    served = served_cost(prompt_tokens, cached_tokens, completion_tokens)
    weight = DEFAULT_WEIGHT if row.weight is None else float(row.weight)
    _update_share(session, tenant_of(row.owner), counter=_shares.c.counter + (served - row.fair_charge) / weight,
                  served_tokens=_shares.c.served_tokens + (prompt_tokens or 0) + (completion_tokens or 0))
    session.execute(update(_jobs).where(_jobs.c.id == job_id).values(fair_charge=served))


def shares(session: Session, tenant: str | None = None) -> dict[str, dict]:
    """Every tenant's counter and tokens served ("" is jobs without a key), or `tenant`'s alone."""
    which = _shares.c.tenant != FLOOR if tenant is None else _shares.c.tenant == tenant
    rows = session.execute(select(_shares.c.tenant, _shares.c.counter, _shares.c.served_tokens,
                                  _shares.c.last_claim_at).where(which))
    return {r.tenant: {"counter": r.counter, "served_tokens": r.served_tokens, "last_claim_at": r.last_claim_at}
            for r in rows}


def _at_least(column, value: float):
    """max(column, value) in SQL on every dialect."""
    return case((column < literal(value), literal(value)), else_=column)


def _update_share(session: Session, tenant: str, **values) -> None:
    """UPDATE `tenant`'s counter row (relative values add up under concurrent claims); where the
    row does not exist yet, create it (0) and update it then. One statement in the usual case."""
    def update_row() -> int:
        return session.execute(update(_shares).where(_shares.c.tenant == tenant).values(**values)).rowcount

    if update_row() == 0:
        _ensure_rows(session, [tenant])
        update_row()


def _ensure_rows(session: Session, tenants: list[str]) -> None:
    """Create the missing counter rows (0) in one statement that a concurrent creation cannot fail.
    It is a write: on SQLite the claim starts with it, so that it holds the write lock from its
    first statement (a read first would have to upgrade, and could find the database locked)."""
    missing = tenants
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:   # pragma: no cover - genq runs on these two
        dialect_insert = None
    rows = [{"tenant": t, "counter": 0.0, "served_tokens": 0} for t in missing]
    if dialect_insert is None:
        session.execute(insert(_shares), rows)
    else:
        session.execute(dialect_insert(_shares).values(rows).on_conflict_do_nothing(index_elements=["tenant"]))
