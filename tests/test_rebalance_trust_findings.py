"""Schemas where the trusted-rows mover must not skip triggers, and rows it moves as they are.

``sa_shardkit/rebalance/trusted_rows.py`` decides from the catalog of the moved tables; a review
found two schemas that defeated that decision (both failed before the fix: the mover now never
trusts a moved table with partitions or inheritance children):

* a user trigger on a *partition* of a moved (partitioned) table: ``pg_trigger`` lists it under the
  partition, not under the moved table, so the source's deletes skipped it;
* a foreign key declared on a partition: the target's COPY skipped its check.

And a documented behaviour: a source holding an orphan although its foreign key is declared and
valid (rows loaded with the triggers disabled: ``ALTER TABLE ... DISABLE TRIGGER ALL``,
``pg_restore --disable-triggers``) has the orphan moved as it is, once, to its key's new shard (as
logical replication would), not refused.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveOptions, add_shard, install_ring
from tests.rebalance_data import seed
from tests.trust_support import orphans, scalar_on, sql_on

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
ALL = [*FOUR.shard_ids, "shard-5"]
CUSTOMERS = 120

PARTITIONED_ITEMS = (
    "CREATE TABLE order_items (customer_id bigint NOT NULL, order_id uuid NOT NULL, item_no integer NOT NULL,"
    " sku varchar(64) NOT NULL, quantity integer NOT NULL, unit_price numeric(14, 2) NOT NULL,"
    " PRIMARY KEY (customer_id, order_id, item_no), FOREIGN KEY (customer_id, order_id)"
    " REFERENCES orders (customer_id, order_id) ON DELETE CASCADE) PARTITION BY HASH (customer_id);"
    "CREATE TABLE order_items_p0 PARTITION OF order_items FOR VALUES WITH (MODULUS 2, REMAINDER 0);"
    "CREATE TABLE order_items_p1 PARTITION OF order_items FOR VALUES WITH (MODULUS 2, REMAINDER 1)"
)


def _partitioned_schema(manager: ShardManager, shard5_url: str, extra_sql: str = "") -> None:
    """shard-5 added; the demo's tables on every server, ``order_items`` partitioned by hash."""
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    tables = [
        Base.metadata.tables["customers"],
        Base.metadata.tables["orders"],
        Base.metadata.tables["products"],
    ]
    for shard_id in ALL:
        Base.metadata.create_all(manager.engine(shard_id), tables=tables)
    sql_on(manager, ALL, PARTITIONED_ITEMS + extra_sql)


def test_a_user_trigger_on_a_partition_of_a_moved_table_fires_on_the_source(
    manager: ShardManager, shard5_url: str
) -> None:
    _partitioned_schema(manager, shard5_url)
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    sql_on(
        manager,
        list(FOUR.shard_ids),
        "CREATE TABLE item_deletes (customer_id bigint, order_id uuid, item_no int);"
        "CREATE FUNCTION record_item_delete() RETURNS trigger AS $$ BEGIN"
        " INSERT INTO item_deletes VALUES (OLD.customer_id, OLD.order_id, OLD.item_no); RETURN OLD; END"
        " $$ LANGUAGE plpgsql;"
        "CREATE TRIGGER record_item_delete AFTER DELETE ON order_items_p0"
        " FOR EACH ROW EXECUTE FUNCTION record_item_delete()",
    )
    before = sum(scalar_on(manager, s, "SELECT count(*) FROM order_items_p0") for s in FOUR.shard_ids)
    add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    after = sum(scalar_on(manager, s, "SELECT count(*) FROM order_items_p0") for s in FOUR.shard_ids)
    recorded = sum(scalar_on(manager, s, "SELECT count(*) FROM item_deletes") for s in FOUR.shard_ids)
    assert before > after, (before, after)  # items of that partition left the sources
    assert recorded == before - after, (
        f"the partition's trigger recorded {recorded} of {before - after} deletes"
    )


def test_a_foreign_key_on_a_partition_of_a_moved_table_is_checked_on_the_target(
    manager: ShardManager, shard5_url: str
) -> None:
    """``order_items_p0`` (a partition) references a table the move does not know (``skus``),
    which on shard-5 lacks the items' sku: the target must refuse those items (the trusted COPY
    skips that partition's check: the foreign key is listed under the partition only)."""
    _partitioned_schema(manager, shard5_url, ";CREATE TABLE skus (sku varchar(64) PRIMARY KEY)")
    sql_on(manager, list(FOUR.shard_ids), "INSERT INTO skus VALUES ('SKU-0')")
    sql_on(manager, ALL, "ALTER TABLE order_items_p0 ADD FOREIGN KEY (sku) REFERENCES skus (sku)")
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    with pytest.raises(Exception, match="violates foreign key constraint"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    dangling = scalar_on(
        manager,
        "shard-5",
        "SELECT count(*) FROM order_items_p0 i WHERE NOT EXISTS (SELECT 1 FROM skus s WHERE s.sku = i.sku)",
    )
    assert dangling == 0, f"shard-5 holds {dangling} items whose sku it does not have"


def test_an_orphan_on_a_source_whose_foreign_key_was_bypassed_moves_as_it_is(
    manager: ShardManager, shard5_url: str
) -> None:
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    key = next(k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) == "shard-5")
    source = FOUR.get_shard(key)
    orphan = uuid.uuid4()
    with manager.connect(source) as conn:  # as a bulk load with the triggers off leaves it
        conn.execute(text("ALTER TABLE order_items DISABLE TRIGGER ALL"))
        conn.execute(
            text(
                "INSERT INTO order_items (customer_id, order_id, item_no, sku, quantity, unit_price)"
                " VALUES (:k, :o, 0, 'SKU-1', 1, :p)"
            ),
            {"k": key, "o": orphan, "p": Decimal(5)},
        )
        conn.execute(text("ALTER TABLE order_items ENABLE TRIGGER ALL"))
        conn.commit()
    assert orphans(manager, list(FOUR.shard_ids)) == {source: (0, 1)}
    add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    # moved as the source stored it (as logical replication would): once, on its key's new shard
    assert orphans(manager, ALL) == {"shard-5": (0, 1)}
