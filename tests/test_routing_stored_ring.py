"""Every process routes by the ring the shards store, with no opt-in (issue 14).

A process configured before an online add (it lacks shard-5) or before a remove (it still lists
shard-5) must route every moved key correctly or raise UnknownShardError naming the shard and the
ring version: for get, keyed select, insert, update, delete, scatter, engine_for,
manager.transaction, the async session and a saga. Where rows really are is checked by querying
each server directly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, func, insert, select, text, update

from sa_shardkit import HashRing, ShardManager, UnknownShardError
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.cli import cli
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.rebalance import add_shard, install_ring, load_ring_state, remove_shard
from sa_shardkit.ring_state import STATE_TABLE
from sa_shardkit.saga import create_saga_tables, sagas_table, transfer
from sa_shardkit.scatter import ALLOW_PARTIAL
from tests.rebalance_data import never_refresh_by_itself, seed

CUSTOMERS = 60
FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
MOVED = [k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) == "shard-5"]
STAYED = [k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) != "shard-5"]
NEW_ON_5 = next(k for k in range(10_000, 20_000) if FIVE.get_shard(k) == "shard-5")


def unlisted(key: int, version: int = 3) -> str:
    return (
        f"ring version {version} places key {key} on shard-5, which this process's configuration "
        "does not list: add shard-5.url"
    )


def customers_on(urls: dict[str, str], key: int) -> dict[str, int]:
    """Rows of customer ``key`` (customers and orders) on each server, asked directly."""
    found = {}
    with ShardManager.from_urls(urls) as direct:
        for shard_id in urls:
            with direct.connect(shard_id) as conn:
                n = conn.execute(
                    text(
                        "SELECT (SELECT count(*) FROM customers WHERE customer_id = :k)"
                        " + (SELECT count(*) FROM orders WHERE customer_id = :k)"
                    ),
                    {"k": key},
                ).scalar_one()
            if n:
                found[shard_id] = n
    return found


@pytest.fixture
def all_urls(shard_map: dict[str, str], shard5_url: str) -> dict[str, str]:
    return {**shard_map, "shard-5": shard5_url}


@pytest.fixture
def after_add(manager: ShardManager, all_urls: dict[str, str]) -> ShardManager:
    """The fleet after ``add shard-5`` ran in an operator process; returns the operator's manager
    (``manager`` is the 4-shard one, as every application process was configured before)."""
    seed(manager, FOUR, CUSTOMERS, 2, 0)
    install_ring(manager, FOUR)
    operator = ShardManager.from_urls(all_urls)
    Base.metadata.create_all(operator.engine("shard-5"))
    create_saga_tables(operator)
    add_shard(operator, "shard-5", Base)
    return operator


@pytest.fixture
def old_config(after_add: ShardManager, shard_map: dict[str, str]) -> Iterator[ShardManager]:
    """A process started after the add from the old, 4-shard configuration."""
    with ShardManager.from_urls(shard_map, connect_timeout=3) as old:
        yield old
    after_add.dispose()


def test_the_add_really_moved_rows_and_stores_no_url(
    after_add: ShardManager, all_urls: dict[str, str]
) -> None:
    state = load_ring_state(after_add)
    assert state is not None and state.version == 3 and state.ring == FIVE
    assert MOVED and all(customers_on(all_urls, k) == {"shard-5": 3} for k in MOVED)
    for shard_id in all_urls:
        with after_add.connect(shard_id) as conn:
            stored = " ".join(str(v) for v in conn.execute(text(f"SELECT * FROM {STATE_TABLE}")).one())
        assert "postgresql" not in stored and "@" not in stored and "127.0.0.1" not in stored


def test_old_config_session_raises_for_moved_keys_and_serves_the_others(
    old_config: ShardManager, all_urls: dict[str, str]
) -> None:
    key, other = MOVED[0], STAYED[0]
    with old_config.sessionmaker()() as session:
        with pytest.raises(UnknownShardError, match=unlisted(key)) as info:
            session.get(Customer, key)
        assert info.value.shard_id == "shard-5"
        with pytest.raises(UnknownShardError, match=unlisted(key)):
            session.scalars(select(Order).where(Order.customer_id == key)).all()
        with pytest.raises(UnknownShardError, match="shard-5"):
            session.scalars(select(Order).where(Order.customer_id.in_([other, key]))).all()
        assert session.get(Customer, other) is not None  # a key that stayed: its own shard
        assert len(session.scalars(select(Order).where(Order.customer_id == other)).all()) == 2
        session.rollback()
        with pytest.raises(UnknownShardError, match=unlisted(key)):
            session.execute(update(Customer).where(Customer.customer_id == key).values(balance=0))
        session.rollback()
        with pytest.raises(UnknownShardError, match=unlisted(key)):
            session.execute(delete(Order).where(Order.customer_id == key))
        session.rollback()
        session.add(Customer(customer_id=NEW_ON_5, name="new"))
        with pytest.raises(UnknownShardError, match=unlisted(NEW_ON_5)):
            session.commit()
        session.rollback()
        with pytest.raises(UnknownShardError, match=unlisted(key)):
            session.execute(insert(Customer), [{"customer_id": key, "name": "again"}])
    assert customers_on(all_urls, key) == {"shard-5": 3}  # untouched, and never on its old shard
    assert customers_on(all_urls, NEW_ON_5) == {}
    old_shard = FOUR.get_shard(key)
    with old_config.connect(old_shard) as conn:  # only the customers that stayed there
        stored = set(conn.execute(select(Customer.customer_id)).scalars())
    assert stored == {k for k in STAYED if FOUR.get_shard(k) == old_shard}


def test_old_config_scatters_name_the_missing_shard_or_report_it(old_config: ShardManager) -> None:
    count = select(func.count()).select_from(Customer)
    with old_config.sessionmaker()() as session:
        with pytest.raises(UnknownShardError, match="ring version 3 places keys on shard-5"):
            session.scalar(count)
        partial = session.execute(count, execution_options={ALLOW_PARTIAL: True})
        assert partial.missing_shards == ("shard-5",)  # type: ignore[attr-defined]
        assert partial.scalar_one() == len(STAYED)
        with pytest.raises(UnknownShardError, match="shard-5"):
            session.execute(update(Customer).values(balance=Customer.balance + 1))
    with pytest.raises(UnknownShardError, match="ring version 3 places keys on shard-5"):
        old_config.query_all_shards(count)
    result = old_config.query_all_shards(count, allow_partial=True)
    assert result.missing_shards == ("shard-5",) and result.scalar_one() == len(STAYED)
    with pytest.raises(UnknownShardError, match="shard-5"):
        old_config.run_on_all("SELECT 1")


def test_old_config_core_paths_raise_for_moved_keys(
    old_config: ShardManager, all_urls: dict[str, str]
) -> None:
    key, other = MOVED[0], STAYED[0]
    with pytest.raises(UnknownShardError, match=unlisted(key)):
        old_config.engine_for(key)
    with pytest.raises(UnknownShardError, match=unlisted(key)):
        old_config.shard_for(key)
    with pytest.raises(UnknownShardError, match=unlisted(key)):
        with old_config.transaction(key) as conn:
            conn.execute(insert(Customer.__table__), {"customer_id": key, "name": "dup"})
    with old_config.transaction(other) as conn:
        conn.execute(update(Customer.__table__).where(Customer.customer_id == other).values(name="seen"))
    assert customers_on(all_urls, key) == {"shard-5": 3}
    with old_config.connect(FIVE.get_shard(other)) as conn:
        assert conn.execute(select(Customer.name).where(Customer.customer_id == other)).scalar_one() == "seen"


def test_old_config_async_session_raises_for_moved_keys(old_config: ShardManager) -> None:
    async def run() -> None:
        async with AsyncShardManager(old_config) as shards:
            async with shards.sessionmaker()() as session:
                with pytest.raises(UnknownShardError, match=unlisted(MOVED[0])):
                    await session.get(Customer, MOVED[0])
                assert await session.get(Customer, STAYED[0]) is not None
                with pytest.raises(UnknownShardError, match="shard-5"):
                    await session.scalar(select(func.count()).select_from(Customer))
            with pytest.raises(UnknownShardError, match="shard-5"):
                await shards.query_all_shards(select(func.count()).select_from(Customer))

    asyncio.run(run())


def test_old_config_saga_refuses_before_anything_is_recorded(old_config: ShardManager) -> None:
    sender, receiver = STAYED[0], MOVED[0]
    saga_id = next(f"t-{n}" for n in range(100) if FIVE.get_shard(f"t-{n}") != "shard-5")  # its log's home
    with pytest.raises(UnknownShardError, match=unlisted(receiver)):
        transfer(old_config, sender, receiver, 5, transfer_id=saga_id)
    for shard_id in old_config.shard_ids:
        with old_config.connect(shard_id) as conn:
            assert conn.execute(select(func.count()).select_from(sagas_table)).scalar_one() == 0
            if FIVE.get_shard(sender) == shard_id:
                balance = conn.execute(select(Customer.balance).where(Customer.customer_id == sender))
                assert balance.scalar_one() == Decimal(100)


def test_a_process_running_since_before_the_add_is_stopped_too(
    manager: ShardManager, shard_map: dict[str, str], all_urls: dict[str, str]
) -> None:
    """It routed by the stored 4-shard ring (version 1) before the move; no opt-in, no restart."""
    seed(manager, FOUR, CUSTOMERS, 2, 0)
    install_ring(manager, FOUR)
    key = MOVED[0]
    with ShardManager.from_urls(shard_map, refresh_seconds=3600) as old:  # no periodic re-read
        never_refresh_by_itself(old)
        sessions = old.sessionmaker()
        with sessions() as session:
            assert session.get(Customer, key) is not None
        assert old.placement.state.version == 1
        with ShardManager.from_urls(all_urls) as operator:
            add_shard(operator, "shard-5", Base)
        with sessions() as session:  # the empty read on the old shard finds the new version
            with pytest.raises(UnknownShardError, match=unlisted(key)):
                session.get(Customer, key)
        with sessions() as session:
            assert session.get(Customer, STAYED[0]) is not None
    assert customers_on(all_urls, key) == {"shard-5": 3}


def test_a_writer_running_since_before_the_add_is_fenced_off_the_old_shard(
    manager: ShardManager, shard_map: dict[str, str], all_urls: dict[str, str]
) -> None:
    seed(manager, FOUR, CUSTOMERS, 2, 0)
    install_ring(manager, FOUR)
    with ShardManager.from_urls(shard_map, refresh_seconds=3600) as old:
        never_refresh_by_itself(old)
        assert old.shard_for(NEW_ON_5) == FOUR.get_shard(NEW_ON_5)  # version 1 read
        with ShardManager.from_urls(all_urls) as operator:
            add_shard(operator, "shard-5", Base)
        with old.sessionmaker()() as session:  # routed by version 1: the fence stops the flush
            session.add(Customer(customer_id=NEW_ON_5, name="late"))
            with pytest.raises(UnknownShardError, match=unlisted(NEW_ON_5)):
                session.commit()
    assert customers_on(all_urls, NEW_ON_5) == {}


# -- after a remove ------------------------------------------------------------------------------


@pytest.fixture
def after_remove(all_urls: dict[str, str]) -> Iterator[ShardManager]:
    """Five shards, then ``remove shard-5`` in an operator process; yields a process started
    afterwards from the old five-shard configuration."""
    with ShardManager.from_urls(all_urls) as operator:
        seed(operator, FIVE, CUSTOMERS, 2, 0)
        create_saga_tables(operator)
        install_ring(operator, FIVE)
        remove_shard(operator, "shard-5", Base)
    with ShardManager.from_urls(all_urls, connect_timeout=3) as old:
        yield old


def test_old_config_after_a_remove_routes_every_moved_key_to_its_new_shard(
    after_remove: ShardManager, all_urls: dict[str, str]
) -> None:
    old = after_remove
    key, receiver = MOVED[0], MOVED[1]
    assert customers_on(all_urls, key) == {FOUR.get_shard(key): 3}
    sessions = old.sessionmaker()
    with sessions() as session, session.begin():
        customer = session.get(Customer, key)
        assert customer is not None
        customer.name = "moved and found"
        assert len(session.scalars(select(Order).where(Order.customer_id == key)).all()) == 2
    with sessions() as session, session.begin():
        session.add(Customer(customer_id=NEW_ON_5, name="new"))
    with sessions() as session, session.begin():
        session.execute(delete(Order).where(Order.customer_id == receiver))
    with old.sessionmaker()() as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == CUSTOMERS + 1
    assert old.query_all_shards(select(func.count()).select_from(Order)).scalar_one() == 2 * CUSTOMERS - 2
    assert old.engine_for(key) is old.engine(FOUR.get_shard(key))
    with old.transaction(key) as conn:
        conn.execute(update(Customer.__table__).where(Customer.customer_id == key).values(balance=7))
    assert transfer(old, key, STAYED[0], 2, transfer_id="t-after-remove").succeeded

    async def read_async() -> Customer | None:
        async with AsyncShardManager(old) as shards, shards.sessionmaker()() as session:
            return await session.get(Customer, key)

    found = asyncio.run(read_async())
    assert found is not None and found.balance == Decimal(5)
    for k, rows in ((key, 3), (NEW_ON_5, 1), (receiver, 1)):
        assert customers_on(all_urls, k) == {FOUR.get_shard(k): rows}  # never on shard-5
    with old.connect("shard-5") as conn:
        assert conn.execute(select(func.count()).select_from(Customer)).scalar_one() == 0


# -- shardkit status -------------------------------------------------------------------------------


def test_shardkit_status_with_the_old_config_names_the_shard_it_lacks(
    after_add: ShardManager, shard_urls: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini here: migrations are not judged
    url_args = [arg for url in shard_urls for arg in ("--url", url)]
    result = CliRunner().invoke(cli, ["status", *url_args], terminal_width=200)
    after_add.dispose()
    assert result.exit_code == 1
    assert "ring version 3 is stored on the shards" in result.output
    assert "shard-5" in result.output and "NOT CONFIGURED" in result.output
    assert "add shard-5.url" in result.output
    report = json.loads(CliRunner().invoke(cli, ["status", "--json", *url_args]).stdout)
    assert report["ring_version"] == 3 and report["unlisted_shards"] == ["shard-5"]
    assert [n["shard_id"] for n in report["nodes"]] == [*FOUR.shard_ids, "shard-5"]
    assert report["total_rows"] == 3 * len(STAYED) + 1 * 4 and not report["counts_complete"]  # + products


def test_shardkit_status_without_a_stored_ring_says_so(
    manager: ShardManager, shard_urls: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    seed(manager, FOUR, CUSTOMERS, 2, 0)
    url_args = [arg for url in shard_urls for arg in ("--url", url)]
    result = CliRunner().invoke(cli, ["status", *url_args], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "no ring is stored on the shards" in result.output
    assert f"fleet total: {3 * CUSTOMERS + 4:,} rows" in result.output
