"""Moves one after another, online: an add after an add (3 -> 4 -> 5 shards) and a remove after an
add (3 -> 4 -> 3, another member removed), each under four writer threads (keyed inserts,
increments, keyed reads) and a scatter reader in its own manager (another process's view, default
``refresh_seconds``). After each move every server is read directly: every committed row exactly
once, on the shard the new ring assigns, every increment applied, nothing left on a removed shard,
no staging table or journal entry anywhere. The second move's targets include shards that were
members of the first move's rings, so a journal or watermark left from the first would show.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import select, text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.rebalance import (
    FleetView,
    MoveOptions,
    RingRouter,
    add_shard,
    install_ring,
    read_fleet_state,
    remove_shard,
)
from tests.rebalance_data import Workload, check_fleet, leftovers, seed

THREE = HashRing(["shard-1", "shard-2", "shard-3"])
CUSTOMERS, ORDERS_EACH, ITEMS_EACH = 450, 3, 1
OPTIONS = MoveOptions(batch_size=40)


class ScatterReader:
    """Scatters ``customer_id <= CUSTOMERS`` (the seeded customers: never deleted, so exactly
    once each) through its own manager until stopped."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.manager = ShardManager.from_urls(urls)
        self.stop = threading.Event()
        self.wrong: list[tuple[int, int, int]] = []
        self.scatters = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        everyone = list(range(1, CUSTOMERS + 1))
        query = select(Customer.customer_id).where(Customer.customer_id <= CUSTOMERS)
        try:
            while not self.stop.is_set():
                with self.manager.sessionmaker()() as session:
                    ids = session.scalars(query).all()
                self.scatters += 1
                if sorted(ids) != everyone:
                    version = self.manager.placement.state.version
                    self.wrong.append((version, len(ids), len(set(ids))))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(timeout=60)
        self.manager.dispose()
        assert not self.errors, self.errors
        assert self.scatters > 0
        assert self.wrong == [], f"{len(self.wrong)} of {self.scatters} scatters wrong: {self.wrong[:5]}"


def _two_moves_under_load(
    manager: ShardManager, urls: dict[str, str], moves: list[tuple[str, str]]
) -> Workload:
    """Run ``moves`` (``(add|remove, shard)``) one after the other while the writers and the
    reader run throughout; between the two, the fleet is at one version with nothing left over."""
    workload = Workload(RingRouter(manager), CUSTOMERS, ORDERS_EACH)
    reader = ScatterReader(urls)
    workload.start()
    time.sleep(0.2)
    try:
        for n, (move, shard_id) in enumerate(moves):
            if move == "add":
                result = add_shard(manager, shard_id, Base, options=OPTIONS)
            else:
                result = remove_shard(manager, shard_id, Base, options=OPTIONS)
            assert result.rows_moved > 0 and result.version == 3 + 2 * n
            view = FleetView(read_fleet_state(manager))
            assert view.unfinished is None and not view.split
            assert leftovers(manager) == {}
            time.sleep(0.2)  # writes under the new ring before the next move starts
    finally:
        workload.finish()
        reader.finish()
    assert not workload.errors, workload.errors[:5]
    assert workload.ops["insert"] and workload.ops["update"] and workload.ops["read"]
    return workload


def _check_every_server(manager: ShardManager, ring: HashRing, version: int, workload: Workload) -> None:
    view = FleetView(read_fleet_state(manager))
    stored = {s: st.state.version for s, st in view.shards.items() if s in ring.shard_ids}
    assert set(stored.values()) == {version}, stored
    assert view.unfinished is None and view.newest is not None and view.newest.ring == ring
    assert leftovers(manager) == {}
    check_fleet(manager, ring, workload, 0)
    for shard_id in manager.shard_ids:
        if shard_id not in ring.shard_ids:  # a removed (or never used) shard holds no sharded row
            with manager.connect(shard_id) as conn:
                if conn.execute(text("SELECT to_regclass('orders')")).scalar() is not None:
                    assert conn.execute(text("SELECT count(*) FROM orders")).scalar_one() == 0


def _three_shards(manager: ShardManager, shard5_url: str | None = None) -> dict[str, str]:
    seed(manager, THREE, CUSTOMERS, ORDERS_EACH, ITEMS_EACH)
    install_ring(manager, THREE)
    if shard5_url is not None:  # the application's config names it
        manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    return {s: manager.config(s).primary_url.render_as_string(False) for s in manager.shard_ids}


def test_an_add_after_an_add_keeps_every_row_exactly_once(manager: ShardManager, shard5_url: str) -> None:
    urls = _three_shards(manager, shard5_url)
    workload = _two_moves_under_load(manager, urls, [("add", "shard-4"), ("add", "shard-5")])
    _check_every_server(manager, THREE.add_shard("shard-4").add_shard("shard-5"), 5, workload)


def test_a_remove_after_an_add_keeps_every_row_exactly_once(manager: ShardManager) -> None:
    urls = _three_shards(manager)
    workload = _two_moves_under_load(manager, urls, [("add", "shard-4"), ("remove", "shard-2")])
    _check_every_server(manager, THREE.add_shard("shard-4").remove_shard("shard-2"), 5, workload)
