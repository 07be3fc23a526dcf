"""Two-phase commit across shards: the opt-in alternative to a saga when you need atomicity.

Each participant's work runs in a transaction that is PREPAREd on its shard (durable, locks held);
then the decision to commit is recorded on the coordinator shard (the first participant id, sorted),
and only then is every prepared transaction committed. A crash in between leaves prepared
transactions *in doubt*: :func:`resolve_in_doubt` commits those whose decision is recorded and rolls
back the others once they are older than a grace period -- recording an ``abort`` decision first, so
a coordinator that was only slow can never commit afterwards (the first decision written wins).

Costs: every participant holds its locks until the commit, and an in-doubt transaction holds them
until it is resolved; PostgreSQL needs ``max_prepared_transactions`` > 0 on every shard.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Column, DateTime, String, Table, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, TwoPhaseTransaction
from sqlalchemy.exc import DBAPIError

from ..errors import SagaInputError, SagaPendingError, StaleRingError, TwoPhaseAbortedError
from ..manager import ShardManager, require_shards
from ..placement import MAX_REROUTES
from ..ring import ShardKey
from .definition import CheckpointHook
from .runner import describe, is_transient
from .tables import saga_metadata

GID_PREFIX = "shardkit2pc"
COMMIT = "commit"
ABORT = "abort"

decisions_table = Table(
    "shardkit_2pc_decisions",
    saga_metadata,
    Column("txid", String(64), primary_key=True),
    Column("outcome", String(8), nullable=False),  # 'commit' | 'abort'
    Column("decided_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    comment="sa_shardkit two-phase commit decisions, on the coordinator shard",
)


def _gid(txid: str, coordinator: str, participant: str) -> str:
    return f"{GID_PREFIX}|{txid}|{coordinator}|{participant}"


def _parse_gid(gid: str) -> tuple[str, str] | None:
    parts = gid.split("|")
    if len(parts) != 4 or parts[0] != GID_PREFIX:
        return None
    return parts[1], parts[2]


def _decide(conn: Connection, txid: str, outcome: str) -> str:
    """Record ``outcome`` unless a decision exists; returns the decision that stands."""
    inserted = conn.execute(
        insert(decisions_table)
        .values(txid=txid, outcome=outcome)
        .on_conflict_do_nothing()
        .returning(decisions_table.c.outcome)
    ).scalar()
    if inserted is not None:
        return str(inserted)
    return str(
        conn.execute(select(decisions_table.c.outcome).where(decisions_table.c.txid == txid)).scalar_one()
    )


def commit_across_keys(
    manager: ShardManager,
    work: Mapping[ShardKey, Callable[[Connection], None]],
    *,
    txid: str | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> str:
    """Two-phase commit routed by shard key: ``work[key](conn)`` runs on the shard ``key`` lives on
    now, with the rebalance fence held for ``key`` there (like a session flush), and everything
    commits or nothing does; returns the txid. Keys on one shard share its participant transaction.

    A key that moved is routed again before any work runs; a key on a shard this configuration
    lacks raises :class:`~sa_shardkit.UnknownShardError`. The fence is held until the prepared
    transactions commit (a cut-over of a participant's key waits for it, an in-doubt one until
    :func:`resolve_in_doubt` ends it). Otherwise as :func:`commit_across_shards`.
    """
    for _ in range(MAX_REROUTES):
        by_shard: dict[str, list[ShardKey]] = {}
        for key in work:
            by_shard.setdefault(manager.placement.shard_for(key), []).append(key)

        def participant(keys: list[ShardKey]) -> Callable[[Connection], None]:
            def run(conn: Connection) -> None:
                for key in keys:
                    work[key](conn)

            return run

        try:
            return commit_across_shards(
                manager,
                {shard: participant(keys) for shard, keys in by_shard.items()},
                txid=txid,
                on_checkpoint=on_checkpoint,
                keys=by_shard,
            )
        except _Moved:
            continue  # nothing ran: route the keys again
    raise StaleRingError(f"the ring kept changing while routing keys {list(work)!r}; retry")


class _Moved(StaleRingError):
    """A participant's key does not belong on its shard (any more); raised before any work ran."""


