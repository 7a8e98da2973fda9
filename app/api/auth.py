"""Who is calling. Until API keys arrive (security issue) every caller is the anonymous owner;
every job lookup already goes through `app.jobs.get_job(session, id, owner=current_owner())`."""
from __future__ import annotations


def current_owner() -> str | None:
    return None
