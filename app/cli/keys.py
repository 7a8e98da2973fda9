"""`genq keys create|list|revoke` (administration: straight to the database, like `genq migrate`),
and the development key `genq up` makes on first start (kept in `<GENQ_HOME>/api_key`, read by
`genq submit` / `genq jobs` when GENQ_API_KEY is not set)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from app.infra.settings import Settings

DEV_KEY_FILE = "api_key"
DEV_KEY_NAME = "development (genq up)"


def add_commands(commands) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key and print it (it is shown only once)")
    create.add_argument("--name", required=True)
    create.add_argument("--rate-limit", type=int, help="requests per minute (default: GENQ_RATE_LIMIT_PER_MINUTE)")
    create.add_argument("--max-active-jobs", type=int, help="queued + running jobs (default: GENQ_MAX_ACTIVE_JOBS)")
    create.add_argument("--max-tokens", type=int, help="largest max_tokens (default: GENQ_MAX_TOKENS_LIMIT)")
    create.add_argument("--weight", type=_weight, default=1.0,
                        help="share under contention: a key of weight 2 gets about twice the tokens of a key of "
                             "weight 1 (> 0, at most 100; default 1)")
    create.add_argument("--json", action="store_true", help='print {"key": ..., "webhook_secret": ...}')
    create.set_defaults(func=cmd_create)
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a key by id (key_...) or displayed prefix")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_revoke)


MAX_WEIGHT = 100.0   # as app.tenancy.keys.MAX_WEIGHT (this module imports SQLAlchemy only when it must)


def _weight(text: str) -> float:
    """argparse type of --weight: a clear usage error for 0, negatives, > MAX_WEIGHT and non-numbers."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= {MAX_WEIGHT:g}, got {text!r}")
    return value


def _store():
    from app.tenancy import keys  # SQLAlchemy only for the commands that use the database

    return keys


def _sessions(settings: Settings | None = None):
    from app.infra.db import session_factory  # SQLAlchemy only for the commands that use the database

    return session_factory((settings or Settings.from_env()).database_url)


def cmd_create(args) -> int:
    try:
        with _sessions().begin() as session:
            key, plaintext = _store().create_key(session, args.name, rate_limit_per_minute=args.rate_limit,
                                        max_active_jobs=args.max_active_jobs, max_tokens=args.max_tokens,
                                        weight=args.weight)
            key_id, secret, weight = key.id, key.webhook_secret, key.weight
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"id": key_id, "name": args.name, "key": plaintext, "webhook_secret": secret,
                          "weight": weight}))
    else:
        print(f"id:             {key_id}\nkey:            {plaintext}\nwebhook secret: {secret}\n"
              f"weight:         {weight:g}\n"
              "Store the key now: it is not shown again (the database keeps only its hash).")
    return 0


def cmd_list(args) -> int:
    with _sessions()() as session:
        rows = [{"id": k.id, "name": k.name, "prefix": k.display_prefix, "created_at": k.created_at.isoformat(),
                 "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                 "rate_limit_per_minute": k.rate_limit_per_minute, "max_active_jobs": k.max_active_jobs,
                 "max_tokens": k.max_tokens, "weight": k.weight}
                for k in _store().list_keys(session, include_revoked=args.all)]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = [("ID", "NAME", "PREFIX", "WEIGHT", "CREATED", "REVOKED")] + [
        (r["id"], r["name"], r["prefix"] + "…", f"{r['weight']:g}", r["created_at"][:19], (r["revoked_at"] or "")[:19])
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_revoke(args) -> int:
    try:
        with _sessions().begin() as session:
            revoked = _store().revoke_key(session, args.key)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not revoked:
        print(f"error: no live key matches {args.key!r}", file=sys.stderr)
        return 1
    print(f"revoked {revoked[0]}")
    return 0


def dev_key_path(settings: Settings) -> Path:
    return Path(settings.home) / DEV_KEY_FILE


def ensure_dev_key(settings: Settings) -> tuple[str, bool]:
    """The development key of this GENQ_HOME: reused while it is valid, else created and saved
    (mode 0600). Returns (key, created)."""
    path = dev_key_path(settings)
    sessions = _sessions(settings)
    if path.exists():
        saved = path.read_text().strip()
        with sessions() as session:
            if _store().authenticate(session, saved) is not None:
                return saved, False
    with sessions.begin() as session:
        _, plaintext = _store().create_key(session, DEV_KEY_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(plaintext + "\n")
    return plaintext, True


def client_api_key(settings: Settings) -> str | None:
    """What `genq submit` / `genq jobs` send: GENQ_API_KEY, else the development key `genq up` saved."""
    if settings.api_key:
        return settings.api_key
    path = dev_key_path(settings)
    return path.read_text().strip() or None if path.exists() else None
