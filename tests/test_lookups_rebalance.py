"""Rebalancing moves lookup rows with their value's ring position, and lookup-routed reads stay
exact throughout.

For an online add and an online remove (each under a concurrent writer and reader), and for a real
CLI mover SIGKILLed mid-way through moving the lookup rows and finished by ``--resume``:

* during the move, every committed order is found by ``order_id ==``, by ``.in_``, by
  ``session.get`` (order_id is the primary key) and every committed customer by its unique email,
  each statement sent to one of the key's shards only (never a scatter);
* afterwards, every lookup row sits on the shard its value hashes to in the new ring (each server
  is read directly), exactly one per owning row, and the lookup is trusted without a rebuild:
  every read goes to exactly the owner's shard and finds its row.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from sa_shardkit import HashRing, ShardConfig, ShardManager, StaleRingError
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.lookups import lookup_named
from sa_shardkit.lookups.build import create_lookup_tables, repair_lookup
from sa_shardkit.lookups.store import forget_readiness, is_ready
from sa_shardkit.rebalance import (
    FleetView,
    MoveOptions,
    RebalanceResult,
    RingState,
    add_shard,
    install_ring,
    read_fleet_state,
    remove_shard,
)
from sa_shardkit.rebalance.catalog import create_state_table, load_ring_state, write_state
from tests.lookup_models import Base, LkCustomer, LkOrder, create_schema
from tests.rebalance_kill import ROOT, kill_mover_at, url_args
from tests.test_lookups import entries

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
ORDERS, EMAILS = "LkOrder.order_id", "LkCustomer.email"


class Fleet:
    """What was committed: order_id -> customer_id, email -> customer_id (grows under the writer)."""

    def __init__(self) -> None:
        self.orders: dict[int, int] = {}
        self.emails: dict[str, int] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    def write(self, manager: ShardManager, customers: int = 1, orders_each: int = 2) -> None:
        for _ in range(customers):  # one transaction per customer (one shard each)
            cid = next(self.ids)
            email = f"c{cid}@example.com"
            for attempt in range(5):
                try:
                    with manager.sessionmaker()() as session:
                        orders = [LkOrder(customer_id=cid) for _ in range(orders_each)]
                        session.add(LkCustomer(customer_id=cid, email=email))
                        session.add_all(orders)
                        session.commit()
                        made = {o.order_id: cid for o in orders}
                except StaleRingError:  # a cut-over of this key under the flush: roll back, retry
                    if attempt == 4:
                        raise
                    continue
                with self.lock:
                    self.emails[email] = cid
                    self.orders.update(made)
                break

    def snapshot(self) -> tuple[dict[int, int], dict[str, int]]:
        with self.lock:
            return dict(self.orders), dict(self.emails)


def _check_reads(manager: ShardManager, fleet: Fleet, wrong: list[str], sample: int = 1) -> int:
    """One round of lookup-routed reads of committed rows; returns the statements checked."""
    orders, emails = fleet.snapshot()
    sent: dict[int, list[str]] = {}
    me = threading.get_ident()

    def record(event: Any) -> None:
        if threading.get_ident() == me and (
            "FROM lk_orders" in event.statement or "FROM lk_customers" in event.statement
        ):
            sent.setdefault(me, []).append(event.shard_id)

    manager.events.add(record)
    checked = 0

    def shards_of(key: int) -> set[str]:
        state = manager.placement.state
        return {state.ring.get_shard(key), *([state.target.get_shard(key)] if state.target else [])}

    def expect(what: str, key_set: set[int], found: list[int], wanted: list[int]) -> None:
        nonlocal checked
        went = sent.pop(me, [])
        allowed = set().union(*(shards_of(k) for k in key_set))
        if sorted(found) != sorted(wanted):
            wrong.append(f"{what}: found {found}, expected {wanted}")
        if not went or not set(went) <= allowed or len(went) > 2 * len(allowed):
            wrong.append(f"{what}: sent to {went}, the keys' shards are {sorted(allowed)}")
        checked += 1

    try:
        maker = manager.sessionmaker()
        with maker() as session:
            for order_id, cid in list(orders.items())[::sample]:
                found = [
                    o.customer_id
                    for o in session.scalars(select(LkOrder).where(LkOrder.order_id == order_id))
                ]
                expect(f"order_id == {order_id}", {cid}, found, [cid])
                session.expunge_all()
                got = session.get(LkOrder, order_id)
                expect(f"get(LkOrder, {order_id})", {cid}, [got.customer_id] if got else [], [cid])
                session.expunge_all()
            some = list(orders.items())[:: max(1, len(orders) // 6)][:6]
            if some:
                found = [
                    o.order_id
                    for o in session.scalars(
                        select(LkOrder).where(LkOrder.order_id.in_([o for o, _ in some]))
                    )
                ]
                expect("order_id.in_", {c for _, c in some}, found, [o for o, _ in some])
                session.expunge_all()
            for email, cid in list(emails.items())[::sample]:
                found = [
                    c.customer_id
                    for c in session.scalars(select(LkCustomer).where(LkCustomer.email == email))
                ]
                expect(f"email == {email}", {cid}, found, [cid])
                session.expunge_all()
    finally:
        manager.events.remove(record)
    return checked


@pytest.fixture
def fleet(manager: ShardManager) -> Iterator[Fleet]:
    install_ring(manager, FOUR)
    create_schema(manager)
    forget_readiness()
    made = Fleet()
    made.write(manager, customers=60)
    yield made


def _assert_placed(manager: ShardManager, ring: HashRing, fleet: Fleet) -> None:
    """Each server read directly: every entry on its value's shard in ``ring``, one per owning row."""
    orders, emails = fleet.snapshot()
    for name, owners in ((ORDERS, orders), (EMAILS, emails)):
        stored = entries(manager, name)
        misplaced = [(s, v) for s, pairs in stored.items() for v, _ in pairs if ring.get_shard(v) != s]
        assert not misplaced, (
            f"{name}: {len(misplaced)} entries off their value's shard, e.g. {misplaced[:3]}"
        )
        everything = {p for pairs in stored.values() for p in pairs}
        missing = set(owners.items()) - everything
        assert not missing, f"{name}: committed rows without their entry: {sorted(missing)[:5]}"
        if everything != set(owners.items()):  # a writer's rolled-back retry left stale entries
            repair_lookup(manager, lookup_named(name))
            everything = {p for pairs in entries(manager, name).values() for p in pairs}
        assert everything == set(owners.items()), name
        assert is_ready(manager, lookup_named(name)), f"{name} is not trusted after the move"


