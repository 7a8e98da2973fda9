"""Ids: 26 lowercase Crockford base-32 characters, sortable by creation time (ULIDs), optionally
behind a prefix (`key_`, `file-`, `batch_`).
"""
from __future__ import annotations

import os
import re
import threading
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_id_lock = threading.Lock()
_last_id = [0, 0]   # [milliseconds, random part] of the last id made by this process


def new_id(prefix: str = "") -> str:
    """`prefix` + 26 URL-safe characters: 48 bits of milliseconds then 80 random bits (a lowercase ULID).

    Ids sort by creation time, so "newest first" and the list cursor are both plain id order.
    Within one millisecond a process counts up from its last id (ULID's monotonic mode), so its
    own jobs keep their submission order.
    """
    millis, rand = int(time.time() * 1000), int.from_bytes(os.urandom(10), "big")
    with _id_lock:
        if millis <= _last_id[0] and _last_id[1] < (1 << 80) - 1:
            millis, rand = _last_id[0], _last_id[1] + 1
        _last_id[:] = [millis, rand]
    value = (millis << 80) | rand
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return prefix + "".join(reversed(chars))


_ULID = re.compile(r"[0-9a-z]{26}")


def well_formed_id(value: object, prefix: str) -> bool:
    """Whether `value` can be an id made by `new_id(prefix)`; anything else is looked up nowhere
    (a NUL character, say, is an error in PostgreSQL rather than a miss)."""
    return isinstance(value, str) and value.startswith(prefix) and bool(_ULID.fullmatch(value[len(prefix):]))
