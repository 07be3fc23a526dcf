"""Saga receipts recorded before revision 0007 (no ``shard_key``): given their step's key before a move.

A receipt moves inside its step key's cut-over (:mod:`.companions`), found by ``shard_key``; one
written before that column existed holds NULL and would stay behind, so a step retried after the
move would not find it where it now runs. Before a move starts (and when it resumes) each source's
NULL receipts get their key from their saga's log row: the saga type's step ``key(payload)``, from
the saga definitions this process knows (:func:`~sa_shardkit.saga.definition.defined_sagas`:
every ``Saga`` constructed here, e.g. by importing the module that defines it; ``shardkit
rebalance --saga MODULE:NAME``). The key is a pure function of the payload, so filling it is safe
while sagas run (runners never write NULL keys). A receipt whose saga log row cannot be found, or
whose saga type or step is unknown here, stops the move before anything moves
(:class:`~sa_shardkit.errors.RebalanceError` naming them and what to do).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import text

from ..errors import RebalanceError
from ..manager import ShardManager
from ..ring_state import value_text
from ..saga.definition import defined_sagas
from .companions import present

BATCH = 500
"""NULL-key receipts read per batch."""

_UNKEYED = text(
    "SELECT DISTINCT saga_id, step FROM shardkit_saga_receipts WHERE shard_key IS NULL"
    " AND (saga_id, step) > (CAST(:i AS varchar), CAST(:s AS varchar)) ORDER BY saga_id, step LIMIT :n"
)
_LOGS = text(
    "SELECT saga_id, saga_type, payload FROM shardkit_sagas WHERE saga_id = ANY(CAST(:ids AS varchar[]))"
)
_FILL = text(
    "UPDATE shardkit_saga_receipts AS r SET shard_key = v.k"
    " FROM unnest(CAST(:ids AS varchar[]), CAST(:steps AS varchar[]), CAST(:keys AS text[])) AS v(i, s, k)"
    " WHERE r.saga_id = v.i AND r.step = v.s AND r.shard_key IS NULL"
)


_HAS_RECEIPTS = "SELECT 1 WHERE to_regclass('shardkit_saga_receipts') IS NOT NULL"


def shards_with_receipts(manager: ShardManager, shard_ids: Iterable[str]) -> list[str]:
    """Which of ``shard_ids`` hold a receipts table at all (one parallel round)."""
    ids = list(shard_ids)
    found = manager.run_on_all(_HAS_RECEIPTS, shard_ids=ids) if ids else {}
    return [s for s in ids if found[s]]


def fill_receipt_keys(manager: ShardManager, sources: Iterable[str]) -> int:
    """Give every NULL-key receipt on ``sources`` its step's shard key; returns receipts filled.
    Raises :class:`RebalanceError` (after filling what it could) when some cannot be."""
    filled = 0
    unresolved: list[str] = []
    ids = list(sources)
    found = set(shards_with_receipts(manager, ids))
    for source in ids:
        if source in found:
            count, missing = _fill(manager, source)
            filled += count
            unresolved += missing
    if unresolved:
        shown = "; ".join(unresolved[:5]) + (
            f"; and {len(unresolved) - 5} more" if len(unresolved) > 5 else ""
        )
        raise RebalanceError(
            f"{len(unresolved)} saga receipt(s) recorded before revision 0007 have no shard key and "
            f"it cannot be worked out ({shown}): import the modules defining those saga types "
            "(shardkit rebalance --saga MODULE:NAME), or purge the finished sagas "
            "(shardkit sagas purge); nothing was moved"
        )
    return filled


def _fill(manager: ShardManager, source: str) -> tuple[int, list[str]]:
    sagas = defined_sagas()
    after = ("", "")
    filled, unresolved = 0, list[str]()
    while True:
        with manager.connect(source) as conn:
            pairs = [
                (r.saga_id, r.step)
                for r in conn.execute(_UNKEYED, {"i": after[0], "s": after[1], "n": BATCH})
            ]
            conn.rollback()
        if not pairs:
            return filled, unresolved
        after = pairs[-1]
        logs = _log_rows(manager, sorted({i for i, _ in pairs}))
        rows: list[tuple[str, str, str]] = []
        for saga_id, step_name in pairs:
            log = logs.get(saga_id)
            saga = sagas.get(log["saga_type"]) if log is not None else None
            step = next((s for s in saga.steps if s.name == step_name), None) if saga is not None else None
            if log is None:
                unresolved.append(f"{saga_id}/{step_name} on {source}: no saga log row")
            elif step is None:
                unresolved.append(
                    f"{saga_id}/{step_name} on {source}: saga type {log['saga_type']!r} unknown"
                )
            else:
                rows.append((saga_id, step_name, value_text(step.key(log["payload"]))))
        if rows:
            with manager.connect(source) as conn, conn.begin():
                ids, steps, keys = (list(column) for column in zip(*rows, strict=True))
                filled += conn.execute(_FILL, {"ids": ids, "steps": steps, "keys": keys}).rowcount


def _log_rows(manager: ShardManager, saga_ids: list[str]) -> dict[str, Any]:
    """The log rows of ``saga_ids``, wherever they are (a move may be carrying them)."""
    found: dict[str, Any] = {}
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            if present(conn, ["shardkit_sagas"]):
                found.update({r["saga_id"]: r for r in conn.execute(_LOGS, {"ids": saga_ids}).mappings()})
            conn.rollback()
    return found


__all__ = ["BATCH", "fill_receipt_keys", "shards_with_receipts"]
