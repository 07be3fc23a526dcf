"""Moving one source shard's keys: copy, verify, cut over and delete, one key batch at a time.

A batch is the source's next moving shard keys above its watermark (keyset pagination over the key
column of the tables that hold every key, in the column's SQL order; never OFFSET; keys that stay
are skipped). Its size adapts so that its cut-over takes about ``MoveOptions.fence_seconds``. Each
batch runs in two phases:

1. **copy** (no fence; writers keep writing the keys on the source): in one ``REPEATABLE READ``
   snapshot of the source, the keys' rows are streamed with ``COPY ... TO STDOUT (FORMAT binary)``
   straight into ``COPY ... FROM STDIN`` of the live tables of each target (parents first), in a
   target transaction that stays **open** (so nobody sees the copies), in primary-key order; an
   xxh3-128 digest of the bytes sent is compared with the target's rows read back the same way
   (verified before the fence), and the same snapshot gives each key's version fingerprint
   (row count and ``ctid``/``xmin`` of each row, which change with every write; no row rendered);
2. **cut-over** (short): one source transaction locks the source's state row ``FOR NO KEY UPDATE``
   -- writers of moving keys, who lock it ``FOR SHARE``, wait; nobody else does. It re-reads the
   batch's key range (new keys included) and the fingerprints: only keys that changed since the
   snapshot are copied and verified again. Then it commits the targets, deletes the rows from the
   source (children first, row counts checked), advances the watermark, and commits: that commit
   is the cut-over.

Crash safety: targets commit before the source. A crash in between leaves copies on a target for
keys above the source's watermark; routing never sends anyone there (the key has not moved), and
the next run deletes them before it starts (:meth:`SourceMover.clean_targets`). A crash at any
other moment leaves only open transactions, which the servers roll back. A session-level advisory
lock on the source keeps a second mover of the same source out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    String,
    bindparam,
    cast,
    select,
    text,
    union,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql import sqltypes
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import UserDefinedType
from xxhash import xxh3_128

from ..errors import RebalanceError
from ..manager import ShardManager
from ..ring_state import MOVED_KEYS_TABLE
from .catalog import STATE_TABLE, RingState, ShardState, read_shard_state
from .companions import (
    KeyCompanion,
    clean_companions,
    key_companions,
    move_companions,
    present,
    require_on_targets,
)
from .control import MoveControl
from .parallel import for_shards
from .plan import range_moves
from .progress import BatchReport, ProgressTracker
from .record import COUNT_BATCH
from .saga_log import FencedTable, drain_fenced, fenced_tables
from .tables import ShardedTable, TableSet

STAGE_PREFIX = "shardkit_in_"
"""Staging tables of earlier versions (``shardkit_in_<table>``), dropped when a move finishes."""
FIRST_BATCH = 64
"""Moving keys in a source's first batch, before its cut-over time is measured."""
MIN_BATCH = 8
"""The adaptive batch never shrinks below this (a cut-over's fixed cost would dominate)."""

MOVER_LOCK = (0x5348_4B54, 0x4D4F_5645)
"""Advisory lock (two int4 keys) a mover holds on its source shard for the whole run."""

# the checksum compares PostgreSQL's text form of each row, so both sides must render alike
_SETTINGS = (
    "SET LOCAL timezone = 'UTC'; SET LOCAL datestyle = 'ISO, YMD';"
    " SET LOCAL intervalstyle = 'postgres'; SET LOCAL extra_float_digits = 3"
)
_CANONICAL = text(_SETTINGS)
# the moved-keys journal of a target (see _journal): entries of keys already cut over are dropped
_FORGET = f"DELETE FROM {MOVED_KEYS_TABLE} WHERE version = %s AND source = %s"
_JOURNAL = (
    f"INSERT INTO {MOVED_KEYS_TABLE} (k, version, source)"
    " SELECT CAST(k AS text), %s, %s FROM unnest(CAST(%s AS {key_type}[])) AS k ON CONFLICT DO NOTHING"
)
_JOURNAL_AFTER_FORGET = f"WITH forgotten AS ({_FORGET}) {_JOURNAL}"
# phase 1: the copy, its checksums and its fingerprints all read one snapshot of the source
_SNAPSHOT = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; " + _SETTINGS)


