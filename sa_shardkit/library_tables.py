"""The tables sa_shardkit lays out on every shard itself (no model of yours maps them).

The saga log and receipts, two-phase-commit decisions, the stored ring, fleet sequences, lookup
tables and the rebalancer's staging tables (``shardkit_in_<table>``) all carry this prefix, so
Alembic autogenerate, the migration lint and ``shardkit status`` can recognise them by name.
"""

from __future__ import annotations

LIBRARY_TABLE_PREFIX = "shardkit_"


def is_library_table(name: str | None) -> bool:
    """True for a table sa_shardkit owns (``shardkit_*``), whatever metadata the application has."""
    return bool(name) and str(name).split(".")[-1].startswith(LIBRARY_TABLE_PREFIX)
