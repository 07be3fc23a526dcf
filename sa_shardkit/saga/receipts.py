"""Step receipts: the idempotency records written in each step's own transaction, on its shard.

The ``do`` receipt's primary key serialises every runner of one step: a second attempt (a retry, a
recovery worker, a stalled runner waking up) finds the first one's receipt and does nothing. A
compensation first *fences* the step (inserts a ``fenced`` receipt if none exists), so a forward
attempt still in flight can never apply after the saga decided to undo it.

Every receipt carries a digest of the step's input (saga type, step name, payload): a receipt found
under the same saga id but with another digest belongs to another operation, and the step raises
:class:`~sa_shardkit.errors.SagaConflictError` instead of trusting it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import TextClause

from ..errors import SagaConflictError
from .definition import RECEIPT_RESERVED
from .tables import receipts_table

APPLIED = "applied"
FAILED = "failed"
FENCED = "fenced"
SKIPPED = "skipped"

_c = receipts_table.c
_INSERT = (
    insert(receipts_table)
    .values(
        saga_id=bindparam("saga_id"),
        step=bindparam("step"),
        phase=bindparam("phase"),
        outcome=bindparam("outcome"),
        reason=bindparam("reason"),
        digest=bindparam("digest"),
        shard_key=bindparam("shard_key"),
    )
    .on_conflict_do_nothing()
    .returning(_c.saga_id)
)
_GET = select(_c.outcome, _c.reason, _c.digest).where(
    _c.saga_id == bindparam("saga_id"), _c.step == bindparam("step"), _c.phase == bindparam("phase")
)
_SKIP_UNDO = (
    update(receipts_table)
    .where(_c.saga_id == bindparam("b_saga_id"), _c.step == bindparam("b_step"), _c.phase == "undo")
    .values(outcome=SKIPPED)
)


def digest(saga_type: str, step: str, canonical_payload: str) -> str:
    """What a step's receipt is checked against: a hash of the saga type, step and payload JSON."""
    data = f"{saga_type}\0{step}\0{canonical_payload}".encode()
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True)
class Receipt:
    outcome: str
    reason: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class StepInput:
    """Which step of which saga, and the digest its receipts carry."""

    saga_id: str
    step: str
    digest: str
    shard_key: str | None = None
    """The step's shard key as text: a rebalance moves the receipt with that key's rows."""


def _insert(conn: Connection, key: StepInput, phase: str, outcome: str, reason: str | None = None) -> bool:
    params = {
        "saga_id": key.saga_id,
        "step": key.step,
        "phase": phase,
        "outcome": outcome,
        "reason": reason,
        "digest": key.digest,
        "shard_key": key.shard_key,
    }
    return conn.execute(_INSERT, params).first() is not None


def _get(conn: Connection, key: StepInput, phase: str) -> Receipt:
    row = conn.execute(_GET, {"saga_id": key.saga_id, "step": key.step, "phase": phase}).one()
    return Receipt(row.outcome, row.reason, row.digest)


def _checked(receipt: Receipt, key: StepInput) -> Receipt:
    if receipt.digest is not None and receipt.digest != key.digest:
        raise SagaConflictError(
            f"saga id {key.saga_id!r}: step {key.step!r} already has a receipt for other input "
            "(the id was used for another operation); nothing was applied"
        )
    return receipt


def begin_do(conn: Connection, key: StepInput) -> Receipt | None:
    """Reserve the forward step: None means "run the action now"; else the earlier attempt's receipt.

    Raises :class:`SagaConflictError` when that receipt was written for other input.
    """
    if _insert(conn, key, "do", APPLIED):
        return None
    return _checked(_get(conn, key, "do"), key)


@functools.lru_cache(maxsize=256)
def fused_statement(template: str, act_sql: str | None) -> TextClause:
    """``template`` (with ``{act}`` and ``{applied}``) around a fused action's SQL, built once per SQL."""
    act, applied = fuse(act_sql)
    return text(template.format(act=act, applied=applied))


def fuse(act_sql: str | None) -> tuple[str, str]:
    """The extra CTE and the ``applied`` column for a fused action (see :class:`FusedAction`)."""
    if act_sql is None:
        return "", "0"
    condition = act_sql.replace(RECEIPT_RESERVED, "EXISTS (SELECT 1 FROM receipt)")
    return f", act AS ({condition})", "(SELECT count(*) FROM act)"


FUSED = """
    WITH receipt AS (
        INSERT INTO shardkit_saga_receipts (saga_id, step, phase, outcome, digest, shard_key)
        VALUES (:sk_saga_id, :sk_step, 'do', 'applied', :sk_digest, :sk_shard_key)
        ON CONFLICT DO NOTHING
        RETURNING saga_id
    ){act}
    SELECT (SELECT count(*) FROM receipt) AS reserved, {applied} AS applied
"""


def do_fused(conn: Connection, key: StepInput, fused: tuple[str, Mapping[str, Any]]) -> bool:
    """Reserve the step and apply its fused action in one statement; True when both happened (else
    the caller rolls back and takes the ordinary path, which also reports refusals and replays)."""
    row = conn.execute(
        fused_statement(FUSED, fused[0]),
        {
            **fused[1],
            "sk_saga_id": key.saga_id,
            "sk_step": key.step,
            "sk_digest": key.digest,
            "sk_shard_key": key.shard_key,
        },
    ).one()
    return bool(row.reserved) and bool(row.applied)


def refuse(conn: Connection, key: StepInput, reason: str) -> Receipt:
    """Record that the action refused, so every retry gives the same answer; returns the receipt
    that stands (an earlier attempt's, if one got there first)."""
    if _insert(conn, key, "do", FAILED, reason):
        return Receipt(FAILED, reason, key.digest)
    return _checked(_get(conn, key, "do"), key)


def begin_undo(conn: Connection, key: StepInput) -> bool:
    """Decide a compensation: True means "run it now" (the step applied and was not undone yet).

    A forward receipt written for other input is not ours to undo: the compensation is skipped.
    """
    if not _insert(conn, key, "undo", APPLIED):
        return False  # already compensated (or found not to need it)
    if _insert(conn, key, "do", FENCED):
        applied = False  # the step never ran, and now it never will
    else:
        forward = _get(conn, key, "do")
        applied = forward.outcome == APPLIED and forward.digest in (None, key.digest)
    if not applied:
        conn.execute(_SKIP_UNDO, {"b_saga_id": key.saga_id, "b_step": key.step})
    return applied
