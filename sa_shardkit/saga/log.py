"""Reads and writes of the saga log row; every write by a runner is fenced by its lease.

Times come from the shard's own clock (``clock_timestamp()``), so client clocks never decide whether
a lease has run out. A write that finds another owner (or a finished saga) raises :class:`LeaseLost`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.sql.expression import Update

from .definition import SagaOutcome
from .receipts import fused_statement
from .tables import sagas_table


class LeaseLost(Exception):
    """Another runner owns this saga now (or it is finished): stop driving it."""


@dataclass(frozen=True)
class SagaRecord:
    """One saga log row."""

    saga_id: str
    saga_type: str
    payload: dict[str, Any]
    status: str
    step: int
    compensating: bool
    failure: str | None
    error: str | None
    owner: str | None
    attempts: int
    created_at: datetime | None
    finished_at: datetime | None
    lease_until: datetime | None = None
    shards: list[str] | None = None

    @classmethod
    def from_row(cls, row: RowMapping) -> SagaRecord:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    def outcome(self, home_shard: str) -> SagaOutcome:
        return SagaOutcome(
            saga_id=self.saga_id,
            saga_type=self.saga_type,
            status=self.status,
            failure=self.failure,
            error=self.error,
            home_shard=home_shard,
        )


def _lease(seconds: float) -> Any:
    return func.clock_timestamp() + timedelta(seconds=seconds)


def _update_owned(saga_id: str, owner: str) -> Update:
    """An UPDATE of the saga's row that matches only while ``owner`` holds the open saga (the fence)."""
    return update(sagas_table).where(
        sagas_table.c.saga_id == saga_id,
        sagas_table.c.owner == owner,
        sagas_table.c.finished_at.is_(None),
    )


def create(
    conn: Connection,
    saga_id: str,
    saga_type: str,
    payload: Mapping[str, Any],
    owner: str,
    lease: float,
    shards: Sequence[str] = (),
) -> bool:
    """Insert a new saga owned by ``owner``; False when the id already exists."""
    statement = (
        insert(sagas_table)
        .values(
            saga_id=saga_id,
            saga_type=saga_type,
            payload=dict(payload),
            status="pending",
            step=0,
            compensating=False,
            owner=owner,
            lease_until=_lease(lease),
            attempts=0,
            shards=list(shards),
        )
        .on_conflict_do_nothing(index_elements=[sagas_table.c.saga_id])
        .returning(sagas_table.c.saga_id)
    )
    return conn.execute(statement).first() is not None


CREATE_WITH_RECEIPT = """
    WITH log AS (
        INSERT INTO shardkit_sagas (saga_id, saga_type, payload, status, step, compensating, owner,
                                    lease_until, attempts, shards, created_at, updated_at)
        VALUES (:sk_saga_id, :sk_saga_type, CAST(:sk_payload AS jsonb), :sk_status, :sk_step, false, :sk_owner,
                clock_timestamp() + make_interval(secs => :sk_lease), 0, CAST(:sk_shards AS jsonb), now(), now())
        ON CONFLICT (saga_id) DO NOTHING
        RETURNING saga_id
    ), receipt AS (
        INSERT INTO shardkit_saga_receipts (saga_id, step, phase, outcome, digest, shard_key)
        SELECT :sk_saga_id, :sk_step_name, 'do', 'applied', :sk_digest, :sk_shard_key
        WHERE EXISTS (SELECT 1 FROM log)
        ON CONFLICT DO NOTHING
        RETURNING saga_id
    ){act}
    SELECT (SELECT count(*) FROM log) AS created, (SELECT count(*) FROM receipt) AS reserved, {applied} AS applied
"""


def create_with_receipt(
    conn: Connection,
    saga_id: str,
    saga_type: str,
    payload_json: str,
    owner: str,
    lease: float,
    shards_json: str,
    first: Mapping[str, Any],
    fused: tuple[str, Mapping[str, Any]] | None = None,
    shard_key: str | None = None,
) -> tuple[bool, bool, bool]:
    """The fast start, one statement: insert the log row (already at the state after its first step)
    and that step's receipt, and with ``fused`` (a :class:`FusedAction`'s SQL and params) the step's
    effect too. Returns (log row created, receipt reserved, fused action applied); without ``fused``
    the caller runs the step's action in the same transaction, and rolls back unless the first two
    are True."""
    params = start_params(
        saga_id, saga_type, payload_json, owner, lease, shards_json, first, fused, shard_key
    )
    row = conn.execute(fused_statement(CREATE_WITH_RECEIPT, fused[0] if fused else None), params).one()
    return bool(row.created), bool(row.reserved), bool(row.applied)


def start_params(
    saga_id: str,
    saga_type: str,
    payload_json: str,
    owner: str,
    lease: float,
    shards_json: str,
    first: Mapping[str, Any],
    fused: tuple[str, Mapping[str, Any]] | None = None,
    shard_key: str | None = None,
) -> dict[str, Any]:
    """The bind parameters of the fast start's statement."""
    return {
        **(fused[1] if fused else {}),
        "sk_saga_id": saga_id,
        "sk_saga_type": saga_type,
        "sk_payload": payload_json,
        "sk_status": first["status"],
        "sk_step": first["step"],
        "sk_owner": owner,
        "sk_lease": lease,
        "sk_shards": shards_json,
        "sk_step_name": first["step_name"],
        "sk_digest": first["digest"],
        "sk_shard_key": shard_key,
    }


