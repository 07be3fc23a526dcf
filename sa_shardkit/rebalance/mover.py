"""Moving one source shard's keys: copy, verify, cut over and delete, one key batch at a time.

A batch is the source's next moving shard keys above its watermark (keyset pagination over the key
column of the tables that hold every key, in the column's SQL order; never OFFSET; keys that stay
are skipped). Its size adapts so that its cut-over takes about ``MoveOptions.fence_seconds``. Each
batch runs in two phases:

1. **copy** (no fence; writers keep writing the keys on the source): in one ``REPEATABLE READ``
   snapshot of the source, the keys' rows are streamed with ``COPY ... TO STDOUT (FORMAT binary)``
   straight into ``COPY ... FROM STDIN`` of the live tables of each target (parents first), in
   primary-key order, and the keys are listed in the target's moved-keys journal
   (:data:`~sa_shardkit.ring_state.MOVED_KEYS_TABLE`) in the same transaction. The target is
   checked to store exactly the bytes sent (binary COPY, no user trigger or rule, the source's
   column types), else the rows are read back and their xxh3-128 digest compared with the bytes'.
   The same snapshot gives each key's version fingerprint (row count and ``ctid``/``xmin`` of each
   row, which change with every write; no row rendered). Then the targets **commit**: the copies
   are invisible all the same -- routing sends keyed reads and writes to the source until the
   cut-over, and scatters hide journaled keys the source's watermark has not passed
   (:mod:`sa_shardkit.scatter.ownership`);
2. **cut-over** (short): one source transaction locks the source's state row ``FOR NO KEY UPDATE``
   -- writers of moving keys, who lock it ``FOR SHARE``, wait; nobody else does -- and re-reads the
   batch's key range (new keys included) and the fingerprints, in one round trip: only keys that
   changed since the snapshot are copied again (and verified), in a new target transaction
   committed under the fence. Then it deletes the rows from the source (children first) and
   advances the watermark in one round trip, checks the row counts against what was copied, and
   commits: that commit is the cut-over (three round trips when no key changed).

Crash safety: targets commit before the source. A crash in between leaves copies on a target for
keys above the source's watermark; routing never sends anyone there (the key has not moved),
scatters hide them (the journal), and the next run deletes them before it starts
(:meth:`SourceMover.clean_targets`). A crash at any other moment leaves only open transactions,
which the servers roll back. A session-level advisory lock on the source keeps a second mover of
the same source out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from psycopg.rows import namedtuple_row
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
from .catalog import STATE_TABLE, RingState, ShardState, read_shard_state, row_to_state
from .companions import (
    KeyCompanion,
    clean_companions,
    key_companions,
    move_companions,
    present,
    require_on_targets,
)
from .control import MoveControl
from .held import HeldConnections
from .parallel import for_shards
from .plan import range_moves
from .progress import BatchReport, ProgressTracker
from .record import COUNT_BATCH
from .saga_log import FencedTable, drain_fenced, fenced_tables
from .tables import ShardedTable, TableSet
from .trusted_rows import DISTRUST, SOURCE_FOREIGN_KEYS, TRUST_SOURCE, TRUST_TARGET, trust_params

STAGE_PREFIX = "shardkit_in_"
"""Staging tables of earlier versions (``shardkit_in_<table>``), dropped when a move finishes."""
FIRST_BATCH = 64
"""Moving keys in a source's first batch, before its cut-over time is measured."""
MIN_BATCH = 8
"""The adaptive batch never shrinks below this (a cut-over's fixed cost would dominate)."""
COPY_CHUNK = 64 * 1024
"""Bytes of COPY rows gathered before one write to the target (one call per row cost 40% more CPU)."""

MOVER_LOCK = (0x5348_4B54, 0x4D4F_5645)
"""Advisory lock (two int4 keys) a mover holds on its source shard for the whole run."""

