"""Figures over the jobs table for people watching the service (the web console's overview):
what waits in each lane and priority, one owner's jobs by status, and recent latency percentiles.
Each is one query; read-only."""
from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.jobs.models import CLAIMABLE, TIER_OF_LANE, Job

PERCENTILES = (50, 90, 99)
LATENCY_WINDOW = 1000    # the most recently submitted finished jobs the percentiles are taken over


def waiting_by_lane(session: Session) -> dict[str, dict[int, int]]:
    """Claimable jobs (queued; a batch line only once released) by lane (service tier) and priority:
    {"default": {0: 3, 9: 1}, "flex": {9: 40}}."""
    rows = session.execute(select(Job.lane, Job.priority, func.count()).where(text(CLAIMABLE))
                           .group_by(Job.lane, Job.priority))
    waiting: dict[str, dict[int, int]] = {tier: {} for tier in TIER_OF_LANE.values()}
    for lane, priority, count in rows:
        waiting.setdefault(TIER_OF_LANE.get(lane or 0, str(lane)), {})[priority] = count
    return waiting


def jobs_by_status(session: Session, owner: str | None) -> dict[str, int]:
    """One owner's jobs by status (the (owner, status, id) index)."""
    owned = Job.owner.is_(None) if owner is None else Job.owner == owner
    rows = session.execute(select(Job.status, func.count()).where(owned).group_by(Job.status))
    return {status: count for status, count in rows}


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles in seconds (None without data) over `jobs` recent finished jobs.
    TTFT: created -> first token (what a client waited, queue included). TPOT: first token ->
    completed, per output token after the first."""
    jobs: int
    ttft: dict[int, float | None]
    tpot: dict[int, float | None]


def recent_latency(session: Session, window: int = LATENCY_WINDOW) -> Latency:
    rows = session.execute(
        select(Job.created_at, Job.first_token_at, Job.completed_at, Job.completion_tokens)
        .where(Job.completed_at.is_not(None), Job.first_token_at.is_not(None))
        .order_by(Job.id.desc()).limit(window)).all()
    ttft = [(first - created).total_seconds() for created, first, _, _ in rows]
    tpot = [(done - first).total_seconds() / (tokens - 1) for _, first, done, tokens in rows
            if tokens is not None and tokens > 1]
    return Latency(len(rows), percentiles(ttft), percentiles(tpot))


def percentiles(values: list[float], points: tuple[int, ...] = PERCENTILES) -> dict[int, float | None]:
    """Nearest-rank percentiles (never negative: clocks of two machines may disagree a little)."""
    ordered = sorted(max(value, 0.0) for value in values)
    if not ordered:
        return {point: None for point in points}
    return {point: ordered[max(math.ceil(point / 100 * len(ordered)) - 1, 0)] for point in points}