def commit_across_shards(
    manager: ShardManager,
    work: Mapping[str, Callable[[Connection], None]],
    *,
    txid: str | None = None,
    on_checkpoint: CheckpointHook | None = None,
    keys: Mapping[str, Iterable[ShardKey]] | None = None,
) -> str:
    """Run ``work[shard_id](conn)`` on every shard and commit all of it or none; returns the txid.

    Raises the participant's error (nothing committed anywhere) if any work or PREPARE fails,
    :class:`TwoPhaseAbortedError` if the resolver aborted it first, and :class:`SagaPendingError`
    when the commit is decided but a shard could not apply it yet (:func:`resolve_in_doubt` will).
    ``on_checkpoint(txid, "prepared" | "decided" | "committed")`` is for fault injection.

    ``keys``: shard id -> the shard keys its work writes. Each is fenced on its shard (in the
    participant's transaction, before any work runs); one that does not belong there raises
    :class:`StaleRingError` naming its shard, with nothing run. Without ``keys`` the work is not
    fenced: during a move it may write a key on its old shard (route by key with
    :func:`commit_across_keys` instead).
    """
    shard_ids = sorted(require_shards(manager, work))
    bad = [s for s in shard_ids if "|" in s]
    if bad:
        raise SagaInputError(f"two-phase commit needs shard ids without '|': {bad}")
    txid = txid or uuid.uuid4().hex
    coordinator = shard_ids[0]
    longest = max(len(_gid(txid, coordinator, s)) for s in shard_ids)
    if longest > 200 or "|" in txid:
        raise SagaInputError(f"two-phase transaction id {txid!r} with these shard ids is too long or has '|'")

    def checkpoint(name: str) -> None:
        if on_checkpoint is not None:
            on_checkpoint(txid, name)

    connections: list[Connection] = []
    prepared: list[tuple[str, TwoPhaseTransaction]] = []
    try:
        try:
            begun = []
            for shard_id in shard_ids:  # every participant's fence first, then any work
                conn = manager.connect(shard_id)
                connections.append(conn)
                transaction = conn.begin_twophase(_gid(txid, coordinator, shard_id))
                _fence(manager, conn, shard_id, (keys or {}).get(shard_id, ()))
                begun.append((shard_id, conn, transaction))
            for shard_id, conn, transaction in begun:
                work[shard_id](conn)
                transaction.prepare()
                prepared.append((shard_id, transaction))
        except BaseException:
            for _, transaction in prepared:  # ROLLBACK PREPARED; a failure here is left to the resolver
                try:
                    transaction.rollback()
                except Exception:  # noqa: BLE001 - resolve_in_doubt rolls it back later
                    pass
            raise
        checkpoint("prepared")
        try:
            with manager.connect(coordinator) as conn, conn.begin():
                decision = _decide(conn, txid, COMMIT)
        except Exception as error:
            if not is_transient(error):
                raise
            raise SagaPendingError(
                f"two-phase transaction {txid}: the commit decision on {coordinator!r} is in doubt "
                f"({describe(error)}); resolve_in_doubt will finish it",
                saga_id=txid,
                status="prepared",
            ) from error
        if decision == ABORT:
            for _, transaction in prepared:
                try:
                    transaction.rollback()
                except Exception:  # noqa: BLE001 - the resolver may have rolled it back already
                    pass
            raise TwoPhaseAbortedError(f"two-phase transaction {txid} was aborted by the in-doubt resolver")
        checkpoint("decided")
        unfinished = []
        for shard_id, transaction in prepared:
            try:
                transaction.commit()
            except Exception as error:  # noqa: BLE001 - decided: the resolver commits it later
                unfinished.append(f"{shard_id} ({describe(error)})")
        if unfinished:
            raise SagaPendingError(
                f"two-phase transaction {txid} is decided (commit) but not yet applied on "
                f"{', '.join(unfinished)}; resolve_in_doubt will commit it",
                saga_id=txid,
                status="decided",
            )
        checkpoint("committed")
        return txid
    finally:
        for conn in connections:
            conn.close()


def _fence(manager: ShardManager, conn: Connection, shard_id: str, keys: Iterable[ShardKey]) -> None:
    try:
        for key in keys:
            manager.placement.fence_write(conn, shard_id, key)
    except StaleRingError as stale:
        raise _Moved(str(stale), shard_id=stale.shard_id) from stale


@dataclass
class InDoubtReport:
    """What :func:`resolve_in_doubt` did, by global transaction id."""

    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    """Younger than the grace period with no decision yet: its coordinator may still be running."""
    unreachable: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text_ = (
            f"in-doubt 2PC: {len(self.committed)} committed, {len(self.rolled_back)} rolled back, "
            f"{len(self.waiting)} waiting"
        )
        return text_ + (f", unreachable: {', '.join(sorted(self.unreachable))}" if self.unreachable else "")


def resolve_in_doubt(manager: ShardManager, *, older_than: float = 60.0) -> InDoubtReport:
    """Finish prepared transactions left by crashed coordinators (safe to run from several processes).

    Recorded ``commit`` -> COMMIT PREPARED; recorded ``abort``, or no decision and prepared more than
    ``older_than`` seconds ago -> record ``abort`` (if still undecided), then ROLLBACK PREPARED.
    """
    report = InDoubtReport()
    for shard_id in manager.shard_ids:
        try:
            with manager.connect(shard_id) as conn:
                rows = conn.execute(
                    text(
                        "SELECT gid, prepared < clock_timestamp() - make_interval(secs => :age) AS old "
                        "FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE :prefix"
                    ),
                    {"age": older_than, "prefix": f"{GID_PREFIX}|%"},
                ).all()
        except Exception as error:
            if not is_transient(error):
                raise
            report.unreachable[shard_id] = describe(error)
            continue
        for gid, old in rows:
            parsed = _parse_gid(gid)
            if parsed is None:
                continue
            txid, coordinator = parsed
            try:
                with manager.connect(coordinator) as conn, conn.begin():
                    if old:
                        decision: str | None = _decide(conn, txid, ABORT)
                    else:
                        decision = conn.execute(
                            select(decisions_table.c.outcome).where(decisions_table.c.txid == txid)
                        ).scalar()
                if decision is None:
                    report.waiting.append(gid)
                    continue
                _finish(manager, shard_id, gid, decision)
            except Exception as error:
                if not is_transient(error):
                    raise
                report.unreachable[shard_id] = describe(error)
                continue
            (report.committed if decision == COMMIT else report.rolled_back).append(gid)
    return report


def _finish(manager: ShardManager, shard_id: str, gid: str, decision: str) -> None:
    verb = "COMMIT PREPARED" if decision == COMMIT else "ROLLBACK PREPARED"
    literal = gid.replace("'", "''")
    with manager.connect(shard_id) as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if not _is_prepared(conn, gid):
            return  # another resolver (or the coordinator itself) finished it
        try:
            conn.exec_driver_sql(f"{verb} '{literal}'")
        except DBAPIError:
            if _is_prepared(conn, gid):
                raise  # a real failure, not a lost race


def _is_prepared(conn: Connection, gid: str) -> bool:
    row = conn.execute(
        text("SELECT 1 FROM pg_prepared_xacts WHERE gid = :gid AND database = current_database()"),
        {"gid": gid},
    ).first()
    return row is not None
