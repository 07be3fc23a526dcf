"""The real CLI mover SIGKILLed inside the start-wait horizon (every shard stored the move, no copy
committed yet), then ``shardkit rebalance --resume`` with the fleet's original configuration and
no option repeated.

A reader in another "process" (its own manager, default ``refresh_seconds``, so it re-reads the
stored ring at most every ``SHARDKIT_RING_RECHECK_SECONDS``) read the ring just before the mover
started and scatters throughout: until it re-reads, it scatters by the old ring, unfiltered. The
resumed run must wait out what is left of the horizon of the *first* run's start bump before it
commits a copy; a resume that skipped the wait (or measured it from its own start) would show that
reader a copy twice (remove: the targets are old members) or miss a moved row (add).

Done means: every shard at one ring version, nothing in flight, no staging table on any shard, every
row exactly once on the shard the new ring assigns, the batch size the move was started with kept,
and no scatter of the reader saw a row twice or missed one.
"""

from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.demo.models import Customer
from sa_shardkit.rebalance import FleetView, install_ring, read_fleet_state
from sa_shardkit.rebalance.catalog import move_started_at
from sa_shardkit.rebalance.record import read_records
from tests.rebalance_data import check_fleet, leftovers, rows_everywhere, seed
from tests.rebalance_kill import kill_mover_at, url_args

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
CUSTOMERS, ORDERS_EACH = 400, 2
BATCH = 15
HORIZON = 6.0
"""> the mover's start-up + the kill delay + the resume's start-up: a resume that did not wait
would commit its first copies while the reader still routes by the old ring."""
KILL_DELAY = 1.0
"""Seconds after the last start-bump statement was sent: its commit has happened, the mover sleeps."""

CHANGES = {
    "add": lambda url: ["--add", "shard-5", url],
    "remove": lambda url: ["--remove", "shard-2"],
}


class StaleReader:
    """Scatters through its own manager (another process's view) until stopped; records every
    scatter that did not see each seeded customer exactly once, and the ring version it used."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.manager = ShardManager.from_urls(urls)
        self.manager.placement.refresh()
        self.stop = threading.Event()
        self.wrong: list[tuple[int, int, int]] = []
        self.stale_scatters = 0
        self.scatters = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read_ring(self) -> None:
        """Re-read the stored ring now (it next re-reads by itself ``refresh_seconds`` later)."""
        self.manager.placement.refresh()
        assert self.manager.placement.state.version == 1

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        everyone = list(range(1, CUSTOMERS + 1))
        try:
            while not self.stop.is_set():
                with self.manager.sessionmaker()() as session:
                    version = self.manager.placement.state.version
                    ids = session.scalars(select(Customer.customer_id)).all()
                    count = session.scalar(select(func.count()).select_from(Customer))
                self.scatters += 1
                self.stale_scatters += version == 1
                if count != CUSTOMERS or sorted(ids) != everyone:
                    self.wrong.append((version, int(count or 0), len(ids)))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(timeout=60)
        self.manager.dispose()


@pytest.mark.parametrize("change", list(CHANGES))
def test_killed_in_the_start_wait_then_resumed_waits_out_the_first_runs_horizon(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    monkeypatch.setenv("SHARDKIT_RING_RECHECK_SECONDS", str(HORIZON))  # the mover subprocess inherits it
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    four = {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    urls = {**four, "shard-5": shard5_url} if change == "add" else four
    new = FOUR.add_shard("shard-5") if change == "add" else FOUR.remove_shard("shard-2")
    reader = StaleReader(urls)
    reader.start()
    try:
        argv = [*url_args(manager, FOUR.shard_ids), *CHANGES[change](shard5_url), "--batch-size", str(BATCH)]
        # the start bump updates the 4 old shards' state rows (a joining shard's is inserted, last):
        # the 4th update, then KILL_DELAY into the start wait; the reader re-reads the stored ring
        # (version 1) just before the first update: it is the freshest a stale reader can be
        stop = {"sql": "SET version", "nth": 4, "delay": KILL_DELAY, "hold": {"sql": "SET version"}}
        kill_mover_at(argv, stop, on_hold=reader.read_ring)
        killed_at = time.time()
        with ShardManager.from_urls(urls) as everything:
            view = FleetView(read_fleet_state(everything))
            assert view.unfinished is not None and not view.split, "every shard stored the move"
            started = move_started_at(everything, view.unfinished)
            assert killed_at < started + HORIZON, "the kill came inside the start-wait horizon"
            assert leftovers(everything) == {}, "no copy was made before the kill"
            copies = rows_everywhere(everything, list(urls))
            assert set(copies["customers"].values()) == {1}
        assert reader.manager.placement.state.version == 1, "the reader still routes by the old ring"
        resumed = CliRunner().invoke(rebalance_command, [*url_args(manager, FOUR.shard_ids), "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert "Done:" in resumed.output
    finally:
        reader.finish()
    assert not reader.errors, reader.errors
    assert reader.wrong == [], f"{len(reader.wrong)} of {reader.scatters} scatters wrong: {reader.wrong[:5]}"
    assert reader.stale_scatters > 0 and reader.scatters > reader.stale_scatters
    with ShardManager.from_urls(urls) as everything:
        view = FleetView(read_fleet_state(everything))
        assert {s.state.version for s in view.shards.values()} == {3}
        assert view.unfinished is None and view.newest is not None and view.newest.ring == new
        assert leftovers(everything) == {}
        check_fleet(everything, new, None, CUSTOMERS * ORDERS_EACH)
        record, counts = read_records(everything, 2)
        assert record is not None and record.options["batch_size"] == BATCH  # kept by --resume
        keys, batches = sum(c.keys_moved for c in counts.values()), sum(c.batches for c in counts.values())
        assert keys > 0 and batches * BATCH >= keys
