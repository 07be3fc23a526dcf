"""Moving one source shard's keys: copy, verify, cut over and delete, one key batch at a time.

A batch is the next ``batch_size`` shard keys of the source above its watermark (keyset pagination
over the key column of the tables that hold every key, in the column's SQL order; never OFFSET). Each batch runs in
two phases:

1. **copy** (no fence; writers keep writing the keys on the source): per target shard, one target
   transaction replaces the keys' rows -- delete, then ``COPY`` into a staging table and
   ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (a set-based batched upsert), parents first;
2. **cut-over** (short): one source transaction locks the source's state row ``FOR NO KEY UPDATE``
   -- writers of moving keys, who lock it ``FOR SHARE``, wait; nobody else does. It re-reads the
   keys of the batch's key range (new keys included), compares per-key row counts and checksums
   with each target, copies again only the keys that changed since phase 1, verifies every key,
   commits the targets, deletes the rows from the source (children first), advances the watermark,
   and commits: that commit is the cut-over.

Crash safety: targets commit before the source. A crash in between leaves copies on a target for
keys above the source's watermark; routing never sends anyone there (the key has not moved), and
the next run deletes them before it starts (:meth:`SourceMover.clean_targets`). A session-level
advisory lock on the source keeps a second mover of the same source out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    String,
    bindparam,
    cast,
    delete,
    func,
    select,
    text,
    union,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from ..errors import RebalanceError
from ..manager import ShardManager
from .catalog import STATE_TABLE, RingState, ShardState, read_shard_state
from .control import MoveControl
from .plan import range_moves
from .progress import BatchReport, ProgressTracker
from .record import COUNT_BATCH
from .tables import ShardedTable, TableSet

STAGE_PREFIX = "shardkit_in_"
"""Staging tables are named ``shardkit_in_<table>``."""

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


def next_keys(conn: Connection, tables: TableSet, after: str | None, limit: int) -> list[Any]:
    """The ``limit`` smallest shard keys above ``after`` (keyset, SQL order), from the tables that
    hold every key (:attr:`TableSet.key_sources`: children whose key is a foreign key are skipped).

    The n smallest keys of a union are among the n smallest of each part, so each part is an index
    scan that stops after ``limit`` distinct keys.
    """
    parts = []
    for spec in tables.key_sources:
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
        control: MoveControl | None = None,
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
        self.control = control or MoveControl()
        # only the shards this source's ranges move to can hold its copies (clean_targets scans them)
        self.targets = sorted({m.target for m in range_moves(self.old, self.new) if m.source == source})
        self.names = [TableNames.of(spec) for spec in tables.sharded]

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
                self.control.checkpoint()
                while self.batch():
                    if self.options.sleep:
                        time.sleep(self.options.sleep)
                    self.control.checkpoint()
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
                    for names in reversed(self.names) if orphans else ():
                        result = tconn.exec_driver_sql(
                            f"DELETE FROM {names.live} WHERE {names.key_in}", (orphans,)
                        )
                        removed += result.rowcount
                for names in self.names:  # staged by phase 1 of a batch that never cut over
                    staged = [
                        k for (k,) in tconn.exec_driver_sql(f"SELECT DISTINCT {names.key} FROM {names.stage}")
                    ]
                    orphans = [k for k in staged if self._moves(k) == target]
                    if orphans:
                        tconn.exec_driver_sql(f"DELETE FROM {names.stage} WHERE {names.key_in}", (orphans,))
        return removed

    def batch(self) -> bool:
        """Move the next key batch; False when the source is drained.

        Phase 1 copies the batch without the fence (writers keep writing on the source); phase 2
        takes the fence, re-copies only the keys whose rows changed meanwhile (per-key checksums),
        verifies, deletes and advances the watermark. Writers of moving keys wait only for phase 2.
        """
        started = time.perf_counter()
        with self.manager.connect(self.source) as conn, conn.begin():
            conn.execute(_CANONICAL)
            row = self._state_row(conn, lock="")
            if row.drained:
                return False
            watermark = row.watermark
            keys = next_keys(conn, self.tables, watermark, self.options.batch_size)
            precopied = {
                target: self._replace(conn, target, target_keys)
                for target, target_keys in self._by_target(keys).items()
            }
        if not keys:
            return self._finish_drain(watermark)
        copy_seconds = time.perf_counter() - started
        return self._cut_over(watermark, str(keys[-1]), precopied, len(keys), copy_seconds)

    def _state_row(self, conn: Connection, *, lock: str) -> ShardState:
        row = read_shard_state(conn, self.source, lock=lock, check_table=False)
        if row is None or row.state.version != self.state.version:
            found = "no state" if row is None else f"version {row.state.version}"
            raise RebalanceError(
                f"shard {self.source!r} has {found}, expected ring version {self.state.version}: "
                "the fleet state changed under the mover"
            )
        return row

    def _by_target(self, keys: Sequence[Any]) -> dict[str, list[Any]]:
        by_target: dict[str, list[Any]] = {}
        for key in keys:
            target = self._moves(key)
            if target is not None:
                by_target.setdefault(target, []).append(key)
        return by_target

    def _fence(self, conn: Connection) -> ShardState:
        """Take the fence: wait for in-flight writers of moving keys (FOR SHARE) and block new ones."""
        conn.execute(text(f"SET LOCAL lock_timeout = '{int(self.options.lock_timeout * 1000)}ms'"))
        conn.execute(_CANONICAL)
        return self._state_row(conn, lock="FOR NO KEY UPDATE")

    def _finish_drain(self, watermark: str | None) -> bool:
        """No key above the watermark: mark the source drained, unless one arrived meanwhile."""
        with self.manager.connect(self.source) as conn, conn.begin():
            row = self._fence(conn)
            if row.drained:
                return False
            if row.watermark != watermark:
                raise RebalanceError(f"the watermark of {self.source!r} moved under the mover")
            if next_keys(conn, self.tables, watermark, 1):
                return True  # a writer added a key above the watermark: another batch
            conn.execute(text(f"UPDATE {STATE_TABLE} SET drained = true, updated_at = now()"))
            return False

    def _cut_over(
        self,
        watermark: str | None,
        last: str,
        precopied: dict[str, Checksums],
        scanned: int,
        copy_seconds: float = 0.0,
    ) -> bool:
        with self.manager.connect(self.source) as conn, conn.begin():
            fenced_at = time.perf_counter()
            row = self._fence(conn)
            if row.watermark != watermark:
                raise RebalanceError(f"the watermark of {self.source!r} moved under the mover")
            moving = self._by_target(keys_between(conn, self.tables, watermark, last))
            rows_by_table: dict[str, int] = {}
            for target in sorted(set(precopied) | set(moving)):
                copied = self._catch_up(conn, target, precopied.get(target, {}), moving.get(target, []))
                for table, n in copied.items():
                    rows_by_table[table] = rows_by_table.get(table, 0) + n
            keys = [k for ks in moving.values() for k in ks]
            if keys:
                for spec in reversed(self.tables.sharded):
                    deleted = conn.execute(
                        delete(spec.table).where(spec.key == func.any(_keys_param(spec))), {"keys": keys}
                    ).rowcount
                    if deleted != rows_by_table.get(spec.name, 0):
                        raise RebalanceError(
                            f"{spec.name} on {self.source!r}: deleting {deleted} rows but copied "
                            f"{rows_by_table.get(spec.name, 0)}; rolled back"
                        )
            rows = sum(rows_by_table.values())
            conn.execute(
                text(
                    f"WITH counted AS ({COUNT_BATCH} RETURNING 1) UPDATE {STATE_TABLE} SET watermark = :wm, updated_at = now()"
                ),
                {"wm": last, "rows": rows, "keys": len(keys), "version": self.state.version},
            )
        fence_seconds = time.perf_counter() - fenced_at
        report = BatchReport(
            self.source, scanned, len(keys), rows, rows_by_table, fence_seconds, copy_seconds
        )
        self.tracker.batch(report)
        return True

    def _replace(self, source: Connection, target: str, keys: list[Any]) -> Checksums:
        """Phase 1: stage the keys' rows on ``target`` (committed, unverified, invisible).

        Returns the staged rows' per-key checksums, so the cut-over (which compares them with the
        source's) does not compute them under the fence; only this mover writes these keys' stage.
        """
        with self.manager.connect(target) as tconn, tconn.begin():
            tconn.execute(_CANONICAL)
            for names in self.names:
                tconn.exec_driver_sql(f"DELETE FROM {names.stage} WHERE {names.key_in}", (keys,))
                names.copy(source, tconn, keys)
            return key_checksums(tconn, self.names, keys, staged=True)

    def _catch_up(
        self, source: Connection, target: str, staged: Checksums, keys: list[Any]
    ) -> dict[str, int]:
        """Phase 2, under the fence: make ``target``'s tables hold exactly the source's rows of ``keys``.

        ``staged``: the per-key checksums of what phase 1 staged. Staged keys deleted since phase 1
        are dropped, keys whose per-key checksum differs (changed or new since phase 1) are staged
        again, then the staged rows are inserted into the tables (parents first) and every key is
        verified against the source. Commits the target.
        """
        with self.manager.connect(target) as tconn, tconn.begin():
            tconn.execute(_CANONICAL)
            gone = list({k for _, k in staged} - set(keys))
            if gone:
                for names in self.names:
                    tconn.exec_driver_sql(f"DELETE FROM {names.stage} WHERE {names.key_in}", (gone,))
            expected = key_checksums(source, self.names, keys, staged=False)
            stale = _differing(expected, staged, keys)
            for names in self.names if stale else ():
                tconn.exec_driver_sql(f"DELETE FROM {names.stage} WHERE {names.key_in}", (stale,))
                names.copy(source, tconn, stale)
            for names in reversed(self.names):  # no row of these keys may be live here yet; be exact
                tconn.exec_driver_sql(f"DELETE FROM {names.live} WHERE {names.key_in}", (keys,))
            for names in self.names:
                tconn.exec_driver_sql(names.upsert_from_stage, (keys,))
                tconn.exec_driver_sql(f"DELETE FROM {names.stage} WHERE {names.key_in}", (keys,))
            wrong = _differing(expected, key_checksums(tconn, self.names, keys, staged=False), keys)
            if wrong:
                raise RebalanceError(
                    f"verification failed copying from {self.source!r} to {target!r}: the rows of "
                    f"{len(wrong)} key(s) differ after the copy (e.g. key {wrong[0]!r}); nothing "
                    "was deleted from the source"
                )
        counts: dict[str, int] = {}
        for (index, _), (n, _) in expected.items():
            name = self.tables.sharded[index].name
            counts[name] = counts.get(name, 0) + n
        return counts


def create_stages(manager: ShardManager, tables: TableSet, targets: Sequence[str]) -> None:
    """The staging tables on every target shard (before movers run in parallel: DDL races)."""
    for target in targets:
        with manager.connect(target) as conn, conn.begin():
            for spec in tables.sharded:
                TableNames.of(spec).create_stage(conn)


def drop_stages(manager: ShardManager, tables: TableSet, targets: Sequence[str]) -> None:
    """Drop the (empty) staging tables once the move is finished."""
    for target in targets:
        with manager.connect(target) as conn, conn.begin():
            for spec in tables.sharded:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {TableNames.of(spec).stage}")


def drop_leftover_stages(manager: ShardManager, shard_ids: Sequence[str]) -> dict[str, int]:
    """Drop every ``shardkit_in_*`` table on ``shard_ids`` (only when no move is in flight: a
    mover killed while dropping them leaves the rest); returns ``{shard: tables dropped}``."""
    dropped: dict[str, int] = {}
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn, conn.begin():
            names = (
                conn.execute(
                    text(
                        "SELECT quote_ident(tablename) FROM pg_tables"
                        " WHERE schemaname = current_schema() AND starts_with(tablename, :prefix)"
                    ),
                    {"prefix": STAGE_PREFIX},
                )
                .scalars()
                .all()
            )
            for name in names:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        if names:
            dropped[shard_id] = len(names)
    return dropped


def keys_between(conn: Connection, tables: TableSet, after: str | None, upto: str) -> list[Any]:
    """Every shard key in ``(after, upto]`` (the range one batch covers), from the key sources."""
    parts = []
    for spec in tables.key_sources:
        part = select(spec.key.label("k")).distinct().where(spec.key <= _key_param(spec, "upto"))
        if after is not None:
            part = part.where(spec.key > _key_param(spec, "after"))
        parts.append(part)
    merged = union(*parts).subquery()
    params: dict[str, Any] = {"upto": upto}
    if after is not None:
        params["after"] = after
    return list(conn.execute(select(merged.c.k).order_by(merged.c.k), params).scalars())


Checksums = dict[tuple[int, Any], tuple[int, int]]
"""``{(table index, key): (rows, sum of row hashes)}``: see :func:`key_checksums`."""


def key_checksums(
    conn: Connection, names: Sequence[TableNames], keys: Sequence[Any], *, staged: bool
) -> Checksums:
    """``{(table index, key): (rows, sum of row hashes)}`` for ``keys``, in one query.

    The hash is PostgreSQL's own text form of each row (``ROW(columns)::text``), so the live and
    the staging table of one shard, and the same table on two shards, compare alike.
    """
    if not keys:
        return {}
    parts = [
        f"SELECT {i} AS t, {n.key} AS k, count(*), sum(hashtextextended(ROW({n.columns})::text, 0)) "
        f"FROM {n.stage if staged else n.live} WHERE {n.key_in} GROUP BY {n.key}"
        for i, n in enumerate(names)
    ]
    result = conn.exec_driver_sql(" UNION ALL ".join(parts), tuple([list(keys)] * len(parts)))
    return {(int(t), k): (int(c), int(h)) for t, k, c, h in result}


def _differing(
    expected: dict[tuple[int, Any], tuple[int, int]],
    got: dict[tuple[int, Any], tuple[int, int]],
    keys: list[Any],
) -> list[Any]:
    """Keys whose rows differ in any table between two :func:`key_checksums` results."""
    wanted = set(keys)
    bad = {k for (t, k), v in expected.items() if k in wanted and got.get((t, k)) != v}
    bad |= {k for (t, k), v in got.items() if k in wanted and expected.get((t, k)) != v}
    return [k for k in keys if k in bad]


@dataclass(frozen=True)
class TableNames:
    """The quoted SQL names one sharded table needs: itself, its staging table, its key."""

    live: str
    stage: str
    key: str
    key_in: str
    """``key = ANY(CAST(%s AS type[]))``: the rows of a list of keys."""
    columns: str
    upsert_from_stage: str

    @classmethod
    def of(cls, spec: ShardedTable) -> TableNames:
        preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
        quote = preparer.quote
        live = preparer.format_table(spec.table)
        stage = quote(f"{STAGE_PREFIX}{spec.table.name}")
        key = quote(spec.key.name)
        key_in = f"{key} = ANY(CAST(%s AS {spec.key_sql_type}[]))"
        columns = ", ".join(quote(c.name) for c in spec.table.c)
        primary = ", ".join(quote(c.name) for c in spec.table.primary_key.columns)
        changes = ", ".join(
            f"{quote(c.name)} = EXCLUDED.{quote(c.name)}" for c in spec.table.c if not c.primary_key
        )
        conflict = f"DO UPDATE SET {changes}" if changes else "DO NOTHING"
        upsert = (
            f"INSERT INTO {live} ({columns}) SELECT {columns} FROM {stage} WHERE {key_in} "
            f"ON CONFLICT ({primary}) {conflict}"
        )
        return cls(live, stage, key, key_in, columns, upsert)

    def create_stage(self, conn: Connection) -> None:
        """An unlogged table shaped like the live one (no constraints) where phase 1 copies to."""
        conn.exec_driver_sql(f"CREATE UNLOGGED TABLE IF NOT EXISTS {self.stage} (LIKE {self.live})")
        index = self.stage[:-1] + '_key"' if self.stage.endswith('"') else self.stage + "_key"
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {index} ON {self.stage} ({self.key})")

    def copy(self, source: Connection, target: Connection, keys: list[Any]) -> int:
        """Stream the keys' rows from the source table into this staging table with COPY."""
        src = source.connection.driver_connection.cursor()  # type: ignore[union-attr]
        dst = target.connection.driver_connection.cursor()  # type: ignore[union-attr]
        out_sql = f"COPY (SELECT {self.columns} FROM {self.live} WHERE {self.key_in}) TO STDOUT"
        with (
            src.copy(out_sql, (keys,)) as out,
            dst.copy(f"COPY {self.stage} ({self.columns}) FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        return int(src.rowcount)


__all__ = [
    "MOVER_LOCK",
    "MoveOptions",
    "SourceMover",
    "TableNames",
    "create_stages",
    "drop_leftover_stages",
    "drop_stages",
    "key_checksums",
    "keys_between",
    "next_keys",
]
