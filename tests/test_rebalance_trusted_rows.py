"""A move skips the foreign-key triggers of whole keys only when nothing else would be skipped.

``sa_shardkit/rebalance/trusted_rows.py``: with only same-key foreign keys among the moved tables
(the demo models), the target's COPY and the source's deletes run under
``session_replication_role = replica``; a user trigger on a target, or a target foreign key the
source lacks, keeps every check. The foreign-key check of an insert locks the parent row
``FOR KEY SHARE``, which leaves the inserting transaction in the parent's ``xmax``: that is how
these tests see whether the checks ran on the new shard.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveOptions, add_shard, install_ring
from tests.rebalance_data import check_fleet, seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")


def _locked_parents(manager: ShardManager) -> tuple[int, int]:
    """Rows of the new shard's parent tables locked by a child's foreign-key check, and all of them."""
    with manager.connect("shard-5") as conn:
        locked = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM customers WHERE xmax::text <> '0')"
                " + (SELECT count(*) FROM orders WHERE xmax::text <> '0'),"
                " (SELECT count(*) FROM customers) + (SELECT count(*) FROM orders)"
            )
        ).one()
    return int(locked[0]), int(locked[1])


def _seeded(manager: ShardManager, shard5_url: str) -> None:
    seed(manager, FOUR, 100, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))


def test_whole_keys_move_without_foreign_key_checks(manager: ShardManager, shard5_url: str) -> None:
    _seeded(manager, shard5_url)
    add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    locked, parents = _locked_parents(manager)
    assert parents > 0
    assert locked == 0  # no child's check ran (before: every parent row was locked by one)
    check_fleet(manager, FIVE, None, 200)


def test_a_user_trigger_on_the_target_keeps_the_checks(manager: ShardManager, shard5_url: str) -> None:
    _seeded(manager, shard5_url)
    Base.metadata.create_all(manager.engine("shard-5"))
    with manager.connect("shard-5") as conn:
        conn.execute(
            text(
                "CREATE FUNCTION noop() RETURNS trigger AS $$ BEGIN RETURN NEW; END $$ LANGUAGE plpgsql;"
                "CREATE TRIGGER noop AFTER INSERT ON order_items FOR EACH ROW EXECUTE FUNCTION noop()"
            )
        )
        conn.commit()
    add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    locked, parents = _locked_parents(manager)
    assert parents > 0 and locked > 0  # the triggers fired
    check_fleet(manager, FIVE, None, 200)


def test_a_foreign_key_the_source_lacks_is_checked_on_the_target(
    manager: ShardManager, shard5_url: str
) -> None:
    """A source without the items -> orders foreign key holds an orphan item of a moving key: the
    target, which has the key, must refuse it (skipping its check would copy the orphan)."""
    _seeded(manager, shard5_url)
    key = next(k for k in range(1, 101) if FIVE.get_shard(k) == "shard-5")
    source = FOUR.get_shard(key)
    for shard_id in FOUR.shard_ids:
        with manager.connect(shard_id) as conn:
            conn.execute(
                text("ALTER TABLE order_items DROP CONSTRAINT order_items_customer_id_order_id_fkey")
            )
            conn.commit()
    orphan = uuid.uuid4()
    with manager.connect(source) as conn:
        conn.execute(
            text(
                "INSERT INTO order_items (customer_id, order_id, item_no, sku, quantity, unit_price)"
                " VALUES (:k, :o, 0, 'SKU-1', 1, :p)"
            ),
            {"k": key, "o": orphan, "p": Decimal(5)},
        )
        conn.commit()
    with pytest.raises(Exception, match="violates foreign key constraint"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    with manager.connect(source) as conn:  # nothing was lost: the orphan is still on its source
        found = conn.execute(text("SELECT count(*) FROM order_items WHERE order_id = :o"), {"o": orphan})
        assert found.scalar() == 1