def _assert_entries_at(manager: ShardManager, old: HashRing, new: HashRing, fleet: Fleet) -> None:
    """In a crash window, each server read directly: every committed row's entry is there, each
    entry on its value's shard in ``old`` or ``new`` (``old == new``: all moved already)."""
    orders, emails = fleet.snapshot()
    for name, owners in ((ORDERS, orders), (EMAILS, emails)):
        stored = entries(manager, name)
        off = [
            (s, v)
            for s, pairs in stored.items()
            for v, _ in pairs
            if s not in (old.get_shard(v), new.get_shard(v))
        ]
        assert not off, f"{name}: {len(off)} entries on neither position, e.g. {off[:3]}"
        missing = set(owners.items()) - {p for pairs in stored.values() for p in pairs}
        assert not missing, f"{name}: committed rows without their entry: {sorted(missing)[:5]}"


def _assert_exact_routes(manager: ShardManager, fleet: Fleet) -> None:
    orders, emails = fleet.snapshot()
    with manager.sessionmaker()() as session:
        for order_id, cid in orders.items():
            stmt = select(LkOrder).where(LkOrder.order_id == order_id)
            assert manager.shards_for(stmt) == (manager.shard_for(cid),)
            assert session.scalars(stmt).one().customer_id == cid
        for email, cid in emails.items():
            stmt = select(LkCustomer).where(LkCustomer.email == email)
            assert manager.shards_for(stmt) == (manager.shard_for(cid),)
        some = list(orders)[:7]
        wanted = {manager.shard_for(orders[o]) for o in some}
        assert set(manager.shards_for(select(LkOrder).where(LkOrder.order_id.in_(some)))) == wanted