# the checksum compares PostgreSQL's text form of each row, so both sides must render alike
_SETTINGS = (
    "SET LOCAL timezone = 'UTC'; SET LOCAL datestyle = 'ISO, YMD';"
    " SET LOCAL intervalstyle = 'postgres'; SET LOCAL extra_float_digits = 3"
)
_CANONICAL = text(_SETTINGS)
_SETTING_STATEMENTS = [part.strip() for part in _SETTINGS.split(";") if part.strip()]
_STATE_COLUMNS = "version, ring, target_ring, key_type, watermark, drained"
# the cut-over's last statement on the source (with the deletes): counters and the watermark
_ADVANCE = (
    "WITH counted AS ("
    + COUNT_BATCH.replace(":rows", "%(rows)s").replace(":keys", "%(keys)s").replace(":version", "%(version)s")
    + f" RETURNING 1) UPDATE {STATE_TABLE} SET watermark = %(wm)s, updated_at = now(){{drained}} RETURNING drained"
)
# with the last batch of the source's range: drained too if no key at all is above the new watermark
_DRAINED = ", drained = %(last)s AND NOT EXISTS ({above})"
# what makes a table store other bytes than a binary COPY sent: user triggers and rules (count),
# and its columns' types (the same on both ends, or the read-back runs)
_SHAPE = (
    "WITH t AS (SELECT CAST(CAST(%s AS text[]) AS regclass[]) AS ids) SELECT"
    " (SELECT count(*) FROM pg_trigger, t WHERE tgrelid = ANY(t.ids) AND NOT tgisinternal)"
    " + (SELECT count(*) FROM pg_rewrite, t WHERE ev_class = ANY(t.ids) AND rulename <> '_RETURN'),"
    " (SELECT string_agg(attrelid::regclass::text || '.' || attname || ' '"
    " || format_type(atttypid, atttypmod) || CAST(attgenerated AS text), ', ' ORDER BY attrelid::regclass::text, attname)"
    " FROM pg_attribute, t WHERE attrelid = ANY(t.ids) AND attnum > 0 AND NOT attisdropped)"
)
# the moved-keys journal of a target (see _journal): entries of keys already cut over are dropped
_FORGET = f"DELETE FROM {MOVED_KEYS_TABLE} WHERE version = %s AND source = %s"
_JOURNAL = (
    f"INSERT INTO {MOVED_KEYS_TABLE} (k, version, source)"
    " SELECT CAST(k AS text), %s, %s FROM unnest(CAST(%s AS {key_type}[])) AS k ON CONFLICT DO NOTHING"
)
_JOURNAL_AFTER_FORGET = f"WITH forgotten AS ({_FORGET}) {_JOURNAL}"
# whether a target's journal lists keys of this source (only then can a killed run's copies be there)
_JOURNALED = f"SELECT EXISTS (SELECT 1 FROM {MOVED_KEYS_TABLE} WHERE version = %s AND source = %s)"


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
        self.held = HeldConnections(manager)
        """The source's and targets' connections, kept for the whole :meth:`run`."""
        # only the shards this source's ranges move to can hold its copies (clean_targets scans them)
        self.targets = sorted({m.target for m in range_moves(self.old, self.new) if m.source == source})
        self.names = [TableNames.of(spec) for spec in tables.sharded]
        self.text_format = any(n.format == "text" for n in self.names)
        """A table streams text COPY: both ends render under :data:`_SETTINGS` (binary needs none)."""
        self._regclasses = [n.live for n in self.names]
        self._key_names = [spec.key.name for spec in tables.sharded]
        self._source_shape: str | None = None
        self._source_fks: str | None = None
        """The source's foreign keys (:data:`~.trusted_rows.FOREIGN_KEYS`), read once per run."""
        self.trusted_batches = 0
        """Target transactions of this run that skipped the foreign-key triggers (:mod:`.trusted_rows`)."""
        self._samples: list[tuple[int, float]] = []
        """``(keys, cut-over seconds)`` of the last batches (:meth:`_adapt`)."""
        self.batch_keys = min(FIRST_BATCH, options.batch_size)
        """Moving keys in the next batch (adapted to ``options.fence_seconds`` after each)."""
        self.companions: tuple[KeyCompanion, ...] = ()
        """Library tables whose rows move with their shard key (saga receipts), on this source."""
        self.fenced: tuple[FencedTable, ...] = ()
        """Tables placed by another column (the saga log), on this source (:mod:`.saga_log`)."""
        self.steps: dict[str, float] = {}
        """Seconds per step of the current batch (:meth:`_step`), reported with it."""
        above = " UNION ALL ".join(
            f"SELECT 1 FROM {n.live} WHERE {n.key} > CAST(CAST(%(wm)s AS text) AS {spec.key_sql_type})"
            for spec in tables.key_sources
            for n in [TableNames.of(spec)]
        )
        self._advance = _ADVANCE.format(drained=_DRAINED.format(above=above))
        """The cut-over's counters + watermark statement; it marks the source drained after its
        last batch (what :meth:`_finish_drain` checks, under the same fence: one batch less)."""

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        """Time one step of a batch (``copy: ...`` / ``cut-over: ...``) into :attr:`steps`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - started

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
                with self.held.holding():
                    self._move_all()
            finally:
                guard.execute(text("SELECT pg_advisory_unlock(:a, :b)"), lock)
                guard.commit()

    def _move_all(self) -> None:
        """Clean up after a killed run, then every batch, then the carried tables (:mod:`.saga_log`)."""
        self._find_carried_tables()
        self.clean_targets()
        self.control.checkpoint()
        while self.batch():
            if self.options.sleep:
                time.sleep(self.options.sleep)
            self.control.checkpoint()
        drain_fenced(self)

    def _find_carried_tables(self) -> None:
        """The library's tables (saga log, receipts) this source holds; each target must have them."""
        companions, fenced = key_companions(), fenced_tables()
        with self.held.connect(self.source) as conn:
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
        target: writers keep writing them on the source until the cut-over. A mover commits copies
        only with their keys listed in the target's journal, so a target whose journal lists none
        from this source holds none, and its keys are not scanned (a scan reads every key the
        target has above the watermark: on a remove, most of a shard).
        """
        with self.held.connect(self.source) as conn, conn.begin():
            row = read_shard_state(conn, self.source)
        if row is None or row.state.version != self.state.version or row.drained:
            return 0
        removed = 0
        for target in self.targets:
            with self.held.connect(target) as tconn, tconn.begin():
                if not tconn.exec_driver_sql(_JOURNALED, (self.state.version, self.source)).scalar():
                    continue
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

    def _journal(self, tconn: Connection, keys: list[Any], *, forget: bool = False) -> tuple[int, str] | None:
        """List ``keys`` in the target's :data:`~sa_shardkit.ring_state.MOVED_KEYS_TABLE` (in its
        open transaction, with the copies): until the source's watermark passes them, scatters hide
        their rows here. ``forget``: first drop this source's earlier entries (all cut over), and
        read the target tables' user triggers and rules and column types in the same round trip
        (see :meth:`_stores_what_is_sent`), where the rest of the transaction also skips the
        foreign-key triggers when only same-key ones are there (:mod:`.trusted_rows`)."""
        if not keys:
            return None
        sql = _JOURNAL_AFTER_FORGET if forget else _JOURNAL
        args = (self.state.version, self.source) if forget else ()
        journal = (
            sql.format(key_type=self.tables.key_sql_type),
            (*args, self.state.version, self.source, keys),
        )
        if not forget:
            tconn.exec_driver_sql(*journal)
            return None
        assert self._source_fks is not None
        trust = (TRUST_TARGET, trust_params(self._regclasses, self._key_names, self._source_fks))
        _, shape, trusted = _pipeline(tconn, [journal, (_SHAPE, (self._regclasses,)), trust])
        self.trusted_batches += trusted.rowcount == 1
        found = shape.fetchone()
        return int(found[0]), str(found[1])

    def _next_batch(self, conn: Connection, watermark: str | None) -> tuple[list[Any], str | None, bool]:
        """The next ``batch_keys`` moving keys above ``watermark``, the batch's last key (the
        range ``(watermark, last]`` may hold keys that stay; at the end it covers every key), and
        whether no key was found above ``last`` (the source's range ran out)."""
        moving: list[Any] = []
        after = watermark
        chunk = max(256, self.batch_keys * 8)
        while True:
            keys = next_keys(conn, self.tables, after, chunk)
            for i, key in enumerate(keys):
                if self._moves(key) is not None:
                    moving.append(key)
                    if len(moving) == self.batch_keys:
                        return moving, str(key), i == len(keys) - 1 and len(keys) < chunk
            if len(keys) < chunk:
                return moving, str(keys[-1]) if keys else after, True
            after = str(keys[-1])

    def batch(self) -> bool:
        """Move the next key batch; False when the source is drained.

        Phase 1 copies the batch without the fence into open target transactions; phase 2 takes
        the fence, re-copies only the keys whose rows changed meanwhile, commits the targets,
        deletes and advances the watermark. Writers of moving keys wait only for phase 2.
        """
        started = time.perf_counter()
        self.steps = {}
        with ExitStack() as targets:
            with self.held.connect(self.source) as conn, conn.begin():
                with self._step("copy: snapshot + key scan"):
                    row = self._snapshot_state(conn)
                    if row.drained:
                        return False
                    watermark = row.watermark
                    keys, last, exhausted = self._next_batch(conn, watermark)
                by_target = self._by_target(keys)
                open_targets = {t: targets.enter_context(self._target(t)) for t in sorted(by_target)}
                snapshot = self._copy(conn, open_targets, by_target)
                with self._step("copy: commit targets"):
                    for tconn in open_targets.values():  # outside the fence; no reader sees the copies
                        tconn.commit()
            if not keys:
                if last != watermark:
                    return self._skip_to(watermark, last)
                return self._finish_drain(watermark)
            assert last is not None
            copy_seconds = time.perf_counter() - started
            return self._cut_over(watermark, last, exhausted, open_targets, snapshot, copy_seconds, targets)

    def _snapshot_state(self, conn: Connection) -> ShardState:
        """Phase 1's ``REPEATABLE READ`` snapshot and the source's state row, one round trip."""
        settings = _SETTING_STATEMENTS if self.text_format else []
        statements = [
            ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", None),
            *((s, None) for s in settings),
        ]
        results = _pipeline(conn, [*statements, (f"SELECT {_STATE_COLUMNS} FROM {STATE_TABLE}", None)])
        return self._checked(results[-1].fetchone())

    def _checked(self, raw: Any) -> ShardState:
        return self._expected(None if raw is None else row_to_state(self.source, raw))

    def _expected(self, row: ShardState | None) -> ShardState:
        """``row`` if it is at the mover's ring version, else the fleet changed under the mover."""
        if row is None or row.state.version != self.state.version:
            found = "no state" if row is None else f"version {row.state.version}"
            raise RebalanceError(
                f"shard {self.source!r} has {found}, expected ring version {self.state.version}: "
                "the fleet state changed under the mover"
            )
        return row

    @contextmanager
    def _target(self, target: str) -> Iterator[Connection]:
        """A target connection in an open transaction (rolled back unless the cut-over commits)."""
        with self.held.connect(target) as tconn:
            tconn.begin()
            if self.text_format:
                tconn.execute(_CANONICAL)
            yield tconn

    def _copy(
        self, source: Connection, targets: dict[str, Connection], by_target: dict[str, list[Any]]
    ) -> Checksums:
        """Phase 1: stream the keys' rows into each open target transaction and verify them there.

        Returns the source's per-key checksums and fingerprints of the snapshot that was copied.
        """
        keys = [k for ks in by_target.values() for k in ks]
        if by_target and self._source_shape is None:
            self._read_source_facts(source)
        for target, target_keys in by_target.items():
            with self._step("copy: journal"):
                shape = self._journal(targets[target], target_keys, forget=True)
            verify = not self._stores_what_is_sent(source, shape)
            with self._step("copy: COPY stream"):
                sent = self._replace(source, targets[target], target_keys, fresh=True, digest=verify)
            if verify:
                with self._step("copy: verify"):
                    self._verify(target, targets[target], target_keys, sent)
        with self._step("copy: fingerprints"):
            return key_checksums(source, self.names, keys)

    def _stores_what_is_sent(self, source: Connection, target_shape: tuple[int, str] | None) -> bool:
        """Whether the target's tables store exactly the bytes a binary COPY sends them, so the
        read-back can be skipped: binary COPY of every column, no user trigger or rule on the
        target's tables (checked in this batch's transaction), and the same column types
        (``format_type``, typmods included) as on the source. Otherwise :meth:`_verify` reads the
        rows back and compares digests (a trigger that alters rows fails the batch there)."""
        if self.text_format or target_shape is None or target_shape[0] != 0:
            return False
        if self._source_shape is None:
            self._read_source_facts(source)
        return target_shape[1] == self._source_shape

    def _read_source_facts(self, source: Connection) -> None:
        """The source tables' column types and foreign keys (one round trip, once per run)."""
        shape, fks = _pipeline(
            source,
            [
                (_SHAPE, (self._regclasses,)),
                (SOURCE_FOREIGN_KEYS, trust_params(self._regclasses, self._key_names)),
            ],
        )
        self._source_shape = str(shape.fetchone()[1])
        self._source_fks = str(fks.fetchone()[0])

    def _replace(
        self,
        source: Connection,
        tconn: Connection,
        keys: list[Any],
        *,
        fresh: bool = False,
        digest: bool = True,
    ) -> list[Digest]:
        """Make the target's rows of ``keys`` a copy of the source's (in the target's open
        transaction); returns each table's digest of what was sent (``digest=False``: no digest,
        no primary-key order: nothing will read them back). ``fresh``: the target holds no row of
        them (clean_targets ran; writers write them on the source), so a row there would fail the
        COPY on its primary key, loudly."""
        if not keys:
            return []
        if not fresh:
            _pipelined(tconn, [f"DELETE FROM {n.live} WHERE {n.key_in}" for n in reversed(self.names)], keys)
        return [names.copy(source, tconn, keys, digest=digest) for names in self.names]

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
        return self._expected(row)

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
        with self.held.connect(self.source) as conn, conn.begin():
            row = self._fence(conn)
            if row.watermark != watermark:
                raise RebalanceError(f"the watermark of {self.source!r} moved under the mover")
            if any(self._moves(k) for k in keys_between(conn, self.tables, watermark, str(last))):
                return True  # a moving key arrived meanwhile: the next batch takes it
            conn.execute(text(f"UPDATE {STATE_TABLE} SET watermark = :wm, updated_at = now()"), {"wm": last})
        return True

    def _finish_drain(self, watermark: str | None) -> bool:
        """No moving key above the watermark: mark the source drained, unless one arrived meanwhile."""
        with self.held.connect(self.source) as conn, conn.begin():
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
        exhausted: bool,
        targets: dict[str, Connection],
        snapshot: Checksums,
        copy_seconds: float,
        stack: ExitStack,
    ) -> bool:
        with self.held.connect(self.source) as conn, conn.begin():
            fenced_at = time.perf_counter()
            known = list(dict.fromkeys(k for _, k in snapshot))
            with self._step("cut-over: fence + fingerprints"):
                row, (now, arrived) = self._fence_and_fingerprints(conn, watermark, last, known)
            if row.watermark != watermark:
                raise RebalanceError(f"the watermark of {self.source!r} moved under the mover")
            arrived = [k for k in arrived if self._moves(k) is not None]  # new keys in the range
            keys = [*(k for k in known if any((i, k) in now for i in range(len(self.names)))), *arrived]
            stale = set(_differing(snapshot, now, known)) | set(arrived)
            final = {tk: v for tk, v in now.items() if tk[1] not in stale}
            recopy_started = time.perf_counter()
            for target in sorted(set(targets) | {self.new.get_shard(k) for k in arrived}):
                redo = [k for k in [*known, *arrived] if k in stale and self.new.get_shard(k) == target]
                if not redo:
                    continue
                if target not in targets:  # a key arrived for a target phase 1 did not copy to
                    targets[target] = stack.enter_context(self._target(target))
                elif not targets[target].in_transaction():  # phase 1 committed there: a new one
                    targets[target].begin()  # (explicit: the copies go through the driver connection)
                    if self.text_format:
                        targets[target].execute(_CANONICAL)
                self._journal(targets[target], [k for k in arrived if self.new.get_shard(k) == target])
                if redo:  # under the fence: these keys' rows cannot change meanwhile
                    self._verify(target, targets[target], redo, self._replace(conn, targets[target], redo))
                    final.update(key_checksums(conn, self.names, redo))
            move_companions(self, conn, targets, keys)  # saga receipts travel with their keys
            for tconn in targets.values():
                tconn.commit()  # the re-copies (nothing to commit where there were none)
            self.steps["cut-over: re-copy changed keys"] = time.perf_counter() - recopy_started
            rows_by_table: dict[str, int] = {}
            for (index, _), (n, _) in final.items():
                name = self.tables.sharded[index].name
                rows_by_table[name] = rows_by_table.get(name, 0) + n
            rows = sum(rows_by_table.values())
            counts = {
                "wm": last,
                "rows": rows,
                "keys": len(keys),
                "version": self.state.version,
                "last": exhausted,
            }
            deletes = [(f"DELETE FROM {n.live} WHERE {n.key_in}", (keys,)) for n in reversed(self.names)]
            # whole keys go: same-key foreign-key triggers are skipped when nothing else would be
            trust = [
                (TRUST_SOURCE, trust_params(self._regclasses, self._key_names)),
                *deletes,
                (DISTRUST, None),
            ]
            # the deletes and the watermark in one round trip; the commit only after the counts match
            with self._step("cut-over: delete + watermark"):
                done = _pipeline(conn, [*(trust if keys else []), (self._advance, counts)])
            for spec, cursor in zip(reversed(self.tables.sharded), done[1:-2], strict=False):
                if int(cursor.rowcount) != rows_by_table.get(spec.name, 0):
                    raise RebalanceError(
                        f"{spec.name} on {self.source!r}: deleting {cursor.rowcount} rows but copied "
                        f"{rows_by_table.get(spec.name, 0)}; rolled back"
                    )
            deleted_at = time.perf_counter()
        self.steps["cut-over: commit"] = time.perf_counter() - deleted_at
        fence_seconds = time.perf_counter() - fenced_at
        self._adapt(fence_seconds, len(keys))
        report = BatchReport(
            self.source, len(keys), len(keys), rows, rows_by_table, fence_seconds, copy_seconds, self.steps
        )
        self.tracker.batch(report)
        return True  # drained or not: the next batch's state read says (no fenced check then)

    def _fence_and_fingerprints(
        self, conn: Connection, watermark: str | None, last: str, known: list[Any]
    ) -> tuple[ShardState, tuple[Checksums, list[Any]]]:
        """Take the fence (see :meth:`_fence`) and read the batch range's fingerprints under it,
        in one round trip (the server runs them in order: the query waits for the lock)."""
        timeout = f"SET LOCAL lock_timeout = '{int(self.options.lock_timeout * 1000)}ms'"
        settings = _SETTING_STATEMENTS if self.text_format else []
        sql, params = range_fingerprints_query(self.tables, self.names, watermark, last, known)
        results = _pipeline(
            conn,
            [
                (timeout, None),
                *((s, None) for s in settings),
                (f"SELECT {_STATE_COLUMNS} FROM {STATE_TABLE} FOR NO KEY UPDATE", None),
                (sql, params),
            ],
        )
        row = self._checked(results[-2].fetchone())
        return row, parse_fingerprints(results[-1].fetchall())

    def _adapt(self, fence_seconds: float, keys: int) -> None:
        """Size the next batch so that its cut-over takes about ``options.fence_seconds``.

        A cut-over costs a fixed part (round trips, commits: more on a loaded machine) plus a part
        per key (fingerprints, deletes). Both are fitted to the last batches (:func:`cut_over_model`);
        the next batch gets the keys whose part fits in what the fixed part leaves of the target,
        and never less than half the target: when the fixed part alone fills it, smaller batches
        would not shorten the cut-over, only multiply them. At most 4x the last batch's size.
        """
        if keys <= 0:
            return
        self._samples = [*self._samples[-5:], (keys, fence_seconds)]
        target = self.options.fence_seconds
        model = cut_over_model(self._samples)
        if model is None:  # one batch size seen: grow while fast, and probe 2x once it is not
            if fence_seconds > 1.5 * target:
                wanted = int(self.batch_keys * target / fence_seconds)
            else:
                wanted = self.batch_keys * (4 if fence_seconds < target / 4 else 2)
        else:
            fixed, per_key = model
            budget = max(target - fixed, target / 2)
            wanted = int(budget / per_key) if per_key > 0 else self.batch_keys * 4
        if keys < self.batch_keys:  # the range ran out before the batch filled: no news on larger ones
            wanted = min(wanted, self.batch_keys)
        wanted = min(wanted, self.batch_keys * 4)
        self.batch_keys = min(self.options.batch_size, max(MIN_BATCH, wanted))


