"""The move record: what a move in flight was started with, and how far each source got.

Stored on every shard of the move (table ``shardkit_rebalance_move``, one row per shard), next to
the ring state but not in it, so that a restarted mover -- ``shardkit rebalance --resume`` in a
fresh process, with only the fleet's original configuration -- finds:

* the options the move was started with (``--batch-size``, ``--sleep``, ...);
* the joining shards' URLs, **without their passwords** (libpq then takes the password from
  ``PGPASSWORD`` / ``~/.pgpass``, or the operator configures the shard); never a secret;
* the plan's row count, so a restart shows progress and an ETA without re-planning;
* per source shard, the rows, keys and batches cut over so far (updated in the cut-over
  transaction itself, so they are exact), which ``--status`` and :meth:`RebalanceJob.progress` show.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, make_url

from ..manager import ShardManager
from .parallel import for_shards

MOVE_TABLE = "shardkit_rebalance_move"

MOVE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {MOVE_TABLE} ("
    " version bigint PRIMARY KEY,"
    " spec text NOT NULL,"
    " rows_moved bigint NOT NULL DEFAULT 0,"
    " keys_moved bigint NOT NULL DEFAULT 0,"
    " batches bigint NOT NULL DEFAULT 0,"
    " started_at timestamptz NOT NULL DEFAULT now(),"
    " updated_at timestamptz NOT NULL DEFAULT now())"
)

COUNT_BATCH = (
    f"UPDATE {MOVE_TABLE} SET rows_moved = rows_moved + :rows, keys_moved = keys_moved + :keys,"
    " batches = batches + 1, updated_at = now() WHERE version = :version"
)
"""Run by the cut-over transaction on the source (with the watermark update)."""


@dataclass(frozen=True)
class MoveRecord:
    """The stored description of the move to ring version ``version`` (the in-flight version)."""

    version: int
    options: dict[str, float]
    """``MoveOptions`` fields the move was started with."""
    joining: dict[str, str] = field(default_factory=dict)
    """Shard id -> URL without password, for shards the move puts on the ring."""
    rows_expected: int | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"options": self.options, "joining": self.joining, "rows_expected": self.rows_expected},
            sort_keys=True,
        )

    @classmethod
    def from_row(cls, version: int, spec: str) -> MoveRecord:
        data = json.loads(spec)
        return cls(
            version, dict(data.get("options", {})), dict(data.get("joining", {})), data.get("rows_expected")
        )


@dataclass(frozen=True)
class SourceCounts:
    """One shard's cut-over counters for the move (zero on shards that are not sources)."""

    rows_moved: int = 0
    keys_moved: int = 0
    batches: int = 0
    seconds: float = 0.0
    """From the record's creation to the shard's last cut-over."""


def url_without_password(url: URL | str) -> str:
    """The URL to store: never a password (see the module docstring)."""
    u = make_url(url)
    bare = URL.create(u.drivername, u.username, None, u.host, u.port, u.database, u.query)
    return bare.render_as_string(hide_password=False)


def write_record(manager: ShardManager, record: MoveRecord, shard_ids: Iterable[str]) -> None:
    """Store ``record`` on each shard, replacing a record of another version (kept if the same)."""

    def store(conn: Connection, shard_id: str) -> None:
        conn.execute(text(MOVE_DDL))
        conn.execute(text(f"DELETE FROM {MOVE_TABLE} WHERE version <> :v"), {"v": record.version})
        conn.execute(
            text(f"INSERT INTO {MOVE_TABLE} (version, spec) VALUES (:v, :s) ON CONFLICT DO NOTHING"),
            {"v": record.version, "s": record.to_json()},
        )

    for_shards(manager, store, shard_ids)


def _read(conn: Connection) -> Any:
    if conn.execute(text("SELECT to_regclass(:t)"), {"t": MOVE_TABLE}).scalar() is None:
        return None
    return conn.execute(
        text(
            f"SELECT version, spec, rows_moved, keys_moved, batches,"
            f" extract(epoch FROM updated_at - started_at) AS seconds FROM {MOVE_TABLE}"
        )
    ).first()


def read_records(
    manager: ShardManager, version: int, shard_ids: Iterable[str] | None = None
) -> tuple[MoveRecord | None, dict[str, SourceCounts]]:
    """The record of the move to ``version`` and each shard's counters (shards without one omitted)."""
    rows = manager.run_on_all(_read, shard_ids=list(manager.shard_ids if shard_ids is None else shard_ids))
    record = None
    counts: dict[str, SourceCounts] = {}
    for shard_id, row in rows.items():
        if row is None or int(row.version) != version:
            continue
        record = record or MoveRecord.from_row(int(row.version), row.spec)
        counts[shard_id] = SourceCounts(
            int(row.rows_moved), int(row.keys_moved), int(row.batches), float(row.seconds or 0)
        )
    return record, counts


__all__ = [
    "COUNT_BATCH",
    "MOVE_DDL",
    "MOVE_TABLE",
    "MoveRecord",
    "SourceCounts",
    "read_records",
    "url_without_password",
    "write_record",
]