def forget(conn: Connection, saga_id: str, owner: str) -> bool:
    """Delete a saga that never applied a step (its first step's shard was unreachable), so the id
    is free again; only while ``owner`` holds it. True if deleted."""
    result = conn.execute(
        delete(sagas_table).where(
            sagas_table.c.saga_id == saga_id,
            sagas_table.c.owner == owner,
            sagas_table.c.step == 0,
            sagas_table.c.compensating.is_(False),
            sagas_table.c.finished_at.is_(None),
        )
    )
    return result.rowcount == 1


def load(conn: Connection, saga_id: str) -> SagaRecord | None:
    row = conn.execute(select(sagas_table).where(sagas_table.c.saga_id == saga_id)).mappings().first()
    return SagaRecord.from_row(row) if row is not None else None


def write(conn: Connection, saga_id: str, owner: str, lease: float, values: Mapping[str, Any]) -> None:
    """Record progress (and renew the lease) if ``owner`` still owns the open saga."""
    values = dict(values)
    finished = values.pop("finished", False)
    extra: dict[str, Any] = {"updated_at": func.clock_timestamp()}
    if finished:
        extra.update(finished_at=func.clock_timestamp(), lease_until=None)
    else:
        extra["lease_until"] = _lease(lease)
    result = conn.execute(_update_owned(saga_id, owner).values(**values, **extra))
    if result.rowcount != 1:
        raise LeaseLost(saga_id)


FINISH_MANY = """
    UPDATE shardkit_sagas AS s
    SET status = v.status, step = v.step, error = NULL, lease_until = NULL,
        finished_at = clock_timestamp(), updated_at = clock_timestamp()
    FROM unnest(CAST(:ids AS varchar[]), CAST(:owners AS varchar[]), CAST(:statuses AS varchar[]),
                CAST(:steps AS integer[])) AS v(saga_id, owner, status, step)
    WHERE s.saga_id = v.saga_id AND s.owner = v.owner AND s.finished_at IS NULL
"""
_FINISH_MANY = text(FINISH_MANY)


def finish_many(conn: Connection, items: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
    """Deferred completion marks (saga_id, owner, values with ``status`` and ``step``) in one
    statement, each fenced like :func:`write`; returns how many applied (a saga taken over
    meanwhile is skipped: its new owner finishes it)."""
    return conn.execute(_FINISH_MANY, finish_params(items)).rowcount


def finish_params(items: Sequence[tuple[str, str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The bind parameters of :data:`FINISH_MANY` for these marks."""
    return {
        "ids": [saga_id for saga_id, _, _ in items],
        "owners": [owner for _, owner, _ in items],
        "statuses": [values["status"] for _, _, values in items],
        "steps": [values["step"] for _, _, values in items],
    }


def release(conn: Connection, saga_id: str, owner: str, error: str | None) -> None:
    """Give the saga back to recovery at once (its lease ends now), noting why it is unfinished."""
    conn.execute(
        _update_owned(saga_id, owner).values(
            lease_until=func.clock_timestamp(), error=error, updated_at=func.clock_timestamp()
        )
    )


def renew(conn: Connection, leases: Iterable[tuple[str, str]], lease: float) -> int:
    """Heartbeat: extend the leases of (saga_id, owner) pairs still owned; returns rows renewed."""
    renewed = 0
    for saga_id, owner in leases:
        result = conn.execute(_update_owned(saga_id, owner).values(lease_until=_lease(lease)))
        renewed += result.rowcount
    return renewed


def _expired() -> Any:
    return and_(sagas_table.c.finished_at.is_(None), sagas_table.c.lease_until < func.clock_timestamp())


def take_over(conn: Connection, saga_id: str, owner: str, lease: float) -> SagaRecord | None:
    """Claim one saga if its lease ran out (its runner died); None if it is live or finished."""
    row = (
        conn.execute(
            update(sagas_table)
            .where(sagas_table.c.saga_id == saga_id, _expired())
            .values(owner=owner, lease_until=_lease(lease), attempts=sagas_table.c.attempts + 1)
            .returning(*sagas_table.c)
        )
        .mappings()
        .first()
    )
    return SagaRecord.from_row(row) if row is not None else None


def claim_next(
    conn: Connection, owner: str, lease: float, saga_types: Sequence[str], exclude: Sequence[str]
) -> SagaRecord | None:
    """Claim the open saga whose lease ran out longest ago, skipping rows another worker is claiming."""
    candidate = (
        select(sagas_table.c.saga_id)
        .where(_expired(), sagas_table.c.saga_type.in_(saga_types), sagas_table.c.saga_id.not_in(exclude))
        .order_by(sagas_table.c.lease_until)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    saga_id = conn.execute(candidate).scalar()
    if saga_id is None:
        return None
    return take_over(conn, saga_id, owner, lease)


def unknown_type_ids(conn: Connection, saga_types: Sequence[str]) -> list[str]:
    """Ids of expired open sagas whose type this worker does not know (reported, never touched)."""
    query = (
        select(sagas_table.c.saga_id).where(_expired(), sagas_table.c.saga_type.not_in(saga_types)).limit(100)
    )
    return list(conn.execute(query).scalars())
