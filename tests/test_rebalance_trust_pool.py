"""No connection goes back to a pool (or stays kept) with ``session_replication_role = replica``.

The mover's trusted transactions (``sa_shardkit/rebalance/trusted_rows.py``) set the role for the
transaction only. These tests fail a batch right after the role was set -- on the source (a row
lock a raw transaction holds makes the trusted delete run out of ``lock_timeout``) and on the
target (a stray row makes the trusted COPY fail on its primary key) -- and after a move that
succeeded, then check every connection of every shard's pool: ``SHOW session_replication_role``
is ``origin``, and an application write of an orphan through the same manager is refused.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveOptions, add_shard, install_ring
from sa_shardkit.rebalance.mover import SourceMover
from tests.rebalance_data import seed
from tests.trust_support import MISSING_CUSTOMER, check_consistent, watching_trust

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
ALL = [*FOUR.shard_ids, "shard-5"]
CUSTOMERS = 200


def _pooled_roles(manager: ShardManager, shard_id: str) -> list[str]:
    """``session_replication_role`` of every connection checked in to the shard's pool (all
    checked out at once, so each is seen)."""
    engine = manager.engine(shard_id)
    count = engine.pool.checkedin()  # type: ignore[attr-defined]
    conns = [engine.connect() for _ in range(count)]
    try:
        return [str(c.execute(text("SHOW session_replication_role")).scalar_one()) for c in conns]
    finally:
        for conn in conns:
            conn.close()


def _assert_triggers_fire_everywhere(manager: ShardManager, shard_ids: list[str]) -> None:
    seen = {s: _pooled_roles(manager, s) for s in shard_ids}
    assert all(r == "origin" for roles in seen.values() for r in roles), seen
    assert sum(len(r) for r in seen.values()) > 0
    for shard_id in shard_ids:  # every pooled connection: an orphan order is refused
        engine = manager.engine(shard_id)
        conns = [engine.connect() for _ in range(max(1, engine.pool.checkedin()))]  # type: ignore[attr-defined]
        try:
            for conn in conns:
                with pytest.raises(IntegrityError, match="foreign key"):
                    conn.execute(
                        text(
                            "INSERT INTO orders (customer_id, order_id, status, total) VALUES (:c, :o, 'x', 1)"
                        ),
                        {"c": MISSING_CUSTOMER, "o": uuid.uuid4()},
                    )
                conn.rollback()
        finally:
            for conn in conns:
                conn.close()
    for key in range(1, 40):  # and the application's fenced writes, on whichever shard they go to
        with pytest.raises(IntegrityError, match="foreign key"), manager.transaction(key) as conn:
            conn.execute(
                text(
                    "INSERT INTO order_items (customer_id, order_id, item_no, sku, quantity, unit_price)"
                    " VALUES (:c, :o, 0, 'SKU-0', 1, 1)"
                ),
                {"c": key, "o": uuid.uuid4()},
            )


def _seeded(manager: ShardManager, shard5_url: str) -> None:
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    Base.metadata.create_all(manager.engine("shard-5"))


def test_a_trusted_delete_that_fails_leaves_no_replica_connection(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seeded(manager, shard5_url)
    locker = manager.engine("shard-1").connect()  # not through the fence: the mover waits for it

    original = SourceMover._cut_over

    def cut_over(self: SourceMover, *args: Any) -> bool:  # shard-1's cut-overs: a raw row lock first
        if self.source == "shard-1" and not locker.in_transaction():
            locker.execute(text("SELECT 1 FROM order_items FOR UPDATE"))
        return original(self, *args)

    monkeypatch.setattr(SourceMover, "_cut_over", cut_over)
    try:
        with watching_trust(monkeypatch) as trust, pytest.raises(Exception, match="lock timeout"):
            add_shard(
                manager,
                "shard-5",
                Base,
                options=MoveOptions(batch_size=8, lock_timeout=0.5),
            )
    finally:
        locker.rollback()
        locker.close()
    assert 1 in trust.source  # deletes ran trusted (the failing one too: TRUST_SOURCE opens its round trip)
    monkeypatch.setattr(SourceMover, "_cut_over", original)
    _assert_triggers_fire_everywhere(manager, ALL)
    add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))  # the move can finish
    _assert_triggers_fire_everywhere(manager, ALL)
    check_consistent(manager, FIVE, ALL)


def test_a_trusted_copy_that_fails_leaves_no_replica_connection(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seeded(manager, shard5_url)
    stray = next(k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) == "shard-5")
    with manager.connect("shard-5") as conn:  # a row the COPY collides with (not a crashed run's)
        conn.execute(
            text("INSERT INTO customers (customer_id, name, balance) VALUES (:k, 'stray', 0)"), {"k": stray}
        )
        conn.commit()
    with watching_trust(monkeypatch) as trust, pytest.raises(Exception, match="customers_pkey"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    assert 1 in trust.target
    _assert_triggers_fire_everywhere(manager, ALL)


def test_after_a_trusted_move_every_pooled_connection_fires_triggers(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seeded(manager, shard5_url)
    with watching_trust(monkeypatch) as trust:
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    assert 1 in trust.source and 1 in trust.target
    _assert_triggers_fire_everywhere(manager, ALL)
    check_consistent(manager, FIVE, ALL)
