"""What operators need to see and prune: open sagas (with their leases), and purging old finished ones.

Ages and lease expiry are computed by each shard's own clock, like the leases themselves, so a
client whose clock is off cannot misreport a live saga as stuck.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text

from ..errors import SagaInputError, StaleRingError
from ..manager import ShardManager, require_shards
from ..placement import MAX_REROUTES
from ..ring_state import STATE_TABLE, RingState, value_text
from .runner import SAGA_LOG, describe, is_transient

RUNNING = "running"
"""Open, under a live lease: a process is driving it (or is alive but slow)."""
STUCK = "stuck"
"""Open, lease expired: its runner died or gave up; recovery (or a retry of the id) takes it over."""
FINISHED = "finished"


@dataclass(frozen=True)
class SagaInfo:
    """One saga log row as an operator sees it."""

    saga_id: str
    saga_type: str
    state: str
    """``running``, ``stuck`` or ``finished``."""
    status: str
    home_shard: str
    shards: list[str]
    """The shards its steps run on (as routed when it started)."""
    owner: str | None
    lease_until: datetime | None
    lease_seconds_left: float | None
    """Negative: expired that long ago; None for a finished saga."""
    age_seconds: float
    attempts: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("lease_until", "created_at", "finished_at"):
            value = data[name]
            data[name] = value.isoformat() if value is not None else None
        return data


@dataclass
class SagaListing:
    """Sagas found on every reachable shard, oldest first, and the shards that could not be read."""

    sagas: list[SagaInfo] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)

    def older_than(self, seconds: float) -> list[SagaInfo]:
        return [s for s in self.sagas if s.age_seconds > seconds]


_LIST = """
    SELECT saga_id, saga_type, status, shards, owner, lease_until, attempts, error, created_at, finished_at,
           EXTRACT(EPOCH FROM clock_timestamp() - created_at) AS age,
           EXTRACT(EPOCH FROM lease_until - clock_timestamp()) AS lease_left
    FROM shardkit_sagas
    WHERE {where}
    ORDER BY created_at
    LIMIT :limit
"""


def list_sagas(
    manager: ShardManager,
    *,
    include_finished: bool = False,
    older_than: float = 0.0,
    shard_ids: Iterable[str] | None = None,
    limit: int = 1000,
) -> SagaListing:
    """Open sagas (``include_finished``: all) older than ``older_than`` seconds, from every shard's
    log, oldest first (at most ``limit`` per shard). Unreachable shards are listed, not raised.

    Each saga is listed once, also while a rebalance carries log rows to their id's new shard (a
    cut-over commits the copies on the target before the source deletes its rows, and a killed
    mover leaves copies there until it resumes): while a move is in flight the listing holds every
    source's fence (no cut-over commits meanwhile) and hides a target's copy of a row its source
    has not cut over by its progress (``carried``); the source's own row is the saga's.
    """
    where = "created_at < clock_timestamp() - make_interval(secs => :age)"
    if not include_finished:
        where += " AND finished_at IS NULL"
    wanted = list(require_shards(manager, shard_ids if shard_ids is not None else manager.shard_ids))
    params = {"age": older_than, "limit": limit}
    placement = manager.placement
    try:
        placement.refresh(log_failures=False)
    except Exception as error:  # noqa: BLE001 - routing falls back to the ring known; reads report it
        if not is_transient(error):
            raise
    for _ in range(MAX_REROUTES):
        state = placement.state
        marks = None
        try:
            if state.target is not None:
                marks = placement.source_marks(hold=True)
                if marks is not None and marks.version < 0:
                    continue  # a source stores a newer state (adopted): route again
            return _list(manager, wanted, where, params, state if marks is not None else None)
        except Exception as error:
            if not is_transient(error) or marks is not None:
                raise
            # a source could not be fenced: its copies elsewhere are hidden, its log reported unread
            return _list(manager, wanted, where, params, state, unfenced=describe(error))
        finally:
            placement.release_marks(marks)
    raise StaleRingError("the ring kept changing while listing sagas; retry")


_CARRIED = text(f"SELECT to_jsonb(st) -> 'carried' -> CAST(:t AS text) FROM {STATE_TABLE} AS st")


def _list(
    manager: ShardManager,
    shard_ids: list[str],
    where: str,
    params: dict[str, Any],
    moving: RingState | None,
    *,
    unfenced: str | None = None,
) -> SagaListing:
    """Read each shard's log rows; with ``moving`` (a move in flight, its sources' fences held
    unless ``unfenced`` says why not) keep only the rows each saga's current shard holds."""
    listing = SagaListing()
    carried: dict[str, Any] = {}
    found: list[tuple[str, Any]] = []
    sources = set(moving.sources) if moving is not None else set()
    for shard_id in shard_ids:
        try:
            with manager.connect(shard_id) as conn:
                rows = conn.execute(text(_LIST.format(where=where)), params)
                found += [(shard_id, row) for row in rows.mappings()]
                if shard_id in sources:
                    carried[shard_id] = conn.execute(_CARRIED, {"t": SAGA_LOG}).scalar() or {}
        except Exception as error:
            if not is_transient(error):
                raise
            listing.unreachable[shard_id] = describe(error)
    if unfenced is not None:
        for source in sorted(sources - set(carried)):
            listing.unreachable.setdefault(source, unfenced)
    for shard_id, row in found:
        if moving is None or _holds(moving, carried, shard_id, row["saga_id"]):
            listing.sagas.append(_info(shard_id, row))
    listing.sagas.sort(key=lambda s: s.created_at)
    return listing