def _online(manager: ShardManager, fleet: Fleet, move: Any) -> None:
    """Run ``move()`` under a writer and a reader; the reader's findings must be empty."""
    stop = threading.Event()
    wrong: list[str] = []
    checked = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                fleet.write(manager, customers=1, orders_each=2)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    def reader() -> None:
        try:
            while not stop.is_set():
                checked[0] += _check_reads(manager, fleet, wrong, sample=5)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    try:
        move()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[:3]
    assert not wrong, wrong[:5]
    assert checked[0] > 0


def test_an_online_add_then_remove_moves_every_lookup_row(
    manager: ShardManager, shard5_url: str, fleet: Fleet
) -> None:
    before = len(fleet.orders)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))  # before the sessions are made
    results: list[RebalanceResult] = []
    _online(
        manager,
        fleet,
        lambda: results.append(add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=10))),
    )
    assert results[0].positioned_rows.get(f"lookup {ORDERS}", 0) > 0  # reported apart from rows_moved
    five = FOUR.add_shard("shard-5")
    assert manager.ring == five and len(fleet.orders) > before  # the writer wrote during the move
    on_five = [v for v, _ in entries(manager, ORDERS)["shard-5"]]
    assert on_five, "no order_id entry moved to the new shard"
    _assert_placed(manager, five, fleet)
    _assert_exact_routes(manager, fleet)

    _online(
        manager, fleet, lambda: remove_shard(manager, "shard-2", Base, options=MoveOptions(batch_size=10))
    )
    four = five.remove_shard("shard-2")
    assert manager.ring == four
    assert entries(manager, ORDERS)["shard-2"] == set() and entries(manager, EMAILS)["shard-2"] == set()
    _assert_placed(manager, four, fleet)
    _assert_exact_routes(manager, fleet)


LOOKUP_STOPS = {
    "email rows copied, not yet deleted on the source": {
        "sql": "DELETE FROM shardkit_lookup_lk_customers_email",
        "nth": 1,
    },
    "order_id rows half moved": {"sql": "DELETE FROM shardkit_lookup_lk_orders_order_id", "nth": 2},
    # every lookup row moved and trusted under the new ring, no shard bumped yet (5 start bumps before)
    "final version bump": {"sql": "SET version", "nth": 6},
    "final version bump, one shard bumped": {"sql": "SET version", "nth": 7},
}
MOVING_LOOKUP_ROWS = ("email rows copied, not yet deleted on the source", "order_id rows half moved")


@pytest.mark.parametrize("name", list(LOOKUP_STOPS))
def test_a_mover_killed_while_moving_lookup_rows_is_finished_by_resume(
    manager: ShardManager, shard5_url: str, fleet: Fleet, name: str
) -> None:
    stop = LOOKUP_STOPS[name]
    urls = [
        a for s in FOUR.shard_ids for a in ("--url", manager.config(s).primary_url.render_as_string(False))
    ]
    models = ["--models", "tests.lookup_models:Base"]
    kill_mover_at([*urls, *models, "--add", "shard-5", shard5_url, "--batch-size", "50"], stop)
    five = FOUR.add_shard("shard-5")
    config = {**{s: manager.config(s).primary_url for s in FOUR.shard_ids}, "shard-5": shard5_url}
    with ShardManager.from_urls(config) as everything:
        view = FleetView(read_fleet_state(everything))
        assert view.unfinished is not None and view.unfinished.target == five  # killed mid-move
        wrong: list[str] = []
        forget_readiness()
        assert _check_reads(everything, fleet, wrong) > 0  # in the crash window: every row found
        assert not wrong, wrong[:5]
        _assert_entries_at(everything, FOUR if name in MOVING_LOOKUP_ROWS else five, five, fleet)
    result = CliRunner().invoke(rebalance_command, [*urls, *models, "--resume"])
    assert result.exit_code == 0, result.output
    if name in MOVING_LOOKUP_ROWS:  # else every lookup row had moved before the kill
        assert "Moved with their value's ring position: lookup " in " ".join(result.output.split())
    with ShardManager.from_urls(config) as everything:
        forget_readiness()
        assert everything.ring == five
        _assert_placed(everything, five, fleet)
        _assert_exact_routes(everything, fleet)


