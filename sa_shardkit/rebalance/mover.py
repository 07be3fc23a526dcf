"""Moving one source shard's keys: copy, verify, cut over and delete, one key batch at a time.

A batch is the next ``batch_size`` shard keys of the source above its watermark (keyset pagination
over every sharded table's key column, in the column's SQL order; never OFFSET). The whole batch is
handled inside ONE source transaction that first locks the source's state row ``FOR NO KEY UPDATE``:
writers of moving keys (who lock it ``FOR SHARE``) wait for the batch, so the copy is exact without
any change capture. Inside it, per target shard, one target transaction replaces the keys' rows
(delete, then ``INSERT ... ON CONFLICT DO UPDATE``, parents first) and compares row counts and
checksums with the source before it commits. Then the source deletes the rows (children first) and
advances the watermark, and commits: that commit is the cut-over.

Crash safety: the target commits before the source. A crash between the two leaves copies on the
target for keys above the source's watermark; routing never sends anyone there (the key has not
moved), and the next run deletes them before it starts (:meth:`SourceMover.clean_targets`). A
session-level advisory lock on the source keeps a second mover of the same source out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    String,
    Text,
    bindparam,
    cast,
    delete,
    func,
    select,
    text,
    union,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from ..errors import RebalanceError
from ..manager import ShardManager
from .catalog import STATE_TABLE, RingState, read_shard_state
from .progress import BatchReport, ProgressTracker
from .tables import ShardedTable, TableSet

MOVER_LOCK = (0x5348_4B54, 0x4D4F_5645)
"""Advisory lock (two int4 keys) a mover holds on its source shard for the whole run."""

# the checksum compares PostgreSQL's text form of each row, so both sides must render alike
_CANONICAL = text(
    "SET LOCAL timezone = 'UTC'; SET LOCAL datestyle = 'ISO, YMD';"
    " SET LOCAL intervalstyle = 'postgres'; SET LOCAL extra_float_digits = 3"
)


@dataclass(frozen=True)
class MoveOptions:
    """Throttling knobs of the mover."""

    batch_size: int = 500
    """Shard keys per batch (all rows of a key move together, in every table)."""
    sleep: float = 0.0
    """Seconds to pause between batches (throttling)."""
    lock_timeout: float = 30.0
    """How long a batch waits for in-flight writers of moving keys before giving up."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise RebalanceError(f"batch size must be >= 1, got {self.batch_size}")
        if self.sleep < 0:
            raise RebalanceError(f"sleep must be >= 0, got {self.sleep}")


def _key_param(spec: ShardedTable, name: str) -> ColumnElement[Any]:
    """A key value passed as text and cast to the key column's type (the watermark is text)."""
    return cast(bindparam(name, type_=String), spec.key.type)


def _keys_param(spec: ShardedTable) -> Any:
    return bindparam("keys", type_=postgresql.ARRAY(spec.key.type))


