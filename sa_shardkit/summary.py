"""Per-shard reports that stay readable at 64+ shards: counts by state, then the shards needing attention.

With more than :data:`MANY_SHARDS` shards, ``shardkit status`` and the migration summary print one
line of counts per state and list only the shards that need attention (down, behind, failed, not
attempted); ``--verbose`` (or ``SHARDKIT_VERBOSE=1``, which also reaches ``alembic`` processes)
lists every shard again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

MANY_SHARDS = 16
"""Above this many shards a report summarises."""


def verbose_requested(verbose: bool | None = None) -> bool:
    """``verbose`` when given, else the ``SHARDKIT_VERBOSE`` environment variable."""
    if verbose is not None:
        return verbose
    return os.environ.get("SHARDKIT_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def summarise(shards: int, verbose: bool | None = None) -> bool:
    """Whether a report over ``shards`` shards lists only those needing attention."""
    return shards > MANY_SHARDS and not verbose_requested(verbose)


def tally(states: Iterable[str]) -> str:
    """``"60 up to date, 3 migrated, 1 FAILED"``: counts per state, in order of first appearance."""
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def hidden(count: int, what: str = "shard(s) needing no attention") -> str:
    """The line saying what a summarised report left out, and how to see it."""
    return f"{count} {what} not listed (--verbose or SHARDKIT_VERBOSE=1 lists every shard)"