def test_the_mover_settles_unique_entries_that_conflict_on_the_new_shard(
    manager: ShardManager, shard5_url: str, fleet: Fleet
) -> None:
    """A unique entry meets another key's entry for its value on the new shard (left by a writer
    that crashed): the entry whose owning row exists wins, whichever side it is on."""
    five = FOUR.add_shard("shard-5")
    moving = [e for e in fleet.emails if five.get_shard(e) == "shard-5"]
    assert len(moving) >= 2
    real_here, real_there = moving[0], moving[1]
    table = lookup_named(EMAILS).table
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    with manager.connect("shard-5") as conn:  # the new shard already holds two entries
        table.create(conn, checkfirst=True)
        conn.execute(table.insert(), [{"value": real_here, "shard_key": 999_001}])  # stale: no such row
        conn.execute(table.insert(), [{"value": real_there, "shard_key": fleet.emails[real_there]}])
        conn.commit()
    old = FOUR.get_shard(real_there)
    with manager.connect(old) as conn:  # and the old shard's entry of real_there is the stale one
        conn.execute(table.update().where(table.c.value == real_there).values(shard_key=999_002))
        conn.commit()
    add_shard(manager, "shard-5", Base)
    stored = entries(manager, EMAILS)
    assert (real_here, fleet.emails[real_here]) in stored["shard-5"]
    assert (real_there, fleet.emails[real_there]) in stored["shard-5"]
    assert not [p for pairs in stored.values() for p in pairs if p[1] in (999_001, 999_002)]
    _assert_placed(manager, five, fleet)
    _assert_exact_routes(manager, fleet)


