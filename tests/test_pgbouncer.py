"""PgBouncer (transaction pooling) in front of every shard: sessions, scatters, sagas, migrations.

Each of the four test servers gets a real ``pgbouncer`` process (started from a generated ini, as
the postgres user, by :class:`sa_shardkit.testing.LocalPgBouncer`); the shards are configured with
``pgbouncer=True`` and ``direct_url`` = the server itself, as docs/operations/scale.md says to.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select, text
from sqlalchemy.exc import ProgrammingError

from sa_shardkit import ConfigError, HashRing, ShardConfig, ShardManager
from sa_shardkit.alembic import MIGRATION_LOCK_ID
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.rebalance import MoveOptions, RingRouter, install_ring, remove_shard
from sa_shardkit.saga import commit_across_shards, transfer
from sa_shardkit.testing import LocalPgBouncer, find_pgbouncer
from tests.alembic_support import AlembicProject, revision_on
from tests.fleet import TestFleet, _connect
from tests.rebalance_data import Workload, check_fleet, seed
from tests.saga_support import balances, cross_shard_pair, open_accounts

POOL_SIZE = 2  # server connections per database behind each PgBouncer


@pytest.fixture(scope="module")
def bouncers(pg_fleet: TestFleet) -> Iterator[list[LocalPgBouncer]]:
    if find_pgbouncer() is None:
        message = (
            "PGBOUNCER TESTS SKIPPED: no pgbouncer binary (apt-get install pgbouncer; .ci/run installs "
            "it, or set SHARDKIT_PGBOUNCER)"
        )
        print(f"\n{'!' * 20} {message} {'!' * 20}", file=sys.stderr)
        pytest.skip(message)
    started = [LocalPgBouncer(pg_fleet.server(i), pool_size=POOL_SIZE) for i in range(4)]
    try:
        yield started
    finally:
        for bouncer in started:
            bouncer.stop()


def configs(bouncers: list[LocalPgBouncer], shard_urls: list[str], **options: object) -> list[ShardConfig]:
    return [
        ShardConfig(id=f"shard-{i}", url=b.url(), direct_url=u, connect_timeout=3, **options)  # type: ignore[arg-type]
        for i, (b, u) in enumerate(zip(bouncers, shard_urls, strict=True), 1)
    ]


@pytest.fixture
def bounced(bouncers: list[LocalPgBouncer], shard_urls: list[str]) -> Iterator[ShardManager]:
    """The four reset shards, every connection through PgBouncer in transaction pooling mode."""
    with ShardManager(configs(bouncers, shard_urls, pgbouncer=True)) as manager:
        yield manager


def hammer(manager: ShardManager) -> None:
    """The same statements 10 times on 16 connections at once: past psycopg's prepare threshold (5)."""

    def work(_: int) -> None:
        with manager.connect("shard-1") as conn:
            for n in range(10):
                with conn.begin():
                    assert conn.execute(text("SELECT :n"), {"n": n}).scalar() == n
                    assert conn.execute(text("SELECT cast(:n AS text)"), {"n": str(n)}).scalar() == str(n)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))


def test_prepared_statements_are_off_for_pgbouncer_shards(bounced: ShardManager) -> None:
    hammer(bounced)  # would fail as below without pgbouncer=True


def test_without_the_option_psycopg_prepared_statements_break_under_transaction_pooling(
    bouncers: list[LocalPgBouncer], shard_urls: list[str]
) -> None:
    with ShardManager(configs(bouncers, shard_urls)) as plain:  # the same URLs, pgbouncer=False
        with pytest.raises(ProgrammingError, match="prepared statement"):
            hammer(plain)


def test_session_writes_reads_and_scatters_through_pgbouncer(
    bounced: ShardManager, shard_urls: list[str]
) -> None:
    for shard_id in bounced.shard_ids:
        with bounced.connect_direct(shard_id) as conn, conn.begin():
            Base.metadata.create_all(conn)
    factory = bounced.sessionmaker()
    for customer_id in range(1, 41):
        with factory() as session, session.begin():
            session.add(Customer(customer_id=customer_id, name=f"c{customer_id}"))
            session.add(
                Order(
                    customer_id=customer_id, order_id=uuid.uuid4(), status="new", total=Decimal(customer_id)
                )
            )
    with factory() as session:
        for customer_id in range(1, 41):  # keyed reads, the same statements again and again
            assert session.get(Customer, customer_id) is not None
            assert len(session.scalars(select(Order).where(Order.customer_id == customer_id)).all()) == 1
        top = session.scalars(select(Order.customer_id).order_by(Order.total.desc()).limit(3)).all()
        assert top == [40, 39, 38]
        assert session.scalar(select(func.count()).select_from(Order)) == 40
    assert sum(row.n for row in bounced.query_all_shards("SELECT count(*) AS n FROM customers")) == 40
    for i, url in enumerate(shard_urls, 1):  # where the rows physically are: each on its ring shard
        with _connect(url) as conn:
            ids = [r[0] for r in conn.execute("SELECT customer_id FROM customers").fetchall()]
        assert ids and all(bounced.shard_for(k) == f"shard-{i}" for k in ids)


def test_pgbouncer_bounds_the_server_connections_of_a_wide_scatter(
    bounced: ShardManager, shard_urls: list[str]
) -> None:
    def work(_: int) -> int:
        return len(bounced.query_all_shards("SELECT pg_sleep(0.2)").all())

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(work, range(6))) == [4] * 6  # 6 concurrent scatters x 4 shards
    with _connect(shard_urls[0]) as conn:
        servers = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres' AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        ).fetchone()
    assert servers is not None and servers[0] <= POOL_SIZE


