"""Skipping the foreign-key triggers of rows a move copies or deletes whole keys at a time.

A batch copies every row of its keys, parents first, from one consistent snapshot of the source
(where the foreign keys held), and later deletes every row of those keys, children first. When
each foreign key among the moved tables ties a row to a parent *of the same shard key* (the key
column maps to the key column), the parent is always in the same batch: the per-row checks that
PostgreSQL's foreign-key triggers run on the target's inserts and the source's deletes cannot
fail. They cost about two thirds of the target's COPY work (an SPI lookup and a row lock on the
parent per row; measured 60-90 ms vs 20-30 ms for 7,750 rows), and most of the fenced deletes.

So a transaction of the mover sets ``session_replication_role = replica`` (what logical
replication's apply worker runs under), which skips those triggers, but only when, checked in that
same transaction: the role is a superuser (the setting needs one), no rule and no trigger other
than such a same-key foreign key's is on the moved tables (a user trigger, a foreign key to a
reference table or from another table, a deferrable unique constraint: the triggers stay), and, on
a target, the foreign keys are the source's (a source without one might hold an orphan row).
A moved table with partitions or inheritance children (or itself one) is never trusted: their
own triggers and foreign keys are not the table's. Otherwise nothing changes: the triggers fire as
they always did. Rows are moved as the source stores them: a row that breaks a foreign key there
(left by ``DISABLE TRIGGER ALL`` or a restore with triggers off) is moved as it is, as logical
replication would, not refused. (Writers of moving keys wait
for the cut-over's fence, so no child can arrive meanwhile; one that bypasses the fence, through
a raw connection, is no longer refused by the deleted parent's check.)
"""

from __future__ import annotations

from collections.abc import Sequence

_TABLES = (
    "WITH t AS (SELECT CAST(CAST(%(tables)s AS text[]) AS regclass[]) AS ids,"
    " CAST(%(keys)s AS text[]) AS keys)"
)
FOREIGN_KEYS = (
    "(SELECT coalesce(string_agg(conrelid::regclass::text || ' ' || pg_get_constraintdef(oid), '; '"
    " ORDER BY conrelid::regclass::text, pg_get_constraintdef(oid)), '')"
    " FROM pg_constraint, t WHERE contype = 'f' AND conrelid = ANY(t.ids))"
)
"""The foreign keys of the moved tables, as one string (the source's is compared with a target's)."""
_SAME_KEY_ONLY = (
    " current_setting('is_superuser') = 'on'"
    " AND NOT EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = ANY(t.ids) AND rulename <> '_RETURN')"
    # a partition or inheritance child has triggers, rules and foreign keys of its own, not listed here
    " AND NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = ANY(t.ids) OR inhrelid = ANY(t.ids))"
    " AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = ANY(t.ids) AND NOT EXISTS ("
    " SELECT 1 FROM pg_constraint c WHERE g.tgisinternal AND c.oid = g.tgconstraint AND c.contype = 'f'"
    " AND c.conrelid = ANY(t.ids) AND c.confrelid = ANY(t.ids)"
    " AND EXISTS (SELECT 1 FROM unnest(c.conkey, c.confkey) AS m(a, b)"
    " JOIN pg_attribute x ON x.attrelid = c.conrelid AND x.attnum = m.a"
    " JOIN pg_attribute y ON y.attrelid = c.confrelid AND y.attnum = m.b"
    " WHERE x.attname = t.keys[array_position(t.ids, CAST(c.conrelid AS regclass))]"
    " AND y.attname = t.keys[array_position(t.ids, CAST(c.confrelid AS regclass))])))"
)
SOURCE_FOREIGN_KEYS = f"{_TABLES} SELECT {FOREIGN_KEYS}"
"""The source's :data:`FOREIGN_KEYS` (read once per run, with its table shape)."""
TRUST_SOURCE = (
    f"{_TABLES} SELECT set_config('session_replication_role', 'replica', true) FROM t WHERE {_SAME_KEY_ONLY}"
)
"""On the source, before the deletes: one row when the triggers are skipped, none when they fire."""
TRUST_TARGET = f"{TRUST_SOURCE} AND {FOREIGN_KEYS} = %(source_fks)s"
"""On a target, before the COPY: the same, and only if its foreign keys are the source's."""
DISTRUST = (
    "SELECT set_config('session_replication_role', 'origin', true)"
    " WHERE current_setting('session_replication_role') = 'replica'"
)
"""Back to firing triggers for the rest of the transaction (a no-op when they were not skipped)."""


def trust_params(
    tables: Sequence[str], keys: Sequence[str], source_fks: str | None = None
) -> dict[str, object]:
    """The parameters of :data:`TRUST_SOURCE` / :data:`TRUST_TARGET` / :data:`SOURCE_FOREIGN_KEYS`:
    the moved tables (SQL names), each one's key column name, and the source's foreign keys."""
    params: dict[str, object] = {"tables": list(tables), "keys": list(keys)}
    if source_fks is not None:
        params["source_fks"] = source_fks
    return params


__all__ = ["DISTRUST", "FOREIGN_KEYS", "SOURCE_FOREIGN_KEYS", "TRUST_SOURCE", "TRUST_TARGET", "trust_params"]