@dataclass(frozen=True)
class MoveOptions:
    """Throttling knobs of the mover."""

    batch_size: int = 2000
    """At most this many moving shard keys per batch (all rows of a key move together)."""
    fence_seconds: float = 0.08
    """The cut-over length a batch aims at: the batch size adapts (from 64 keys up to
    ``batch_size``) so that writers of moving keys wait about this long, at most, per batch."""
    sleep: float = 0.0
    """Seconds to pause between batches (throttling)."""
    lock_timeout: float = 30.0
    """How long a batch waits for in-flight writers of moving keys before giving up."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise RebalanceError(f"batch size must be >= 1, got {self.batch_size}")
        if self.sleep < 0:
            raise RebalanceError(f"sleep must be >= 0, got {self.sleep}")
        if self.fence_seconds <= 0:
            raise RebalanceError(f"fence_seconds must be > 0, got {self.fence_seconds}")


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
        self.batch_keys = min(FIRST_BATCH, options.batch_size)
        """Moving keys in the next batch (adapted to ``options.fence_seconds`` after each)."""
        self.companions: tuple[KeyCompanion, ...] = ()
        """Library tables whose rows move with their shard key (saga receipts), on this source."""
        self.fenced: tuple[FencedTable, ...] = ()
        """Tables placed by another column (the saga log), on this source (:mod:`.saga_log`)."""

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        """Move every batch until the source is drained; safe to re-run after any crash."""
        with self.manager.connect_direct(self.source) as guard:  # session-level lock: not via PgBouncer
            lock = dict(zip("ab", MOVER_LOCK, strict=True))
            got = guard.execute(text("SELECT pg_try_advisory_lock(:a, :b)"), lock).scalar_one()
            guard.commit()
            if not got:
                raise RebalanceError(f"another mover is already draining shard {self.source!r}")
            try:
                self._find_carried_tables()
                self.clean_targets()
                self.control.checkpoint()
                while self.batch():
                    if self.options.sleep:
                        time.sleep(self.options.sleep)
                    self.control.checkpoint()
                drain_fenced(self)
            finally:
                guard.execute(text("SELECT pg_advisory_unlock(:a, :b)"), lock)
                guard.commit()

    def _find_carried_tables(self) -> None:
        """The library's tables (saga log, receipts) this source holds; each target must have them."""
        companions, fenced = key_companions(), fenced_tables()
        with self.manager.connect(self.source) as conn:
            here = present(conn, [*(c.table.name for c in companions), *(p.table.name for p in fenced)])
            conn.rollback()
        require_on_targets(self, here)
        self.companions = tuple(c for c in companions if c.table.name in here)
        self.fenced = tuple(p for p in fenced if p.table.name in here)

    def _moves(self, key: Any) -> str | None:
        """The key's target if it is this source's to move, else None."""
        if self.old.get_shard(key) != self.source:
            return None  # a stray row: never overwrite the owner's data with it
        target = self.new.get_shard(key)
        return None if target == self.source else target

    def clean_targets(self) -> int:
        """Delete rows a crashed run committed on a target for keys the source has not cut over.

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
                    if orphans:
                        clean_companions(self, tconn, orphans)
                tconn.exec_driver_sql(_FORGET, (self.state.version, self.source))
        return removed

    def _journal(self, tconn: Connection, keys: list[Any], *, forget: bool = False) -> None:
        """List ``keys`` in the target's :data:`~sa_shardkit.ring_state.MOVED_KEYS_TABLE` (in its
        open transaction, with the copies): until the source's watermark passes them, scatters hide
        their rows here. ``forget``: first drop this source's earlier entries (all cut over)."""
        if not keys:
            return
        sql = _JOURNAL_AFTER_FORGET if forget else _JOURNAL
        key_type = self.tables.key_sql_type
        args = (self.state.version, self.source) if forget else ()
        tconn.exec_driver_sql(sql.format(key_type=key_type), (*args, self.state.version, self.source, keys))

    def _next_batch(self, conn: Connection, watermark: str | None) -> tuple[list[Any], str | None]:
        """The next ``batch_keys`` moving keys above ``watermark`` and the batch's last key (the
        range ``(watermark, last]`` may hold keys that stay; at the end it covers every key)."""
        moving: list[Any] = []
        after = watermark
        chunk = max(256, self.batch_keys * 8)
        while True:
            keys = next_keys(conn, self.tables, after, chunk)
            for key in keys:
                if self._moves(key) is not None:
                    moving.append(key)
                    if len(moving) == self.batch_keys:
                        return moving, str(key)
            if len(keys) < chunk:
                return moving, str(keys[-1]) if keys else after
            after = str(keys[-1])

    def batch(self) -> bool:
        """Move the next key batch; False when the source is drained.

        Phase 1 copies the batch without the fence into open target transactions; phase 2 takes
        the fence, re-copies only the keys whose rows changed meanwhile, commits the targets,
        deletes and advances the watermark. Writers of moving keys wait only for phase 2.
        """
        started = time.perf_counter()
        with ExitStack() as targets:
            with self.manager.connect(self.source) as conn, conn.begin():
                conn.execute(_SNAPSHOT)
                row = self._state_row(conn, lock="")
                if row.drained:
                    return False
                watermark = row.watermark
                keys, last = self._next_batch(conn, watermark)
                by_target = self._by_target(keys)
                open_targets = {t: targets.enter_context(self._target(t)) for t in sorted(by_target)}
                snapshot = self._copy(conn, open_targets, by_target)
            if not keys:
                if last != watermark:
                    return self._skip_to(watermark, last)
                return self._finish_drain(watermark)
            assert last is not None
            copy_seconds = time.perf_counter() - started
            return self._cut_over(watermark, last, open_targets, snapshot, copy_seconds, targets)

    @contextmanager
    def _target(self, target: str) -> Iterator[Connection]:
        """A target connection in an open transaction (rolled back unless the cut-over commits)."""
        with self.manager.connect(target) as tconn:
            tconn.begin()
            tconn.execute(_CANONICAL)
            yield tconn

    def _copy(
        self, source: Connection, targets: dict[str, Connection], by_target: dict[str, list[Any]]
    ) -> Checksums:
        """Phase 1: stream the keys' rows into each open target transaction and verify them there.

        Returns the source's per-key checksums and fingerprints of the snapshot that was copied.
        """
        keys = [k for ks in by_target.values() for k in ks]
        for target, target_keys in by_target.items():
            self._journal(targets[target], target_keys, forget=True)
            sent = self._replace(source, targets[target], target_keys, fresh=True)
            self._verify(target, targets[target], target_keys, sent)
        return key_checksums(source, self.names, keys)

    def _replace(
        self, source: Connection, tconn: Connection, keys: list[Any], *, fresh: bool = False
    ) -> list[Digest]:
        """Make the target's rows of ``keys`` a copy of the source's (in the target's open
        transaction); returns each table's digest of what was sent. ``fresh``: the target holds no
        row of them (clean_targets ran; writers write them on the source), so a row there would
        fail the COPY on its primary key, loudly."""
        if not keys:
            return []
        if not fresh:
            _pipelined(tconn, [f"DELETE FROM {n.live} WHERE {n.key_in}" for n in reversed(self.names)], keys)
        return [names.copy(source, tconn, keys) for names in self.names]

    def _verify(self, target: str, tconn: Connection, keys: list[Any], sent: list[Digest]) -> None:
        """The target now holds exactly the bytes that were sent (re-read in key order), table by table."""
        for names, spec, digest in zip(self.names, self.tables.sharded, sent, strict=True):
            stored = names.digest(tconn, keys)
            if stored != digest:
                raise RebalanceError(
                    f"verification failed copying from {self.source!r} to {target!r}: {spec.name} "
                    f"holds {stored[0]} rows that differ from the {digest[0]} sent for {len(keys)} "
                    f"key(s) (e.g. key {keys[0]!r}); nothing was deleted from the source"
                )

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
        timeout = f"SET LOCAL lock_timeout = '{int(self.options.lock_timeout * 1000)}ms'; "
        conn.execute(text(timeout + _SETTINGS))
        return self._state_row(conn, lock="FOR NO KEY UPDATE")

    def _skip_to(self, watermark: str | None, last: str | None) -> bool:
        """Keys up to ``last`` stay here (none moves): advance the watermark past them."""
        with self.manager.connect(self.source) as conn, conn.begin():
            row = self._fence(conn)
            if row.watermark != watermark:
                raise RebalanceError(f"the watermark of {self.source!r} moved under the mover")
            if any(self._moves(k) for k in keys_between(conn, self.tables, watermark, str(last))):
                return True  # a moving key arrived meanwhile: the next batch takes it
            conn.execute(text(f"UPDATE {STATE_TABLE} SET watermark = :wm, updated_at = now()"), {"wm": last})
        return True

    def _finish_drain(self, watermark: str | None) -> bool:
        """No moving key above the watermark: mark the source drained, unless one arrived meanwhile."""
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
        targets: dict[str, Connection],
        snapshot: Checksums,
        copy_seconds: float,
        stack: ExitStack,
    ) -> bool:
        with self.manager.connect(self.source) as conn, conn.begin():
            fenced_at = time.perf_counter()
            row = self._fence(conn)
            if row.watermark != watermark:
                raise RebalanceError(f"the watermark of {self.source!r} moved under the mover")
            known = list(dict.fromkeys(k for _, k in snapshot))
            now, arrived = range_fingerprints(conn, self.tables, self.names, watermark, last, known)
            arrived = [k for k in arrived if self._moves(k) is not None]  # new keys in the range
            keys = [*(k for k in known if any((i, k) in now for i in range(len(self.names)))), *arrived]
            stale = set(_differing(snapshot, now, known)) | set(arrived)
            final = {tk: v for tk, v in now.items() if tk[1] not in stale}
            for target in sorted(set(targets) | {self.new.get_shard(k) for k in arrived}):
                redo = [k for k in [*known, *arrived] if k in stale and self.new.get_shard(k) == target]
                if target not in targets:  # a key arrived for a target phase 1 did not copy to
                    targets[target] = stack.enter_context(self._target(target))
                self._journal(targets[target], [k for k in arrived if self.new.get_shard(k) == target])
                if redo:  # under the fence: these keys' rows cannot change meanwhile
                    self._verify(target, targets[target], redo, self._replace(conn, targets[target], redo))
                    final.update(key_checksums(conn, self.names, redo))
            move_companions(self, conn, targets, keys)  # saga receipts travel with their keys
            for tconn in targets.values():
                tconn.commit()
            rows_by_table: dict[str, int] = {}
            for (index, _), (n, _) in final.items():
                name = self.tables.sharded[index].name
                rows_by_table[name] = rows_by_table.get(name, 0) + n
            if keys:
                statements = [f"DELETE FROM {n.live} WHERE {n.key_in}" for n in reversed(self.names)]
                deleted = _pipelined(conn, statements, keys)
                for spec, count in zip(reversed(self.tables.sharded), deleted, strict=True):
                    if count != rows_by_table.get(spec.name, 0):
                        raise RebalanceError(
                            f"{spec.name} on {self.source!r}: deleting {count} rows but copied "
                            f"{rows_by_table.get(spec.name, 0)}; rolled back"
                        )
            rows = sum(rows_by_table.values())
            conn.execute(
                text(
                    f"WITH counted AS ({COUNT_BATCH} RETURNING 1) "
                    f"UPDATE {STATE_TABLE} SET watermark = :wm, updated_at = now()"
                ),
                {"wm": last, "rows": rows, "keys": len(keys), "version": self.state.version},
            )
        fence_seconds = time.perf_counter() - fenced_at
        self._adapt(fence_seconds, len(keys))
        report = BatchReport(
            self.source, len(keys), len(keys), rows, rows_by_table, fence_seconds, copy_seconds
        )
        self.tracker.batch(report)
        return True

    def _adapt(self, fence_seconds: float, keys: int) -> None:
        """Size the next batch so that its cut-over takes about ``options.fence_seconds``: double
        it while a cut-over takes under half of that (quadruple under a quarter), shrink it in proportion when one took longer
        (a cut-over has a fixed part -- round trips, commits -- so the rate per key is not linear)."""
        target = self.options.fence_seconds
        if fence_seconds > target:
            wanted = int(self.batch_keys * target / fence_seconds)
        elif fence_seconds < target / 2 and keys >= self.batch_keys:
            wanted = self.batch_keys * (4 if fence_seconds < target / 4 else 2)
        else:
            return
        self.batch_keys = min(self.options.batch_size, max(MIN_BATCH, wanted))


