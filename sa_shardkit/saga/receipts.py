"""Step receipts: the idempotency records written in each step's own transaction, on its shard.

The ``do`` receipt's primary key serialises every runner of one step: a second attempt (a retry, a
recovery worker, a stalled runner waking up) finds the first one's receipt and does nothing. A
compensation first *fences* the step (inserts a ``fenced`` receipt if none exists), so a forward
attempt still in flight can never apply after the saga decided to undo it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from .tables import receipts_table

APPLIED = "applied"
FAILED = "failed"
FENCED = "fenced"
SKIPPED = "skipped"


@dataclass(frozen=True)
class Receipt:
    outcome: str
    reason: str | None = None


def _insert(conn: Connection, saga_id: str, step: str, phase: str, outcome: str) -> bool:
    statement = (
        insert(receipts_table)
        .values(saga_id=saga_id, step=step, phase=phase, outcome=outcome)
        .on_conflict_do_nothing()
        .returning(receipts_table.c.saga_id)
    )
    return conn.execute(statement).first() is not None


def _get(conn: Connection, saga_id: str, step: str, phase: str) -> Receipt:
    row = conn.execute(
        select(receipts_table.c.outcome, receipts_table.c.reason).where(
            receipts_table.c.saga_id == saga_id,
            receipts_table.c.step == step,
            receipts_table.c.phase == phase,
        )
    ).one()
    return Receipt(row.outcome, row.reason)


def begin_do(conn: Connection, saga_id: str, step: str) -> Receipt | None:
    """Reserve the forward step: None means "run the action now"; else the earlier attempt's receipt."""
    if _insert(conn, saga_id, step, "do", APPLIED):
        return None
    return _get(conn, saga_id, step, "do")


def refuse(conn: Connection, saga_id: str, step: str, reason: str) -> Receipt:
    """Record that the action refused, so every retry gives the same answer; returns the receipt
    that stands (an earlier attempt's, if one got there first)."""
    statement = (
        insert(receipts_table)
        .values(saga_id=saga_id, step=step, phase="do", outcome=FAILED, reason=reason)
        .on_conflict_do_nothing()
        .returning(receipts_table.c.saga_id)
    )
    if conn.execute(statement).first() is not None:
        return Receipt(FAILED, reason)
    return _get(conn, saga_id, step, "do")


def begin_undo(conn: Connection, saga_id: str, step: str) -> bool:
    """Decide a compensation: True means "run it now" (the step applied and was not undone yet)."""
    if not _insert(conn, saga_id, step, "undo", APPLIED):
        return False  # already compensated (or found not to need it)
    if _insert(conn, saga_id, step, "do", FENCED):
        applied = False  # the step never ran, and now it never will
    else:
        applied = _get(conn, saga_id, step, "do").outcome == APPLIED
    if not applied:
        conn.execute(
            update(receipts_table)
            .where(
                receipts_table.c.saga_id == saga_id,
                receipts_table.c.step == step,
                receipts_table.c.phase == "undo",
            )
            .values(outcome=SKIPPED)
        )
    return applied