def _holds(state: RingState, carried: dict[str, Any], shard_id: str, saga_id: str) -> bool:
    """Whether ``shard_id`` is where saga ``saga_id``'s log row lives now: not a target's copy of a
    row its source has not cut over (its progress unknown counts as not cut over)."""
    move = state.move_of(saga_id)
    if move is None or shard_id != move[1]:
        return True
    progress = carried.get(move[0])
    if progress is None:
        return False
    watermark = progress.get("watermark")
    # the mover walks ids in the "C" collation: byte order, which is UTF-8 code point order
    return bool(progress.get("drained")) or (watermark is not None and watermark >= value_text(saga_id))


def _info(shard_id: str, row: Any) -> SagaInfo:
    if row["finished_at"] is not None:
        state, left = FINISHED, None
    else:
        left = float(row["lease_left"]) if row["lease_left"] is not None else None
        state = RUNNING if left is not None and left > 0 else STUCK
    return SagaInfo(
        saga_id=row["saga_id"],
        saga_type=row["saga_type"],
        state=state,
        status=row["status"],
        home_shard=shard_id,
        shards=list(row["shards"] or []),
        owner=row["owner"],
        lease_until=row["lease_until"] if row["finished_at"] is None else None,
        lease_seconds_left=left,
        age_seconds=float(row["age"]),
        attempts=row["attempts"],
        error=row["error"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


@dataclass
class PurgeReport:
    """Rows deleted per shard by :func:`purge_sagas`."""

    sagas: dict[str, int] = field(default_factory=dict)
    receipts: dict[str, int] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text_ = (
            f"purged {sum(self.sagas.values())} finished saga log rows and "
            f"{sum(self.receipts.values())} receipts"
        )
        return text_ + (f"; unreachable: {', '.join(sorted(self.unreachable))}" if self.unreachable else "")


_OLD_FINISHED = "finished_at IS NOT NULL AND finished_at < clock_timestamp() - make_interval(secs => :age)"
_OLD_RECEIPT = "created_at < clock_timestamp() - make_interval(secs => :age) AND saga_id <> ALL(CAST(:keep AS varchar[]))"
_PURGES = {
    "sagas": (
        text(
            "DELETE FROM shardkit_sagas WHERE saga_id IN (SELECT saga_id FROM shardkit_sagas"
            f" WHERE {_OLD_FINISHED} LIMIT :batch FOR UPDATE SKIP LOCKED)"
        ),
        text(f"SELECT count(*) FROM shardkit_sagas WHERE {_OLD_FINISHED}"),
    ),
    "receipts": (
        text(
            "DELETE FROM shardkit_saga_receipts WHERE ctid IN (SELECT ctid FROM shardkit_saga_receipts"
            f" WHERE {_OLD_RECEIPT} LIMIT :batch FOR UPDATE SKIP LOCKED)"
        ),
        text(f"SELECT count(*) FROM shardkit_saga_receipts WHERE {_OLD_RECEIPT}"),
    ),
}
_OPEN_OLD = text(
    "SELECT saga_id FROM shardkit_sagas WHERE finished_at IS NULL"
    " AND created_at < clock_timestamp() - make_interval(secs => :age)"
)

MIN_PURGE_AGE = 3600.0
"""Purging younger rows would shorten the idempotency window below any sane retry horizon."""


def purge_sagas(
    manager: ShardManager, older_than: float, *, batch_size: int = 1000, dry_run: bool = False
) -> PurgeReport:
    """Delete finished saga log rows, and receipts, older than ``older_than`` seconds, in batches of
    ``batch_size`` rows (one short transaction each: safe to run while sagas run).

    Open sagas are never touched, nor the receipts of an open saga however old (recovery needs
    them). The purged ids fall out of the idempotency window: reusing one starts a new saga.
    ``dry_run`` counts instead of deleting.
    """
    if older_than < MIN_PURGE_AGE:
        raise SagaInputError(
            f"refusing to purge sagas younger than {MIN_PURGE_AGE:g} s (got {older_than:g} s): "
            "their ids must stay idempotent for client retries"
        )
    if batch_size < 1:
        raise SagaInputError(f"batch size must be >= 1, got {batch_size}")
    report = PurgeReport()
    keep: list[str] = []
    for shard_id in manager.shard_ids:  # open sagas older than the cutoff: their receipts stay
        try:
            with manager.connect(shard_id) as conn:
                keep += list(conn.execute(_OPEN_OLD, {"age": older_than}).scalars())
        except Exception as error:
            if not is_transient(error):
                raise
            report.unreachable[shard_id] = describe(error)
    if report.unreachable:
        return report  # an unreadable log might hold an open saga whose receipts we would delete
    for shard_id in manager.shard_ids:
        params = {"age": older_than, "batch": batch_size, "keep": keep}
        try:
            for kind, (purge, count) in _PURGES.items():
                done = (
                    _count(manager, shard_id, count, params)
                    if dry_run
                    else _purge(manager, shard_id, purge, params)
                )
                getattr(report, kind)[shard_id] = done
        except Exception as error:
            if not is_transient(error):
                raise
            report.unreachable[shard_id] = describe(error)
    return report


def _purge(manager: ShardManager, shard_id: str, statement: Any, params: dict[str, Any]) -> int:
    """Delete in batches, one short transaction each, until a batch comes back short."""
    total = 0
    while True:
        with manager.connect(shard_id) as conn, conn.begin():
            deleted = conn.execute(statement, params).rowcount
        total += deleted
        if deleted < params["batch"]:
            return total


def _count(manager: ShardManager, shard_id: str, statement: Any, params: dict[str, Any]) -> int:
    with manager.connect(shard_id) as conn:
        return int(conn.execute(statement, params).scalar_one())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds (:class:`SagaInputError` otherwise)."""
    match = _DURATION.match(value)
    if match is None:
        raise SagaInputError(f"not a duration: {value!r} (examples: 90s, 15m, 12h, 30d)")
    return float(match.group(1)) * _UNITS[match.group(2)]