def drop_leftover_stages(manager: ShardManager, shard_ids: Sequence[str]) -> dict[str, int]:
    """Drop every ``shardkit_in_*`` table (the staging tables of older versions, or of a mover
    killed while dropping them) on ``shard_ids`` and empty their moved-keys journals (call it only
    with no move in flight); returns ``{shard: tables dropped}``."""
    dropped: dict[str, int] = {}

    def drop(conn: Connection, shard_id: str) -> None:
        found = text(
            "SELECT quote_ident(tablename) FROM pg_tables"
            " WHERE schemaname = current_schema() AND starts_with(tablename, :prefix)"
        )
        names = conn.execute(found, {"prefix": STAGE_PREFIX}).scalars().all()
        for name in names:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        if conn.execute(text("SELECT to_regclass(:t)"), {"t": MOVED_KEYS_TABLE}).scalar() is not None:
            conn.exec_driver_sql(f"DELETE FROM {MOVED_KEYS_TABLE}")  # no move in flight: all stale
        if names:
            dropped[shard_id] = len(names)

    for_shards(manager, drop, shard_ids)
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


def _pipelined(conn: Connection, statements: list[str], keys: list[Any]) -> list[int]:
    """Run ``statements`` (each taking the key list) in one round trip (psycopg pipeline mode),
    in the connection's transaction; returns each one's row count."""
    raw = conn.connection.driver_connection
    assert raw is not None
    cursors = [raw.cursor() for _ in statements]
    with raw.pipeline():
        for cursor, sql in zip(cursors, statements, strict=True):
            cursor.execute(sql, (keys,))
    return [int(c.rowcount) for c in cursors]


