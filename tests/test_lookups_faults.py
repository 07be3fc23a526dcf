"""A frozen lookup shard (its server SIGSTOPped) during a lookup *write*.

The writer (a real process, :mod:`tests.lookup_frozen_writer`) flushes an order whose owning row
goes to a live shard and whose ``order_id`` entry lives on the frozen one. The flush must end with
:class:`~sa_shardkit.errors.ShardUnavailableError` naming the frozen shard (cut short by the
shard's ``query_timeout``, not hung), the process must then exit by itself while the server is
still frozen (no worker thread left waiting on it), and nothing may be half-written: the owning
row is on no server (each read directly), and an entry it may have left is ignored by every read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from sa_shardkit import ShardManager
from sa_shardkit.errors import LookupIndexError
from sa_shardkit.lookups import store
from sa_shardkit.lookups.store import forget_readiness
from sa_shardkit.rebalance import install_ring
from sa_shardkit.ring_state import STATE_TABLE
from tests.fleet import TestFleet
from tests.lookup_models import LkOrder, create_schema
from tests.test_lookups import ORDERS, entries
from tests.test_lookups_crash import physical_orders

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD = 120  # seconds: only so that a hung writer fails the test instead of the whole run


def _order_on_another_shard(manager: ShardManager) -> tuple[int, int, str]:
    """(order_id, customer_id, the order_id entry's shard): the owner's shard is another one, and
    the warm-up order (order_id + 1,000,000) has its entry on the same shard too."""
    for order_id in range(10_000, 20_000):
        frozen = manager.shard_for(order_id)
        if manager.shard_for(order_id + 1_000_000) != frozen:
            continue
        for customer_id in range(1, 100):
            if manager.shard_for(customer_id) != frozen:
                return order_id, customer_id, frozen
    raise AssertionError("no such order id")


@pytest.mark.parametrize("warm", ["kept", "fresh"])
def test_a_frozen_lookup_shard_fails_the_write_naming_it_and_leaves_nothing_half_written(
    pg_fleet: TestFleet, shard_map: dict[str, str], manager: ShardManager, tmp_path: Path, warm: str
) -> None:
    """``kept``: the lookup connection to the frozen shard is one kept from an earlier write (its
    statement is cut short by query_timeout, the replacement's connect by connect_timeout);
    ``fresh``: the write's first connection to that shard (connect_timeout)."""
    create_schema(manager)
    forget_readiness()
    order_id, customer_id, frozen = _order_on_another_shard(manager)
    go = tmp_path / "go"
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.lookup_frozen_writer", ",".join(shard_map.values()), str(order_id)]
        + [str(customer_id), str(go), warm],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    server = pg_fleet.server(int(frozen.rsplit("-", 1)[1]) - 1)
    server.pause()
    try:
        go.touch()
        try:
            out, err = writer.communicate(timeout=HANG_GUARD)  # the server is still frozen here
        except subprocess.TimeoutExpired:
            writer.kill()
            out, err = writer.communicate()
            pytest.fail(f"the writer did not end while {frozen} was frozen:\n{out}\n{err[-3000:]}")
    finally:
        server.resume()
    assert writer.returncode == 0, err[-3000:]
    outcome = out.strip().splitlines()[-1].split(" ", 2)
    assert outcome[:2] == ["unavailable", frozen], out
    assert repr(frozen) in outcome[2], out
    assert order_id not in physical_orders(manager)  # the owning row is on no server
    assert (order_id + 1_000_000 in physical_orders(manager)) == (warm == "kept")
    stale = {(v, k) for pairs in entries(manager, ORDERS).values() for v, k in pairs if v == order_id}
    assert stale <= {(order_id, customer_id)}
    with manager.sessionmaker()() as session:  # a stale entry, if any, is ignored by reads
        assert session.scalars(select(LkOrder).where(LkOrder.order_id == order_id)).all() == []
        assert session.get(LkOrder, order_id) is None
        assert session.scalars(select(LkOrder).where(LkOrder.order_id.in_([order_id]))).all() == []


def test_a_lookup_write_held_by_a_version_bump_names_the_shard(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring version bump holding the lookup shard's state row (a mover frozen there): the entry's
    fenced insert gives up after the lookup's lock wait with a LookupIndexError that names the
    shard and the bump (it said only "another transaction writing the same value"), and the
    owning row is on no server."""
    monkeypatch.setattr(store, "LOCK_TIMEOUT_MS", 300)
    install_ring(manager, manager.ring)
    create_schema(manager)
    forget_readiness()
    order_id, customer_id, held = _order_on_another_shard(manager)
    url = manager.config(held).primary_url.render_as_string(False).replace("+psycopg", "")
    with psycopg.connect(url) as bump:  # what a mover's bump holds: the state row FOR UPDATE
        bump.execute(f"SELECT version FROM {STATE_TABLE} FOR UPDATE")
        with manager.sessionmaker()() as session:
            session.add(LkOrder(order_id=order_id, customer_id=customer_id))
            with pytest.raises(
                LookupIndexError, match=f"on shard {held!r}.*ring version bump.*rebalance --status"
            ):
                session.commit()
        bump.rollback()
    assert order_id not in physical_orders(manager)