def cut_over_model(samples: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """``(fixed seconds, seconds per key)`` of a cut-over, least squares over ``(keys, seconds)``
    samples; None until two batch sizes were seen. Both are kept >= 0: a fit whose slope is not
    positive counts the time as fixed, one whose intercept is negative as per key."""
    n = len(samples)
    if n < 2:
        return None
    mean_k = sum(k for k, _ in samples) / n
    mean_t = sum(t for _, t in samples) / n
    spread = sum((k - mean_k) ** 2 for k, _ in samples)
    if spread == 0:
        return None
    slope = sum((k - mean_k) * (t - mean_t) for k, t in samples) / spread
    if slope <= 0:
        return mean_t, 0.0
    fixed = mean_t - slope * mean_k
    if fixed < 0:
        return 0.0, mean_t / mean_k
    return fixed, slope


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


def _pipeline(conn: Connection, statements: list[tuple[str, Any]]) -> list[Any]:
    """Run ``(sql, params)`` statements (psycopg ``%s`` / ``%(name)s`` parameters) in one round
    trip (pipeline mode), in order, in the connection's transaction; returns their cursors (rows
    are named tuples), read after the round trip. A failing statement raises (the rest is skipped)."""
    raw = conn.connection.driver_connection
    assert raw is not None
    cursors = [raw.cursor(row_factory=namedtuple_row) for _ in statements]
    with raw.pipeline():
        for cursor, (sql, params) in zip(cursors, statements, strict=True):
            cursor.execute(sql, params)
    return cursors


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
    sql, params = range_fingerprints_query(tables, names, after, upto, known)
    return parse_fingerprints(conn.exec_driver_sql(sql, params))


def range_fingerprints_query(
    tables: TableSet,
    names: Sequence[TableNames],
    after: str | None,
    upto: str,
    known: Sequence[Any],
) -> tuple[str, tuple[Any, ...]]:
    """The SQL (psycopg ``%s`` parameters) of :func:`range_fingerprints`."""
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
    return " UNION ALL ".join(parts), tuple(params)


def parse_fingerprints(rows: Iterable[Any]) -> tuple[Checksums, list[Any]]:
    """:func:`range_fingerprints` from the rows of :func:`range_fingerprints_query`."""
    found: Checksums = {}
    arrived: dict[Any, None] = {}
    for t, k, c, v in rows:
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

    def _out(self, *, ordered: bool = True) -> str:
        order = f" ORDER BY {self.order}" if ordered else ""
        return (
            f"COPY (SELECT {self.columns} FROM {self.live} WHERE {self.key_in}{order})"
            f" TO STDOUT (FORMAT {self.format})"
        )

    def copy(self, source: Connection, target: Connection, keys: list[Any], *, digest: bool = True) -> Digest:
        """Stream the keys' rows from the source table into the target's with COPY (no Python row
        is built); returns the digest of the bytes sent (``digest=False``: rows in no particular
        order and no digest, ``""``)."""
        src = source.connection.driver_connection.cursor()  # type: ignore[union-attr]
        dst = target.connection.driver_connection.cursor()  # type: ignore[union-attr]
        hasher = xxh3_128()
        with (
            src.copy(self._out(ordered=digest), (keys,)) as out,
            dst.copy(f"COPY {self.live} ({self.columns}) FROM STDIN (FORMAT {self.format})") as into,
        ):
            pending: list[Any] = []
            size = 0
            for block in out:  # one row per block: gathered, so the target gets few large writes
                pending.append(block)
                size += len(block)
                if size >= COPY_CHUNK:
                    _send(into, hasher if digest else None, pending)
                    size = 0
            _send(into, hasher if digest else None, pending)
        return int(src.rowcount), hasher.hexdigest() if digest else ""

    def digest(self, conn: Connection, keys: list[Any]) -> Digest:
        """The digest of this shard's rows of ``keys`` (as :meth:`copy` computes it)."""
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        hasher = xxh3_128()
        with cursor.copy(self._out(), (keys,)) as out:
            for block in out:
                hasher.update(block)
        return int(cursor.rowcount), hasher.hexdigest()


def _send(into: Any, hasher: Any, blocks: list[Any]) -> None:
    """Write the gathered COPY ``blocks`` as one (hashed too, unless ``hasher`` is None); empties the list."""
    if not blocks:
        return
    data = b"".join(blocks)
    blocks.clear()
    if hasher is not None:
        hasher.update(data)
    into.write(data)


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