def range_fingerprints(
    conn: Connection,
    tables: TableSet,
    names: Sequence[TableNames],
    after: str | None,
    upto: str,
    known: Sequence[Any],
) -> tuple[Checksums, list[Any]]:
    """In one query: the version fingerprints (:func:`key_checksums` without content) of the
    ``known`` keys, and every other key of the range ``(after, upto]`` (keys that arrived)."""
    parts = [
        f"SELECT {i} AS t, {n.key} AS k, count(*), sum(hashtextextended(ctid::text || xmin::text, 0))"
        f" FROM {n.live} WHERE {n.key_in} GROUP BY {n.key}"
        for i, n in enumerate(names)
    ]
    params: list[Any] = [list(known)] * len(parts)
    for spec in tables.key_sources:
        n = TableNames.of(spec)
        lower = f"{n.key} > CAST(%s AS {spec.key_sql_type}) AND " if after is not None else ""
        parts.append(
            f"SELECT DISTINCT -1, {n.key}, 0, 0 FROM {n.live} WHERE {lower}"
            f"{n.key} <= CAST(%s AS {spec.key_sql_type}) AND NOT {n.key_in}"
        )
        params += [*([after] if after is not None else []), upto, list(known)]
    found: Checksums = {}
    arrived: dict[Any, None] = {}
    for t, k, c, v in conn.exec_driver_sql(" UNION ALL ".join(parts), tuple(params)):
        if int(t) < 0:
            arrived[k] = None
        else:
            found[(int(t), k)] = (int(c), int(v))
    return found, sorted(arrived)


