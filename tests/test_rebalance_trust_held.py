"""The mover's kept connections (``sa_shardkit/rebalance/held.py``) and a server that drops them.

Before the mover kept its connections per run, each batch checked one out of the pool, whose
pre-ping replaced a connection the server had closed (an ``idle_session_timeout``, a restarted
PgBouncer, an operator's ``pg_terminate_backend``). Here every mover connection but the source's
advisory-lock guard is terminated after the first batch: the move must still finish, and the
fleet must be consistent.

The four sources move in parallel, so the connections are terminated only once every mover waits
between batches (:class:`ParkedMovers`): a connection that is idle on the server but whose mover
is in the middle of a batch (between its transactions, or past its check of a kept connection)
would be closed while in use, which no check before a use can see.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveControl, MoveOptions, install_ring, rebalance
from tests.rebalance_data import seed
from tests.trust_support import check_consistent

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
ALL = [*FOUR.shard_ids, "shard-5"]

TERMINATE = (  # the victims chosen first (MATERIALIZED), then each one terminated
    "WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    " AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state = 'idle'"
    " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory'))"
    " SELECT coalesce(array_agg(pid), '{}') FROM victims WHERE pg_terminate_backend(pid)"
)
GONE = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"


def _wait_gone(conn: Any, pids: list[int]) -> None:
    """Until the terminated backends have exited: pg_terminate_backend only signals them, and a
    backend leaves pg_stat_activity after it sent its client the FATAL message (so the kept
    connection was closed by the server while idle, as the test means, not while in use)."""
    deadline = time.monotonic() + 10
    while conn.execute(text(GONE), {"pids": pids}).scalar_one():
        conn.rollback()
        assert time.monotonic() < deadline, f"backends {pids} still there 10 s after pg_terminate_backend"
        time.sleep(0.01)


class ParkedMovers(MoveControl):
    """Each mover's checkpoint after its first batch waits for the others there; the last one in
    runs ``action`` before any goes on (every mover then holds its kept connections, all idle)."""

    def __init__(self, movers: int, action: Any) -> None:
        super().__init__()
        self._calls: dict[int, int] = {}
        self._barrier = threading.Barrier(movers, action=action, timeout=60)

    def checkpoint(self) -> None:
        calls = self._calls[threading.get_ident()] = self._calls.get(threading.get_ident(), 0) + 1
        if calls == 2:  # the first is before the mover's first batch
            self._barrier.wait()
        super().checkpoint()


def test_a_move_survives_the_server_closing_its_kept_connections(
    manager: ShardManager, shard5_url: str
) -> None:
    seed(manager, FOUR, 400, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    killed: dict[str, int] = {}

    def terminate_all() -> None:
        with ShardManager.from_urls({s: manager.config(s).primary_url for s in ALL}) as admin:
            for shard_id in ALL:
                with admin.connect(shard_id) as conn:
                    pids = list(conn.execute(text(TERMINATE)).scalar_one())
                    conn.commit()
                    _wait_gone(conn, pids)
                    killed[shard_id] = len(pids)

    control = ParkedMovers(len(FOUR.shard_ids), terminate_all)
    rebalance(manager, FIVE, Base, options=MoveOptions(batch_size=8), control=control)
    # each source's kept connection, and the four movers' kept connections to shard-5
    assert all(killed[s] >= 1 for s in FOUR.shard_ids) and killed["shard-5"] >= 4, killed
    check_consistent(manager, FIVE, ALL)
