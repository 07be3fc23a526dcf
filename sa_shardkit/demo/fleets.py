"""Where the demo runs: SQLite files (the embedded default), throwaway local PostgreSQL servers for
the steps that need PostgreSQL, or the servers given with ``--url`` (reset first, so re-runs repeat).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine

from ..errors import ConfigError
from ..manager import ShardManager
from ..saga import saga_metadata
from ..testing import PostgresFleet, find_pg_bin
from .models import Base

DEMO_SHARDS = 4
OWNED_TABLES = frozenset(Base.metadata.tables) | frozenset(saga_metadata.tables) | {"alembic_version"}
"""The tables the demo creates; ``shardkit_*`` (ring state, staging) are sa_shardkit's own as well."""

NO_POSTGRES = (
    "needs PostgreSQL, and no PostgreSQL server binaries (initdb, pg_ctl) were found to start "
    "throwaway local servers. Install them (Debian/Ubuntu: apt-get install postgresql; or set "
    "SHARDKIT_PG_BIN), or run the whole story on your servers: shardkit demo --url URL1 ... --url URL4 "
    "--add-url URL5"
)


@dataclass
class DemoFleet:
    """One set of shards the story runs on, and what has been set up on it so far."""

    manager: ShardManager
    label: str
    postgres: bool
    spare_url: str | None = None
    """A server step 6 adds as the next shard (None: step 6 cannot run here)."""
    ready: set[str] = field(default_factory=set)


def sqlite_manager(directory: Path, count: int = DEMO_SHARDS) -> ShardManager:
    """SQLite files as shards: no server; WAL and relaxed syncing keep the demo's many small commits fast."""
    manager = ShardManager.from_urls(
        {f"shard-{i}": f"sqlite:///{directory / f'shard-{i}.db'}" for i in range(1, count + 1)}
    )
    for shard_id in manager.shard_ids:
        _tune_sqlite(manager.engine(shard_id))
    return manager


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


class LocalPostgresStarter:
    """Starts throwaway local servers in the background (while the SQLite steps run), if it can."""

    def __init__(self, count: int = DEMO_SHARDS + 1) -> None:
        self.count = count
        self.fleet: PostgresFleet | None = None
        self.error: str | None = None if find_pg_bin() is not None else NO_POSTGRES
        self._thread: threading.Thread | None = None
        if self.error is None:
            self._thread = threading.Thread(target=self._start, name="shardkit-demo-pg", daemon=True)
            self._thread.start()

    def _start(self) -> None:
        try:
            self.fleet = PostgresFleet(self.count)
        except Exception as error:  # noqa: BLE001 - reported as the reason the steps are skipped
            self.error = f"needs PostgreSQL; starting throwaway local servers failed: {error}"

    def demo_fleet(self) -> DemoFleet | None:
        """Wait for the servers; a fleet of the first four with the fifth as the spare (None: see error)."""
        if self._thread is not None:
            self._thread.join()
        if self.fleet is None:
            return None
        urls = self.fleet.urls
        manager = ShardManager.from_urls(
            {f"shard-{i}": url for i, url in enumerate(urls[:DEMO_SHARDS], 1)}, connect_timeout=5
        )
        label = f"{DEMO_SHARDS} throwaway local PostgreSQL servers"
        return DemoFleet(manager, label, postgres=True, spare_url=urls[DEMO_SHARDS])

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.fleet is not None:
            self.fleet.close()


def reset_demo_schema(manager: ShardManager, extra_urls: list[str]) -> None:
    """Drop what an earlier demo run left on the given servers, so a re-run tells the same story.

    Refuses (``ConfigError``, before anything is dropped) when a database holds tables the demo
    does not own: point the demo at scratch databases, never at an application's.
    """
    scratch = (
        ShardManager.from_urls({f"spare-{i}": u for i, u in enumerate(extra_urls, 1)}) if extra_urls else None
    )
    targets = [(manager, s) for s in manager.shard_ids] + (
        [(scratch, s) for s in scratch.shard_ids] if scratch else []
    )
    try:
        found = {}
        for owner, shard_id in targets:
            with owner.connect(shard_id) as conn:
                found[(owner, shard_id)] = set(inspect(conn).get_table_names())
        for (owner, shard_id), names in found.items():
            foreign = sorted(n for n in names if n not in OWNED_TABLES and not n.startswith("shardkit_"))
            if foreign:
                url = owner.config(shard_id).safe_url()
                raise ConfigError(
                    f"refusing to run the demo on {shard_id} ({url}): it holds tables the demo does not "
                    f"own ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                    "give the demo scratch databases"
                )
        for (owner, shard_id), names in found.items():
            with owner.connect(shard_id) as conn:
                cascade = " CASCADE" if conn.dialect.name == "postgresql" else ""
                for name in sorted(names):
                    conn.execute(text(f'DROP TABLE IF EXISTS "{name}"{cascade}'))
                conn.commit()
    finally:
        if scratch is not None:
            scratch.dispose()
