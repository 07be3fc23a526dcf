"""Library rows that belong to a shard key but are stored outside the models' tables: they move
inside that key's cut-over (:mod:`.mover`), so they are never on another shard than the key's rows.

A saga step's receipt lives on the shard of its step's key, next to the step's effect, and carries
the key as text (``shardkit_saga_receipts.shard_key``). When a batch cuts a key over, the receipts
of that key are copied into the key's target in the same open target transaction as its rows
(stale copies a killed run left there are replaced first) and deleted from the source in the same
source transaction, under the same fence: a step retried after the move finds its receipt where it
now runs, so it never applies twice. Receipts recorded before ``shard_key`` existed (NULL) stay put.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, delete, insert, select, text
from sqlalchemy.engine import Connection

from ..errors import RebalanceError
from ..ring_state import value_text
from ..saga.tables import receipts_table

if TYPE_CHECKING:
    from .mover import SourceMover


@dataclass(frozen=True)
class KeyCompanion:
    """A table whose rows belong to the shard key whose text form is in ``table.c[column]``."""

    table: Table
    column: str


_companions: dict[str, KeyCompanion] = {receipts_table.name: KeyCompanion(receipts_table, "shard_key")}


def register_key_companion(table: Table, column: str) -> KeyCompanion:
    """Have every move carry ``table``'s rows with the shard key whose text form ``column`` holds."""
    spec = KeyCompanion(table, column)
    _companions[table.name] = spec
    return spec


def key_companions() -> tuple[KeyCompanion, ...]:
    return tuple(_companions.values())


def present(conn: Connection, names: Sequence[str]) -> set[str]:
    """Which of ``names`` exist on this shard (one query)."""
    if not names:
        return set()
    found = conn.execute(
        text("SELECT n FROM unnest(CAST(:names AS text[])) AS n WHERE to_regclass(n) IS NOT NULL"),
        {"names": list(names)},
    )
    return set(found.scalars())


def require_on_targets(mover: SourceMover, names: set[str]) -> None:
    """Every table the source has and a move must carry exists on each target, or nothing moves."""
    for target in mover.targets:
        with mover.held.connect(target) as conn:
            missing = sorted(names - present(conn, sorted(names)))
            conn.rollback()
        if missing:
            raise RebalanceError(
                f"shard {target!r} lacks {', '.join(missing)}, which {mover.source!r} holds rows of: "
                "create them there first (alembic upgrade, or create_saga_tables); nothing was moved"
            )


def move_companions(
    mover: SourceMover, conn: Connection, targets: dict[str, Connection], keys: Sequence[Any]
) -> int:
    """Under the batch's fence, before its targets commit: copy the companion rows of ``keys``
    into each key's target (replacing stale copies there) and delete them from the source."""
    moved = 0
    texts = {value_text(k): mover.new.get_shard(k) for k in keys}
    if not texts:
        return 0
    for spec in mover.companions:
        column = spec.table.c[spec.column]
        rows = (
            conn.execute(select(spec.table).where(column.in_(list(texts))).with_for_update()).mappings().all()
        )
        by_target: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_target.setdefault(texts[row[spec.column]], []).append(dict(row))
        for target, target_rows in by_target.items():
            tconn = targets[target]
            stale = sorted({r[spec.column] for r in target_rows})
            tconn.execute(delete(spec.table).where(column.in_(stale)))
            tconn.execute(insert(spec.table), target_rows)
        if rows:
            conn.execute(delete(spec.table).where(column.in_(list(texts))))
        moved += len(rows)
    return moved


def clean_companions(mover: SourceMover, tconn: Connection, orphans: Sequence[Any]) -> None:
    """A killed run's companion copies on a target for keys the source has not cut over."""
    texts = [value_text(k) for k in orphans]
    for spec in mover.companions:
        tconn.execute(delete(spec.table).where(spec.table.c[spec.column].in_(texts)))


__all__ = [
    "KeyCompanion",
    "clean_companions",
    "key_companions",
    "move_companions",
    "present",
    "register_key_companion",
    "require_on_targets",
]
