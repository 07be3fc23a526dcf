"""The connections one source mover keeps for its whole run (one per shard it talks to).

A batch opens three to five transactions (phase 1 on the source and each target, the cut-over);
a pooled checkout before each costs a pre-ping round trip and the pool's bookkeeping, about a
tenth of a small batch's round trips. Kept connections skip both. Between uses a kept connection
holds no transaction (each use ends with a rollback of whatever is left open), so it keeps no
lock and no snapshot; one that failed is closed and replaced on the next use, and so is one the
server closed while it was idle (``idle_session_timeout``, ``pg_terminate_backend``, a PgBouncer
restart): an idle connection's socket has nothing to read unless the server sent its goodbye or
closed it, which a zero-timeout poll sees without a round trip (what the pool's pre-ping paid).
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy.engine import Connection

from ..manager import ShardManager


class HeldConnections:
    """Connections kept per shard while :meth:`holding`; outside it, a pooled one per use."""

    def __init__(self, manager: ShardManager) -> None:
        self.manager = manager
        self._held: dict[str, Connection] | None = None
        self._busy: set[str] = set()

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Keep the connections until the block ends (then they go back to the pool)."""
        self._held = {}
        try:
            yield
        finally:
            held, self._held = self._held, None
            for conn in held.values():
                conn.close()

    @contextmanager
    def connect(self, shard_id: str) -> Iterator[Connection]:
        """A connection to ``shard_id`` with no transaction open, like ``manager.connect``."""
        if self._held is None or shard_id in self._busy:  # not holding, or already in use: a pooled one
            with self.manager.connect(shard_id) as conn:
                yield conn
            return
        kept = self._held.get(shard_id)
        if kept is not None and (kept.closed or kept.invalidated or _closed_by_server(kept)):
            if not kept.closed:
                kept.invalidate()  # its pooled DBAPI connection is discarded, not handed out again
                kept.close()
            kept = None
        if kept is None:
            kept = self._held[shard_id] = self.manager.connect(shard_id)
        conn = kept
        self._busy.add(shard_id)
        try:
            yield conn
        except BaseException:
            del self._held[shard_id]
            conn.close()
            raise
        finally:
            self._busy.discard(shard_id)
        if conn.in_transaction():
            conn.rollback()


def _closed_by_server(conn: Connection) -> bool:
    """Whether an idle connection's socket is readable (the server's FATAL message or EOF) or gone."""
    try:
        fd = conn.connection.driver_connection.pgconn.socket  # type: ignore[union-attr]
        readable, _, _ = select.select([fd], [], [], 0)
    except psycopg.Error:  # libpq has no socket: the connection is gone
        return True
    except (AttributeError, OSError, ValueError):  # not a psycopg connection: the next use finds out
        return False
    return bool(readable)


__all__ = ["HeldConnections"]