def test_the_cli_mover_moves_lookups_of_models_it_never_imported(
    manager: ShardManager, shard5_url: str, fleet: Fleet
) -> None:
    """``shardkit rebalance --add`` in its own process, given the owner tables as plain Core tables
    (no lookup declared, the models never imported there), under this process's writer and reader:
    the lookup rows are found on the shards and moved, and the lookup stays trusted."""
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))  # the app's side, before its sessions
    argv = [*url_args(manager, FOUR.shard_ids), "--models", "tests.lookup_models_core:metadata"]
    mover = [sys.executable, "-m", "sa_shardkit", "rebalance", *argv, "--add", "shard-5", shard5_url]
    done: list[subprocess.CompletedProcess[str]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _online(
        manager,
        fleet,
        lambda: done.append(
            subprocess.run(mover, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        ),
    )
    assert done[0].returncode == 0, done[0].stdout + done[0].stderr
    assert "lookup lk_orders.order_id" in " ".join(done[0].stdout.split())
    five = FOUR.add_shard("shard-5")
    forget_readiness()
    manager.placement.refresh()
    assert manager.ring == five
    assert entries(manager, ORDERS)["shard-5"], "no order_id entry moved to the new shard"
    _assert_placed(manager, five, fleet)
    _assert_exact_routes(manager, fleet)


def test_entries_for_a_joining_shard_in_the_start_bump_window_are_written(
    manager: ShardManager, shard5_url: str
) -> None:
    """A move's start bump commits the state table on every shard before it stores the move on any,
    and bumps the joining shard last: for a while the joining shard holds an empty state table
    while writers already route by the move. An entry whose new position is that shard must be
    written there (the fenced insert joined the empty table and silently wrote nothing, so a
    committed order had no entry: CI, 2026-12-02). Each server is read directly."""
    install_ring(manager, FOUR)
    create_schema(manager)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    create_lookup_tables(manager)  # what the mover's prepare step does for a joining shard
    five = FOUR.add_shard("shard-5")
    stored = load_ring_state(manager)
    assert stored is not None
    write_state(manager, RingState(stored.version + 1, FOUR, five, stored.key_type), FOUR.shard_ids)
    with manager.connect("shard-5") as conn, conn.begin():
        create_state_table(conn)  # committed, no row yet: the window
    manager.placement.refresh()
    assert manager.placement.state.target == five
    fleet = Fleet()
    fleet.write(manager, customers=12, orders_each=2)
    orders, emails = fleet.snapshot()
    on_five = [o for o in orders if five.get_shard(o) == "shard-5"]
    assert on_five, "no order_id whose new position is the joining shard: the test checks nothing"
    for name, owners in ((ORDERS, orders), (EMAILS, emails)):
        stored_entries = entries(manager, name)
        missing = set(owners.items()) - {p for pairs in stored_entries.values() for p in pairs}
        assert not missing, f"{name}: committed rows without their entry: {sorted(missing)[:5]}"
        for value, key in owners.items():
            if five.get_shard(value) == "shard-5":
                assert (value, key) in stored_entries["shard-5"], (name, value)


def test_a_transaction_writing_a_moving_and_a_staying_entry_of_one_unbumped_shard_loses_neither(
    manager: ShardManager, shard5_url: str
) -> None:
    """The start bump reaches the shards one after another. A writer that routes by the move
    (adopted from shard-1, bumped first) writes, in one transaction, the entries of two orders
    whose values sit on shard-2, not bumped yet: one value stays there in the target ring, the
    other moves to shard-5. The moving one must be written on shard-2 (its old position, fenced
    for the bump to wait) and the staying one on shard-2 too: both are shard-2's writes, and the
    staying value's write once replaced the moving one's, so that committed order had no entry on
    any server (the flaky ``[(154, 77)]`` of the online add above, 153 staying on shard-2). Each
    server is read directly, in the window and after the move is resumed and finished."""
    five = FOUR.add_shard("shard-5")
    stays, moves, customer = 1025, 1003, 6  # found by the rings; checked here
    assert FOUR.get_shard(stays) == five.get_shard(stays) == "shard-2"
    assert (FOUR.get_shard(moves), five.get_shard(moves)) == ("shard-2", "shard-5")
    assert FOUR.get_shard(customer) == five.get_shard(customer) == "shard-1"  # the row's shard: bumped
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    create_schema(manager)  # every table on the joining shard too (what the move's prepare does)
    forget_readiness()
    stored = load_ring_state(manager)
    assert stored is not None
    write_state(manager, RingState(stored.version + 1, FOUR, five, stored.key_type), ["shard-1"])
    manager.placement.refresh()
    assert manager.placement.state.target == five  # this process routes by the move
    with manager.sessionmaker()() as session:
        session.add_all([LkOrder(order_id=o, customer_id=customer) for o in (stays, moves)])
        session.commit()
    in_window = entries(manager, ORDERS)
    assert (stays, customer) in in_window["shard-2"]
    assert (moves, customer) in in_window["shard-2"] | in_window["shard-5"], (
        f"committed order {moves} has no entry on any server: {in_window}"
    )

    add_shard(manager, "shard-5", Base)  # finishes the move in flight
    assert manager.ring == five
    fleet = Fleet()
    fleet.orders.update({stays: customer, moves: customer})
    _assert_placed(manager, five, fleet)
    assert (moves, customer) in entries(manager, ORDERS)["shard-5"]
    _assert_exact_routes(manager, fleet)
