"""Statements the scatter ownership filter used to miss, in the crash window of a remove (the real
CLI mover SIGKILLed after a batch's targets committed and before its source did: that batch's
rows are on two shards): nested SELECTs (derived tables, CTEs, unions, IN subqueries), UPDATE /
DELETE that name no shard key, SQL text, and a process whose ring check is slow (its probe shard
frozen with SIGSTOP). Each sees or changes every row exactly once, or is refused by name; then
``--resume`` finishes the move and every server is read directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, func, select, text, union_all, update

from sa_shardkit import HashRing, NotShardedError, ShardManager, UnfilteredScatterError
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.demo.models import Customer, Order
from sa_shardkit.placement import Placement
from sa_shardkit.rebalance import install_ring
from tests.fleet import TestFleet
from tests.rebalance_data import CUSTOMERS as CUSTOMERS_TABLE
from tests.rebalance_data import check_fleet, order_id, rows_everywhere, seed
from tests.rebalance_kill import kill_mover_at, url_args

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
REMOVED = FOUR.remove_shard("shard-2")
CUSTOMERS, ORDERS_EACH = 400, 2
EVERYONE = list(range(1, CUSTOMERS + 1))


@pytest.fixture
def crash_window(manager: ShardManager) -> Iterator[dict[str, str]]:
    """The fleet in a remove's crash window (some customers on two shards); ``--resume`` after."""
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    argv = [*url_args(manager, FOUR.shard_ids), "--remove", "shard-2", "--batch-size", "15"]
    kill_mover_at(
        argv, {"sql": "SET watermark", "nth": 2, "port": manager.config("shard-2").primary_url.port}
    )
    copies = rows_everywhere(manager, list(FOUR.shard_ids))
    assert any(n == 2 for n in copies["customers"].values()), "the crash window is real"
    yield {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    resumed = CliRunner().invoke(rebalance_command, [*url_args(manager, FOUR.shard_ids), "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_nested_selects_see_each_row_once(manager: ShardManager, crash_window: dict[str, str]) -> None:
    with ShardManager.from_urls(crash_window) as reader, reader.sessionmaker()() as session:
        derived = select(Customer.customer_id).subquery()
        assert session.scalar(select(func.count()).select_from(derived)) == CUSTOMERS
        cte = select(Customer.customer_id, Customer.name).cte("everyone")
        assert sorted(session.scalars(select(cte.c.customer_id)).all()) == EVERYONE
        both = union_all(
            select(Customer.customer_id), select(Customer.customer_id).where(Customer.name == "none")
        )
        assert sorted(session.scalars(both).all()) == EVERYONE
        orders = select(Order.order_id).where(Order.customer_id.in_(select(Customer.customer_id)))
        assert len(session.scalars(orders).all()) == CUSTOMERS * ORDERS_EACH
        core = reader.query_all_shards(select(func.count()).select_from(select(CUSTOMERS_TABLE).subquery()))
        assert sum(core.scalars().all()) == CUSTOMERS


def test_update_and_delete_naming_no_key_change_each_row_once(
    manager: ShardManager, crash_window: dict[str, str]
) -> None:
    gone = order_id(7, 1)
    with ShardManager.from_urls(crash_window) as writer, writer.sessionmaker()() as session:
        with session.begin():
            updated = session.execute(
                update(Customer).values(balance=Customer.balance + 1).returning(Customer.customer_id)
            )
            assert sorted(updated.scalars().all()) == EVERYONE
            deleted = session.execute(delete(Order).where(Order.order_id == gone))
            assert deleted.rowcount == 1  # type: ignore[attr-defined]
        with session.begin():
            counted = session.execute(update(Customer).values(name=Customer.name))
            assert counted.rowcount == CUSTOMERS  # type: ignore[attr-defined]
    resumed = CliRunner().invoke(rebalance_command, [*url_args(manager, FOUR.shard_ids), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    found = rows_everywhere(manager, list(FOUR.shard_ids))
    assert sorted(pk for (pk,) in found["customers"]) == EVERYONE and set(found["customers"].values()) == {1}
    assert not any(oid == gone for _, oid in found["orders"])
    for shard_id in FOUR.shard_ids:  # every balance got the increment once, wherever it lives now
        with manager.connect(shard_id) as conn:
            assert set(conn.execute(select(Customer.__table__.c.balance)).scalars()) <= {Decimal(101)}
    check_fleet(manager, REMOVED, None, CUSTOMERS * ORDERS_EACH - 1)


def test_sql_text_reading_a_sharded_table_is_refused_by_name(
    manager: ShardManager, crash_window: dict[str, str]
) -> None:
    with ShardManager.from_urls(crash_window) as reader, reader.sessionmaker()() as session:
        with pytest.raises(NotShardedError):  # the session never scatters text: it needs a shard_id
            session.execute(text("SELECT count(*) FROM customers"))
        with pytest.raises(NotShardedError):  # nor from_statement()
            session.scalars(select(Customer).from_statement(text("SELECT * FROM customers"))).all()
        with pytest.raises(UnfilteredScatterError, match="'orders'"):
            reader.query_all_shards("select o.order_id from public.orders o")
        with pytest.raises(UnfilteredScatterError):
            reader.query_all_shards(text('WITH x AS (SELECT 1) SELECT * FROM "customers"'))
        # text that reads no sharded table runs as before
        assert len(reader.query_all_shards("SELECT 1 AS one").all()) == len(FOUR.shard_ids)


def test_a_scatter_whose_ring_check_is_slow_waits_for_it(
    manager: ShardManager, pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    """A reader read the ring (version 1) before the remove started. Its next check probes
    shard-1, frozen (SIGSTOP) in the crash window for longer than routing waits for a check
    (0.5 s): the scatter must not go by version 1 unfiltered (it would see the copies on the
    targets beside their originals on shard-2)."""
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    with ShardManager.from_urls(shard_map) as reader:
        reader.placement.refresh()
        assert reader.placement.state.version == 1
        argv = [*url_args(manager, FOUR.shard_ids), "--remove", "shard-2", "--batch-size", "15"]
        port = manager.config("shard-2").primary_url.port
        kill_mover_at(argv, {"sql": "SET watermark", "nth": 2, "port": port})
        assert any(n == 2 for n in rows_everywhere(manager, list(FOUR.shard_ids))["customers"].values())
        time.sleep(0.3)  # past the recheck horizon (0.2 s in the tests): the reader's ring is old
        probe = pg_fleet.server(0)
        seen: list[Any] = []
        errors: list[BaseException] = []

        def scatter() -> None:
            try:
                with reader.sessionmaker()() as session:
                    seen.extend(session.scalars(select(Customer.customer_id)).all())
            except BaseException as error:  # noqa: BLE001 - reported by the test
                errors.append(error)

        probe.pause()
        try:
            worker = threading.Thread(target=scatter)
            worker.start()
            time.sleep(1.5)  # > REFRESH_WAIT_SECONDS: routing stopped waiting for the check
        finally:
            probe.resume()
        worker.join(timeout=120)
        assert not errors, errors
        assert sorted(seen) == EVERYONE, (len(seen), len(set(seen)), reader.placement.state.version)
        assert reader.placement.state.version == 2
    resumed = CliRunner().invoke(rebalance_command, [*url_args(manager, FOUR.shard_ids), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    check_fleet(manager, REMOVED, None, CUSTOMERS * ORDERS_EACH)


def test_async_scatters_in_the_crash_window_see_each_row_once(
    manager: ShardManager, crash_window: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AsyncSession's scatter with the sources' fences held from its first try (the locked
    fallback a scatter takes after OPTIMISTIC_SCATTERS cut-overs raced it), and
    ``AsyncShardManager.query_all_shards`` (it had no ownership filter)."""
    import sa_shardkit.session as session_module

    monkeypatch.setattr(session_module, "OPTIMISTIC_SCATTERS", 0)
    held: list[int] = []
    original = Placement._hold_marks

    def counting(self: Placement, *args: Any) -> Any:
        held.append(1)
        return original(self, *args)

    monkeypatch.setattr(Placement, "_hold_marks", counting)

    async def main() -> tuple[list[int], int, list[int]]:
        with ShardManager.from_urls(crash_window) as reader:
            async with AsyncShardManager(reader) as shards:
                async with shards.sessionmaker()() as session:
                    ids = list((await session.scalars(select(Customer.customer_id))).all())
                    count = await session.scalar(select(func.count()).select_from(Customer))
                core = await shards.query_all_shards(select(Customer.customer_id))
                with pytest.raises(UnfilteredScatterError):
                    await shards.query_all_shards("SELECT customer_id FROM customers")
                return ids, int(count or 0), list(core.scalars().all())

    ids, count, core = asyncio.run(main())
    assert held, "the scatter took the locked path"
    assert sorted(ids) == EVERYONE and count == CUSTOMERS
    assert sorted(core) == EVERYONE