Checksums = dict[tuple[int, Any], tuple[int, int]]
"""``{(table index, key): (rows, version fingerprint)}``: see :func:`key_checksums`."""

Digest = tuple[int, str]
"""``(rows, xxh3-128 of the COPY bytes)`` of one table's rows of a key list, in primary-key order."""


def key_checksums(conn: Connection, names: Sequence[TableNames], keys: Sequence[Any]) -> Checksums:
    """Per table and key, in one query: the row count and the sum of the row versions' hashes
    (``ctid``, ``xmin``: they change with every insert, update or delete of a row, and reading
    them renders no row). Compared between two moments of one shard, they say which keys changed."""
    if not keys:
        return {}
    parts = [
        f"SELECT {i} AS t, {n.key} AS k, count(*), sum(hashtextextended(ctid::text || xmin::text, 0))"
        f" FROM {n.live} WHERE {n.key_in} GROUP BY {n.key}"
        for i, n in enumerate(names)
    ]
    result = conn.exec_driver_sql(" UNION ALL ".join(parts), tuple([list(keys)] * len(parts)))
    return {(int(t), k): (int(c), int(v)) for t, k, c, v in result}


def _differing(expected: Checksums, got: Checksums, keys: Sequence[Any]) -> list[Any]:
    """Keys whose rows differ in any table between two :func:`key_checksums` results."""
    wanted = set(keys)
    bad = {
        k
        for mine, theirs in ((expected, got), (got, expected))
        for (t, k), v in mine.items()
        if k in wanted and theirs.get((t, k)) != v
    }
    return [k for k in dict.fromkeys(keys) if k in bad]


