"""A real streaming replica for the first shard (``pg_basebackup -R``), and where statements ran."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from sa_shardkit import ShardConfig, ShardedSession, ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.testing import LocalPostgres, wait_until_accepting
from tests.fleet import TestFleet

REPLICA_NAME = "pg1-streaming-replica"


def _connect(url: str) -> psycopg.Connection:
    parsed = make_url(url)
    return psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database, autocommit=True
    )


def start_replica(fleet: TestFleet) -> Iterator[LocalPostgres]:
    """The replica server for a test session; stopped (it lives in the fleet's directory) afterwards."""
    replica = fleet.server(0).make_replica(REPLICA_NAME)
    try:
        yield replica
    finally:
        replica.stop("immediate")


def ready_replica(primary: LocalPostgres, replica: LocalPostgres) -> None:
    """Running, replaying and caught up with the (freshly reset) primary: each test starts equal."""
    replica.resume()
    conninfo = replica.extra_settings.get("primary_conninfo", "")
    if f"port={primary.port}" not in conninfo:  # an earlier test's restart moved the primary's port
        replica.write_settings({"primary_conninfo": re.sub(r"port=\d+", f"port={primary.port}", conninfo)})
        replica.stop()
    if not replica.is_running():
        replica.start()
        wait_until_accepting(replica.url)
    with _connect(replica.url) as conn:
        conn.execute("SELECT pg_wal_replay_resume()")
        # connections an earlier test left open (an idle transaction's snapshot or lock) would hold
        # replay back for max_standby_streaming_delay: each test starts with none
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    wait_for_replay(primary, replica)


def wait_for_replay(primary: LocalPostgres, replica: LocalPostgres, timeout: float = 30.0) -> None:
    """Block until the replica has replayed everything the primary has written so far."""
    with _connect(primary.url) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        target = row[0]
    deadline = time.monotonic() + timeout
    with _connect(replica.url) as conn:
        while True:
            done = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn "
                "AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
                (target,),
            ).fetchone()
            if done and done[0]:
                return
            if time.monotonic() > deadline:
                receiver = conn.execute("SELECT status, sender_port FROM pg_stat_wal_receiver").fetchall()
                raise TimeoutError(
                    f"replica {replica.name} did not catch up with {target} (primary port {primary.port},"
                    f" wal receiver {receiver}); replica log: {replica._log_tail()[-600:]}"
                )
            time.sleep(0.02)


def pause_replay(replica: LocalPostgres) -> None:
    """Stop applying WAL on the replica (it keeps receiving): a real, controllable lag."""
    with _connect(replica.url) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")


def where(conn: Connection) -> tuple[bool, int]:
    """``(in_recovery, server_port)`` of the server a connection talks to: replica or primary."""
    in_recovery, port = conn.execute(text("SELECT pg_is_in_recovery(), inet_server_port()")).one()
    return bool(in_recovery), int(port)


def manager_with_replica(
    shard_map: dict[str, str], replica: LocalPostgres, *, max_replica_lag: float = 5.0
) -> ShardManager:
    """The shards of ``shard_map``; shard-1 reads from ``replica``, measured on every read."""
    configs = [
        ShardConfig(
            id=shard_id,
            url=url,
            replica_url=replica.url if shard_id == "shard-1" else None,
            max_replica_lag=max_replica_lag,
        )
        for shard_id, url in shard_map.items()
    ]
    manager = ShardManager(configs)
    manager.replicas.check_interval = 0
    return manager


def shard1_key(manager: ShardManager, n: int) -> int:
    """The n-th customer id (0-based) that lives on shard-1."""
    return [k for k in range(1, 200) if manager.shard_for(k) == "shard-1"][n]


def seed_replicated(manager: ShardManager, primary: LocalPostgres, replica: LocalPostgres) -> ShardManager:
    """The demo schema on every shard (and so on the replica), one customer on shard-1, replayed."""
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    with ShardedSession(manager=manager) as session, session.begin():
        session.add(Customer(customer_id=shard1_key(manager, 0), name="replicated"))
    wait_for_replay(primary, replica)
    return manager