def checksums(conn: Connection, tables: TableSet, keys: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """``{table: (rows, sum of row hashes)}`` of the rows of ``keys``: order-independent, one query."""
    parts = []
    for spec in tables.sharded:
        row_hash = func.hashtextextended(cast(func.row(*spec.table.c), Text), 0)
        where = spec.key == func.any(_keys_param(spec))
        parts.append(select(func.count()).where(where).scalar_subquery())
        parts.append(select(func.coalesce(func.sum(row_hash), 0)).where(where).scalar_subquery())
    values = conn.execute(select(*parts), {"keys": list(keys)}).one()
    return {spec.name: (int(values[2 * i]), int(values[2 * i + 1])) for i, spec in enumerate(tables.sharded)}


def next_keys(conn: Connection, tables: TableSet, after: str | None, limit: int) -> list[Any]:
    """The ``limit`` smallest shard keys above ``after`` in any sharded table (keyset, SQL order).

    The n smallest keys of a union are among the n smallest of each part, so each part is an index
    scan that stops after ``limit`` distinct keys.
    """
    parts = []
    for spec in tables.sharded:
        part = select(spec.key.label("k")).distinct().order_by(spec.key).limit(bindparam("n"))
        if after is not None:
            part = part.where(spec.key > _key_param(spec, "after"))
        parts.append(part)
    merged = union(*parts).subquery()
    query = select(merged.c.k).order_by(merged.c.k).limit(bindparam("n"))
    params: dict[str, Any] = {"n": limit}
    if after is not None:
        params["after"] = after
    return list(conn.execute(query, params).scalars())


class SourceMover:
    """Drains one source shard's moving keys to their targets under the ring move ``state``."""

    def __init__(
        self,
        manager: ShardManager,
        state: RingState,
        tables: TableSet,
        source: str,
        options: MoveOptions,
        tracker: ProgressTracker,
    ) -> None:
        if state.target is None:
            raise RebalanceError("no ring move is in flight")
        self.manager = manager
        self.state = state
        self.old = state.ring
        self.new = state.target
        self.tables = tables
        self.source = source
        self.options = options
        self.tracker = tracker
        self.targets = sorted(m for m in self.new.shard_ids if m != source)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        """Move every batch until the source is drained; safe to re-run after any crash."""
        with self.manager.connect(self.source) as guard:
            lock = dict(zip("ab", MOVER_LOCK, strict=True))
            got = guard.execute(text("SELECT pg_try_advisory_lock(:a, :b)"), lock).scalar_one()
            guard.commit()
            if not got:
                raise RebalanceError(f"another mover is already draining shard {self.source!r}")
            try:
                self.clean_targets()
                while self.batch():
                    if self.options.sleep:
                        time.sleep(self.options.sleep)
            finally:
                guard.execute(text("SELECT pg_advisory_unlock(:a, :b)"), lock)
                guard.commit()

    def _moves(self, key: Any) -> str | None:
        """The key's target if it is this source's to move, else None."""
        if self.old.get_shard(key) != self.source:
            return None  # a stray row: never overwrite the owner's data with it
        target = self.new.get_shard(key)
        return None if target == self.source else target

    def clean_targets(self) -> int:
        """Delete rows a crashed run copied to a target for keys the source has not cut over.

        Such keys (moving from this source, above its watermark) cannot legitimately be on the
        target: writers keep writing them on the source until the cut-over.
        """
        with self.manager.connect(self.source) as conn, conn.begin():
            row = read_shard_state(conn, self.source)
        if row is None or row.state.version != self.state.version or row.drained:
            return 0
        removed = 0
        for target in self.targets:
            with self.manager.connect(target) as tconn, tconn.begin():
                after = row.watermark
                while True:
                    keys = next_keys(tconn, self.tables, after, 5000)
                    if not keys:
                        break
                    after = str(keys[-1])
                    orphans = [k for k in keys if self._moves(k) == target]
                    if orphans:
                        for spec in reversed(self.tables.sharded):
                            result = tconn.execute(
                                delete(spec.table).where(spec.key == func.any(_keys_param(spec))),
                                {"keys": orphans},
                            )
                            removed += result.rowcount
        return removed

    def batch(self) -> bool:
        """Cut over the next key batch; False when the source is drained."""
        with self.manager.connect(self.source) as conn, conn.begin():
            conn.execute(text(f"SET LOCAL lock_timeout = '{int(self.options.lock_timeout * 1000)}ms'"))
            conn.execute(_CANONICAL)
            fenced_at = time.perf_counter()
            # the fence: writers of moving keys hold this row FOR SHARE; we wait for them and block them
            row = read_shard_state(conn, self.source, lock="FOR NO KEY UPDATE", check_table=False)
            if row is None or row.state.version != self.state.version:
                found = "no state" if row is None else f"version {row.state.version}"
                raise RebalanceError(
                    f"shard {self.source!r} has {found}, expected ring version {self.state.version}: "
                    "the fleet state changed under the mover"
                )
            if row.drained:
                return False
            keys = next_keys(conn, self.tables, row.watermark, self.options.batch_size)
            if not keys:
                conn.execute(text(f"UPDATE {STATE_TABLE} SET drained = true, updated_at = now()"))
                return False
            by_target: dict[str, list[Any]] = {}
            for key in keys:
                target = self._moves(key)
                if target is not None:
                    by_target.setdefault(target, []).append(key)
            rows_by_table: dict[str, int] = {}
            for target, target_keys in by_target.items():
                for table, n in self._copy(conn, target, target_keys).items():
                    rows_by_table[table] = rows_by_table.get(table, 0) + n
            moving = [k for ks in by_target.values() for k in ks]
            if moving:
                for spec in reversed(self.tables.sharded):
                    deleted = conn.execute(
                        delete(spec.table).where(spec.key == func.any(_keys_param(spec))), {"keys": moving}
                    ).rowcount
                    if deleted != rows_by_table.get(spec.name, 0):
                        raise RebalanceError(
                            f"{spec.name} on {self.source!r}: deleted {deleted} rows but copied "
                            f"{rows_by_table.get(spec.name, 0)}; rolled back"
                        )
            conn.execute(
                text(f"UPDATE {STATE_TABLE} SET watermark = :wm, updated_at = now()"), {"wm": str(keys[-1])}
            )
        fence_seconds = time.perf_counter() - fenced_at
        self.tracker.batch(
            BatchReport(
                self.source,
                len(keys),
                len(moving),
                sum(rows_by_table.values()),
                rows_by_table,
                fence_seconds,
            )
        )
        return True

    def _copy(self, source: Connection, target: str, keys: list[Any]) -> dict[str, int]:
        """Replace ``keys``' rows on ``target`` with the source's, verified; commits the target."""
        copied: dict[str, int] = {}
        with self.manager.connect(target) as tconn, tconn.begin():
            tconn.execute(_CANONICAL)
            params = {"keys": keys}
            for spec in reversed(self.tables.sharded):
                tconn.execute(delete(spec.table).where(spec.key == func.any(_keys_param(spec))), params)
            for spec in self.tables.sharded:
                columns = list(spec.table.c)
                result = source.execute(
                    select(*columns).where(spec.key == func.any(_keys_param(spec))), params
                )
                rows = [dict(zip((c.key for c in columns), r, strict=True)) for r in result]
                copied[spec.name] = len(rows)
                if rows:
                    tconn.execute(_upsert(spec), rows)
            expected_all = checksums(source, self.tables, keys)
            got_all = checksums(tconn, self.tables, keys)
            for spec in self.tables.sharded:
                expected, got = expected_all[spec.name], got_all[spec.name]
                if got != expected:
                    raise RebalanceError(
                        f"verification failed copying {spec.name} from {self.source!r} to {target!r}: "
                        f"source has {expected[0]} rows (checksum {expected[1]}), target {got[0]} "
                        f"({got[1]}); nothing was deleted"
                    )
        return copied


def _upsert(spec: ShardedTable) -> Any:
    statement = pg_insert(spec.table)
    primary = [c.name for c in spec.table.primary_key.columns]
    rest = {c.name: statement.excluded[c.name] for c in spec.table.c if not c.primary_key}
    if not rest:
        return statement.on_conflict_do_nothing(index_elements=primary)
    return statement.on_conflict_do_update(index_elements=primary, set_=rest)


__all__ = ["MOVER_LOCK", "MoveOptions", "SourceMover", "checksums", "next_keys"]