@dataclass(frozen=True)
class TableNames:
    """The quoted SQL names one sharded table needs: itself, its key, its columns, its order."""

    live: str
    key: str
    key_in: str
    """``key = ANY(CAST(%s AS type[]))``: the rows of a list of keys."""
    columns: str
    order: str
    """The primary key's columns: both ends stream rows in this order, so their bytes compare."""
    format: str
    """``binary`` unless a column's binary form names a database-specific type (arrays, enums,
    user-defined types): then ``text``, rendered under the same settings on both ends."""

    @classmethod
    def of(cls, spec: ShardedTable) -> TableNames:
        preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
        quote = preparer.quote
        key = quote(spec.key.name)
        key_in = f"{key} = ANY(CAST(%s AS {spec.key_sql_type}[]))"
        columns = ", ".join(quote(c.name) for c in spec.table.c)
        order = ", ".join(quote(c.name) for c in spec.table.primary_key.columns)
        portable = all(not isinstance(c.type, _LOCAL_TYPES) for c in spec.table.c)
        return cls(
            preparer.format_table(spec.table), key, key_in, columns, order, "binary" if portable else "text"
        )

    def _out(self) -> str:
        return (
            f"COPY (SELECT {self.columns} FROM {self.live} WHERE {self.key_in} ORDER BY {self.order})"
            f" TO STDOUT (FORMAT {self.format})"
        )

    def copy(self, source: Connection, target: Connection, keys: list[Any]) -> Digest:
        """Stream the keys' rows from the source table into the target's with COPY (no Python row
        is built); returns the digest of the bytes sent."""
        src = source.connection.driver_connection.cursor()  # type: ignore[union-attr]
        dst = target.connection.driver_connection.cursor()  # type: ignore[union-attr]
        hasher = xxh3_128()
        with (
            src.copy(self._out(), (keys,)) as out,
            dst.copy(f"COPY {self.live} ({self.columns}) FROM STDIN (FORMAT {self.format})") as into,
        ):
            for block in out:
                hasher.update(block)
                into.write(block)
        return int(src.rowcount), hasher.hexdigest()

    def digest(self, conn: Connection, keys: list[Any]) -> Digest:
        """The digest of this shard's rows of ``keys`` (as :meth:`copy` computes it)."""
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        hasher = xxh3_128()
        with cursor.copy(self._out(), (keys,)) as out:
            for block in out:
                hasher.update(block)
        return int(cursor.rowcount), hasher.hexdigest()


_LOCAL_TYPES = (sqltypes.ARRAY, sqltypes.Enum, UserDefinedType, postgresql.HSTORE)


__all__ = [
    "MOVER_LOCK",
    "MoveOptions",
    "SourceMover",
    "TableNames",
    "drop_leftover_stages",
    "key_checksums",
    "keys_between",
    "range_fingerprints",
    "next_keys",
]