def test_saga_and_two_phase_commit_through_pgbouncer(bounced: ShardManager) -> None:
    for shard_id in bounced.shard_ids:
        with bounced.connect_direct(shard_id) as conn, conn.begin():
            Base.metadata.create_all(conn)
    initial = open_accounts(bounced)
    sender, receiver = cross_shard_pair(bounced)
    outcome = transfer(bounced, sender, receiver, "12.50", transfer_id="bounced-1")
    assert outcome.succeeded
    after = balances(bounced)
    assert after[sender] == initial[sender] - Decimal("12.50")
    assert after[receiver] == initial[receiver] + Decimal("12.50")

    def credit(customer_id: int) -> object:
        def work(conn: object) -> None:
            conn.execute(  # type: ignore[attr-defined]
                text("UPDATE customers SET balance = balance + 1 WHERE customer_id = :c"), {"c": customer_id}
            )

        return work

    commit_across_shards(
        bounced,
        {bounced.shard_for(sender): credit(sender), bounced.shard_for(receiver): credit(receiver)},  # type: ignore[dict-item]
    )
    final = balances(bounced)
    assert (final[sender], final[receiver]) == (after[sender] + 1, after[receiver] + 1)


def test_migrations_use_the_direct_url_and_refuse_pgbouncer_without_one(
    tmp_path: Path, bouncers: list[LocalPgBouncer], shard_map: dict[str, str]
) -> None:
    bounced_map = {s: bouncers[i].url() for i, s in enumerate(shard_map)}
    project = AlembicProject(tmp_path, bounced_map)
    ini = project.ini.read_text()
    extra = "".join(f"{s}.pgbouncer = true\n" for s in shard_map)
    project.ini.write_text(ini.replace("shard-1.url", extra + "shard-1.url", 1))
    with pytest.raises(Exception, match="shard-1.direct_url") as info:
        command.upgrade(project.config(), "head")
    assert isinstance(info.value, ConfigError) or "direct_url" in str(info.value)
    assert all(revision_on(url) == () for url in shard_map.values())

    direct = "".join(f"{s}.direct_url = {url}\n" for s, url in shard_map.items())
    project.ini.write_text(ini.replace("shard-1.url", extra + direct + "shard-1.url", 1))
    command.upgrade(project.config(), "head")
    assert all(revision_on(url) == (project.head,) for url in shard_map.values())
    with _connect(shard_map["shard-1"]) as conn:  # the session-level migration lock was released
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
            (MIGRATION_LOCK_ID,),
        ).fetchone()
    assert held is not None and held[0] == 0


def test_direct_connections_bypass_pgbouncer_only_when_configured(
    bouncers: list[LocalPgBouncer], shard_urls: list[str]
) -> None:
    alone = [ShardConfig(id="shard-1", url=bouncers[0].url(), pgbouncer=True)]
    with ShardManager(alone) as no_direct, pytest.raises(ConfigError, match="PgBouncer.*shard-1.direct_url"):
        no_direct.connect_direct("shard-1")
    with ShardManager(configs(bouncers, shard_urls, pgbouncer=True)) as manager:
        with manager.connect_direct("shard-2") as conn:  # a session of its own on the server
            conn.execute(text("SELECT pg_advisory_lock(4242)"))
            with manager.connect("shard-2") as other:  # through PgBouncer: another server session
                assert other.execute(text("SELECT pg_try_advisory_lock(4242)")).scalar() is False
                other.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(4242)"))
        assert manager.engine("shard-2").url.port == bouncers[1].port


def test_removing_a_shard_under_load_through_pgbouncer(bounced: ShardManager) -> None:
    """The fence and the mover's batches run through PgBouncer; its session lock on direct_url."""
    ring = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
    seed(bounced, ring, 200, 3, 1)
    install_ring(bounced, ring)
    router = RingRouter(bounced)
    workload = Workload(router, 200, 3)
    workload.start()
    time.sleep(0.3)
    try:
        result = remove_shard(bounced, "shard-3", Base, options=MoveOptions(batch_size=40))
    finally:
        workload.finish()
    assert not workload.errors, workload.errors[:5]
    assert result.new == ring.remove_shard("shard-3")
    check_fleet(bounced, result.new, workload, 0)
    with bounced.connect("shard-3") as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar() == 0


def test_the_unstored_ring_check_rides_on_begin_through_pgbouncer(bounced: ShardManager) -> None:
    """The check a write transaction sends with its BEGIN (sa_shardkit.fused_begin) must not use a
    server-side prepared statement behind PgBouncer: the next transaction of the same client may run
    on another server connection (no such statement), or another client on the one that has it
    ('already exists'). Either failed the fused BEGIN and cost an error and a second round trip."""
    from sa_shardkit.fused_begin import first_value_with_begin
    from sa_shardkit.ring_state import _COMMITTED_BYTES

    engine = bounced.engines["shard-1"]
    answers: list[bytes | None] = []
    with engine.connect() as first, engine.connect() as second:
        for _ in range(6):  # alternate two clients over PgBouncer's two server connections
            for conn in (first, second):
                with conn.begin():
                    answers.append(
                        first_value_with_begin(conn, b"shardkit_state_table_committed", _COMMITTED_BYTES)
                    )
    assert None not in answers, f"{answers.count(None)} of {len(answers)} fused BEGINs fell back"
