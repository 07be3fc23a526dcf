"""Recovery: finish or compensate sagas whose runner died, from any number of processes at once.

A worker claims one saga at a time on each shard: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks an open
saga whose lease ran out, and the same transaction makes the worker its owner with a fresh lease. So
two workers never claim the same saga, and no worker claims a saga whose runner is alive (a live
runner's heartbeat keeps its lease from running out).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from ..errors import SagaError, SagaPendingError, StaleRingError
from ..manager import ShardManager, require_shards
from . import log as saga_log
from .definition import Saga, SagaOptions
from .inspect import RUNNING, SagaInfo, list_sagas
from .runner import SagaDriver, describe, fence_home, is_transient, new_owner

logger = logging.getLogger("sa_shardkit.saga")


@dataclass
class RecoveryReport:
    """What one recovery pass did, saga ids by result."""

    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    """Compensated: now final with a ``failed_*`` status."""
    pending: list[str] = field(default_factory=list)
    """Still unfinished (a shard they need is unreachable); a later pass retries them."""
    unknown_type: list[str] = field(default_factory=list)
    """Expired sagas of a type this worker was not given: left untouched."""
    unreachable: dict[str, str] = field(default_factory=dict)
    """Shards whose saga log could not be scanned, with the reason."""
    live: list[SagaInfo] = field(default_factory=list)
    """Open sagas left alone because their lease is live (a process is running them, or has just
    died and its lease has not run out yet), as seen after the pass."""
    overdue: list[SagaInfo] = field(default_factory=list)
    """Open sagas (live or not) older than the pass's ``max_age``: worth an operator's look."""

    @property
    def finished(self) -> int:
        return len(self.completed) + len(self.failed)

    def __str__(self) -> str:
        parts = [
            f"{len(self.completed)} completed",
            f"{len(self.failed)} compensated",
            f"{len(self.pending)} still pending",
        ]
        if self.live:
            parts.append(f"{len(self.live)} open under a live lease")
        if self.overdue:
            oldest = max(s.age_seconds for s in self.overdue)
            parts.append(f"{len(self.overdue)} open longer than allowed (oldest {oldest:.0f} s)")
        if self.unknown_type:
            parts.append(f"{len(self.unknown_type)} of unknown type (pass their Saga)")
        if self.unreachable:
            parts.append("unreachable: " + ", ".join(sorted(self.unreachable)))
        return "recovery: " + ", ".join(parts)


def recover(
    manager: ShardManager,
    sagas: Iterable[Saga],
    *,
    options: SagaOptions | None = None,
    shard_ids: Iterable[str] | None = None,
    limit: int | None = None,
    max_age: float = 600.0,
) -> RecoveryReport:
    """One pass: drive every saga whose lease ran out to a final state (retry forward or compensate).

    ``sagas`` are the definitions this worker can run, matched by name; sagas of other types are
    reported in :attr:`RecoveryReport.unknown_type` and never claimed. ``limit`` caps the sagas
    claimed per shard in this pass. Safe to run from many processes at once. After the pass, open
    sagas under a live lease are listed in :attr:`RecoveryReport.live`, and open sagas older than
    ``max_age`` seconds in :attr:`RecoveryReport.overdue`.
    """
    options = options or SagaOptions()
    by_type = {saga.name: saga for saga in sagas}
    if not by_type:
        raise SagaError("recover() needs the Saga definitions it may run (none given)")
    types = sorted(by_type)
    owner = new_owner("recovery")
    report = RecoveryReport()
    shard_list = require_shards(manager, shard_ids if shard_ids is not None else manager.shard_ids)
    for shard_id in shard_list:
        seen: list[str] = []
        while limit is None or len(seen) < limit:
            try:
                with manager.connect(shard_id) as conn, conn.begin():
                    record = saga_log.claim_next(conn, owner, options.lease_seconds, types, seen)
                    if record is not None and not _lives_here(manager, conn, shard_id, record.saga_id):
                        conn.rollback()  # a copy a killed mover left on its target: not the saga's row
                        seen.append(record.saga_id)
                        continue
            except Exception as error:
                if not is_transient(error):
                    raise
                report.unreachable[shard_id] = describe(error)
                break
            if record is None:
                break
            seen.append(record.saga_id)
            saga = by_type[record.saga_type]
            # Another worker taking the saga over from us is not worth waiting for: move on.
            driver = SagaDriver(manager, saga, record, shard_id, owner, options, origin=False, wait_seconds=0)
            try:
                outcome = driver.run()
            except SagaPendingError as pending:
                logger.warning("%s", pending)
                report.pending.append(record.saga_id)
                continue
            (report.completed if outcome.succeeded else report.failed).append(record.saga_id)
        if shard_id not in report.unreachable:
            try:
                with manager.connect(shard_id) as conn:
                    report.unknown_type += saga_log.unknown_type_ids(conn, types)
            except Exception as error:
                if not is_transient(error):
                    raise
                report.unreachable[shard_id] = describe(error)
    reachable = [s for s in shard_list if s not in report.unreachable]
    if reachable:
        still_open = list_sagas(manager, shard_ids=reachable).sagas
        report.live = [s for s in still_open if s.state == RUNNING]
        report.overdue = [s for s in still_open if s.age_seconds > max_age]
    return report


def _lives_here(manager: ShardManager, conn: Connection, shard_id: str, saga_id: str) -> bool:
    """Whether ``shard_id`` holds saga ``saga_id``'s log row now (with the rebalance fence held)."""
    try:
        fence_home(manager, conn, shard_id, saga_id)
    except StaleRingError:
        return False
    return True


def recovery_worker(
    manager: ShardManager,
    sagas: Iterable[Saga],
    *,
    interval: float = 10.0,
    options: SagaOptions | None = None,
    stop: threading.Event | None = None,
    on_report: Callable[[RecoveryReport], None] | None = None,
) -> None:
    """Run :func:`recover` every ``interval`` seconds until ``stop`` is set (a long-running worker)."""
    definitions = list(sagas)
    stop = stop or threading.Event()
    while not stop.is_set():
        report = recover(manager, definitions, options=options)
        if on_report is not None:
            on_report(report)
        stop.wait(interval)
