"""Safety before the first ring is stored does not depend on timing (issue 14).

A process that has never seen a stored ring, and would not look for one for an hour, writes while
an operator stores the first ring and adds a shard. Every write transaction of such a process checks,
in its own transaction, that no ring is stored on the shard it writes (and adopts it when one is);
the first install waits for every transaction that began before it. So after an online add, its
writes of moved keys land on their new shard, and a write it had open during the install moves
with its key. Where rows are is checked by querying each server directly.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import insert, text, update

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.errors import StaleRingError
from sa_shardkit.placement import RECHECK_ENV
from sa_shardkit.rebalance import add_shard
from sa_shardkit.ring_state import STATE_TABLE
from sa_shardkit.saga import commit_across_keys, create_saga_tables
from tests.rebalance_data import seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS = 60
MOVED = next(
    k for k in range(1, CUSTOMERS) if FOUR.get_shard(k) == "shard-1" and FIVE.get_shard(k) == "shard-5"
)


def rows_of(urls: dict[str, str], key: int) -> dict[str, tuple[int, int, Any]]:
    """Per server: (customers, orders, balance) of customer ``key``, asked directly."""
    found = {}
    with ShardManager.from_urls(urls) as direct:
        for shard_id in urls:
            with direct.connect(shard_id) as conn:
                row = conn.execute(
                    text(
                        "SELECT (SELECT count(*) FROM customers WHERE customer_id = :k),"
                        " (SELECT count(*) FROM orders WHERE customer_id = :k),"
                        " (SELECT balance FROM customers WHERE customer_id = :k)"
                    ),
                    {"k": key},
                ).one()
            if any(row[:2]):
                found[shard_id] = tuple(row)
    return found


def new_order(n: int = 1) -> dict[str, Any]:
    return {"customer_id": MOVED, "order_id": uuid.UUID(int=n), "status": "new", "total": Decimal(1)}


def orm_flush(process: ShardManager) -> None:
    with process.sessionmaker()() as session, session.begin():
        session.add(Order(**new_order()))


def core_through_session(process: ShardManager) -> None:
    with process.sessionmaker()() as session, session.begin():
        session.execute(insert(Order).values(**new_order()))


def manager_transaction(process: ShardManager) -> None:
    with process.transaction(MOVED) as conn:
        conn.execute(insert(Order).values(**new_order()))


def two_phase_by_key(process: ShardManager) -> None:
    commit_across_keys(process, {MOVED: lambda conn: conn.execute(insert(Order).values(**new_order()))})


WRITES: dict[str, Callable[[ShardManager], None]] = {
    "orm flush": orm_flush,
    "core through the session": core_through_session,
    "manager.transaction": manager_transaction,
    "2pc by key": two_phase_by_key,
}


@pytest.fixture
def urls(shard_map: dict[str, str], shard5_url: str) -> dict[str, str]:
    return {**shard_map, "shard-5": shard5_url}


@pytest.fixture
def never_looks(
    manager: ShardManager, urls: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[ShardManager]:
    """An application process (it knows every shard's URL) that has seen no stored ring and would
    not look for one for an hour: only its writes' own checks can tell it."""
    seed(manager, FOUR, CUSTOMERS, 2, 0)
    with ShardManager.from_urls(urls) as operator:
        Base.metadata.create_all(operator.engine("shard-5"))
        create_saga_tables(operator)
    monkeypatch.setenv(RECHECK_ENV, "3600")
    with ShardManager.from_urls(urls, refresh_seconds=3600) as process:
        process.set_ring(FOUR)  # configured before shard-5 joins the ring
        assert process.placement.refresh().version == 0
        yield process


def retried(write: Callable[[], None]) -> None:
    """A flush that met the new ring in its fence raises StaleRingError (nothing written): retry."""
    try:
        write()
    except StaleRingError as stale:
        assert stale.shard_id == "shard-5"
        write()


@pytest.mark.parametrize("write", list(WRITES))
def test_a_process_that_never_looks_writes_moved_keys_on_their_new_shard(
    never_looks: ShardManager, urls: dict[str, str], write: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        RECHECK_ENV, "0.2"
    )  # the operator's own process (the tests' horizon: its move waits it out)
    with ShardManager.from_urls(urls) as operator:
        add_shard(operator, "shard-5", Base)  # stores the 4-shard ring first, then moves keys
    assert rows_of(urls, MOVED) == {"shard-5": (1, 2, Decimal(100))}
    assert never_looks.placement.state.version == 0  # it has not looked
    retried(lambda: WRITES[write](never_looks))
    assert rows_of(urls, MOVED) == {"shard-5": (1, 3, Decimal(100))}  # nothing on shard-1
    assert never_looks.placement.state.version == 3


def test_the_first_install_waits_for_a_write_that_began_before_it(
    never_looks: ShardManager,
    urls: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RECHECK_ENV, "0.2")
    caplog.set_level(logging.INFO, logger="sa_shardkit.rebalance")
    errors: list[BaseException] = []

    def operator_adds() -> None:
        try:
            with ShardManager.from_urls(urls) as operator:
                add_shard(operator, "shard-5", Base)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    adder = threading.Thread(target=operator_adds, daemon=True)
    with never_looks.transaction(MOVED) as conn:  # routed by the configured ring: unfenced, on shard-1
        conn.execute(update(Customer).where(Customer.customer_id == MOVED).values(balance=7))
        conn.execute(insert(Order).values(**new_order()))
        adder.start()
        deadline = time.monotonic() + 60  # a hang guard, not a speed bound
        while "began before the ring was stored" not in caplog.text and adder.is_alive():
            assert time.monotonic() < deadline, "the install did not wait for the open transaction"
            time.sleep(0.05)
        assert adder.is_alive()
        with ShardManager.from_urls(urls) as direct, direct.connect("shard-1") as check:
            assert check.execute(text(f"SELECT version FROM {STATE_TABLE}")).scalar() == 1  # nothing moving
    adder.join(120)
    assert not adder.is_alive() and not errors
    assert rows_of(urls, MOVED) == {"shard-5": (1, 3, Decimal(7))}  # the write moved with its key
