"""Schemas where the mover must NOT skip triggers, and a mover that is not a superuser.

``sa_shardkit/rebalance/trusted_rows.py`` runs the targets' COPY and the sources' deletes under
``session_replication_role = replica`` only when every trigger on the moved tables belongs to a
foreign key between moved tables whose key column maps to the key column. Each test here builds a
schema where skipping would be wrong and checks, by the triggers' effects on the servers (plain
SQL), that they fired: an ``ON DELETE CASCADE`` from a table the move does not know, a foreign key
from a moved table to another key, a deferrable unique constraint, a user trigger on the source
only, and a non-superuser mover (``set_config`` of the setting would fail for it). The foreign-key
check of an insert locks the parent ``FOR KEY SHARE`` (its ``xmax`` is set): that is how the
target's checks are seen (as in tests/test_rebalance_trusted_rows.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import BigInteger, ForeignKeyConstraint, Integer, String, insert, make_url, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveOptions, add_shard, install_ring
from tests.rebalance_data import check_fleet, seed
from tests.trust_support import check_consistent, scalar_on, sql_on, watching_trust

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
ALL = [*FOUR.shard_ids, "shard-5"]
CUSTOMERS = 120


def _sql_everywhere(manager: ShardManager, sql: str, shard_ids: list[str] = ALL) -> None:
    sql_on(manager, shard_ids, sql)


def _seeded(manager: ShardManager, shard5_url: str) -> None:
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    Base.metadata.create_all(manager.engine("shard-5"))


def _locked_on_target(manager: ShardManager, table: str = "customers") -> tuple[int, int]:
    """(parent rows on shard-5 locked by a child's foreign-key check, parent rows there)."""
    return (
        scalar_on(manager, "shard-5", f"SELECT count(*) FROM {table} WHERE xmax::text <> '0'"),
        scalar_on(manager, "shard-5", f"SELECT count(*) FROM {table}"),
    )


def test_a_cascade_from_a_table_the_move_does_not_know_fires_on_the_source(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``notes`` (not in the models) references customers ``ON DELETE CASCADE``: when a customer
    leaves its source, its notes there must go too (skipped triggers would leave them dangling)."""
    _seeded(manager, shard5_url)
    _sql_everywhere(
        manager,
        "CREATE TABLE notes (id bigserial PRIMARY KEY, customer_id bigint NOT NULL"
        " REFERENCES customers (customer_id) ON DELETE CASCADE);"
        "INSERT INTO notes (customer_id) SELECT customer_id FROM customers",
    )
    with watching_trust(monkeypatch) as trust:
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    assert 1 not in trust.source and 1 not in trust.target, (trust.source, trust.target)
    for shard_id in ALL:
        dangling = scalar_on(
            manager,
            shard_id,
            "SELECT count(*) FROM notes n WHERE NOT EXISTS"
            " (SELECT 1 FROM customers c WHERE c.customer_id = n.customer_id)",
        )
        assert dangling == 0, (
            f"{shard_id}: {dangling} notes of customers that left (the cascade did not fire)"
        )
    moved = scalar_on(manager, "shard-5", "SELECT count(*) FROM customers")
    left = sum(scalar_on(manager, s, "SELECT count(*) FROM notes") for s in FOUR.shard_ids)
    assert moved > 0 and left == CUSTOMERS - moved
    assert _locked_on_target(manager)[0] > 0  # the target's checks ran too
    check_consistent(manager, FIVE, ALL)


def test_a_restrict_from_a_table_the_move_does_not_know_stops_the_move_and_keeps_the_rows(
    manager: ShardManager, shard5_url: str
) -> None:
    """The same table with the default ``NO ACTION``: the source's delete must be refused, the
    move must fail, and no row may be lost or left on two servers."""
    _seeded(manager, shard5_url)
    _sql_everywhere(
        manager,
        "CREATE TABLE notes (id bigserial PRIMARY KEY, customer_id bigint NOT NULL"
        " REFERENCES customers (customer_id));"
        "INSERT INTO notes (customer_id) SELECT customer_id FROM customers",
    )
    with pytest.raises(Exception, match="foreign key constraint"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    for shard_id in FOUR.shard_ids:
        dangling = scalar_on(
            manager,
            shard_id,
            "SELECT count(*) FROM notes n WHERE NOT EXISTS"
            " (SELECT 1 FROM customers c WHERE c.customer_id = n.customer_id)",
        )
        assert dangling == 0, f"{shard_id}: {dangling} notes lost their customer"
    assert sum(scalar_on(manager, s, "SELECT count(*) FROM customers") for s in FOUR.shard_ids) == CUSTOMERS
    check_consistent(manager, FOUR, list(FOUR.shard_ids))  # shard-5 holds nothing visible-for-good


class OwnBase(DeclarativeBase):
    pass


class Account(OwnBase):
    __tablename__ = "t_accounts"
    __shard_key__ = "account_id"

    account_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Entry(OwnBase):
    __tablename__ = "t_entries"
    __shard_key__ = "account_id"
    __table_args__ = (ForeignKeyConstraint(["account_id"], ["t_accounts.account_id"], ondelete="CASCADE"),)

    account_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    entry_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(BigInteger)


ACCOUNTS = 120


def _own_seed(manager: ShardManager, shard5_url: str, owner: dict[int, int]) -> None:
    """Accounts 1..ACCOUNTS on their FOUR shard, one entry each whose ``owner_id`` is ``owner[k]``,
    and a foreign key ``owner_id -> t_accounts`` (not key to key) on every shard."""
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    for shard_id in ALL:
        OwnBase.metadata.create_all(manager.engine(shard_id))
    for shard_id in FOUR.shard_ids:
        keys = [k for k in range(1, ACCOUNTS + 1) if FOUR.get_shard(k) == shard_id]
        with manager.connect(shard_id) as conn, conn.begin():
            conn.execute(insert(Account), [{"account_id": k, "name": f"a{k}"} for k in keys])
            conn.execute(
                insert(Entry),
                [{"account_id": k, "entry_id": 0, "owner_id": owner[k]} for k in keys],
            )
    _sql_everywhere(
        manager,
        "ALTER TABLE t_entries ADD CONSTRAINT t_entries_owner FOREIGN KEY (owner_id) REFERENCES t_accounts (account_id)",
    )
    install_ring(manager, FOUR)


def test_a_foreign_key_to_another_key_is_checked_on_the_target(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each entry's owner is its own account (the same value, another column): the move succeeds,
    and the target's checks of that foreign key ran (the owners on shard-5 are locked by them)."""
    _own_seed(manager, shard5_url, {k: k for k in range(1, ACCOUNTS + 1)})
    with watching_trust(monkeypatch) as trust:
        add_shard(manager, "shard-5", OwnBase, options=MoveOptions(batch_size=8))
    assert 1 not in trust.source and 1 not in trust.target, (trust.source, trust.target)
    locked, accounts = _locked_on_target(manager, "t_accounts")
    assert accounts > 0 and locked > 0
    total = sum(scalar_on(manager, s, "SELECT count(*) FROM t_entries") for s in ALL)
    assert total == ACCOUNTS
    for shard_id in ALL:
        with manager.connect(shard_id) as conn:
            keys = conn.execute(text("SELECT account_id FROM t_accounts")).scalars().all()
        assert all(FIVE.get_shard(k) == shard_id for k in keys), shard_id


def test_an_owner_that_stays_behind_stops_the_move(manager: ShardManager, shard5_url: str) -> None:
    """Each moving account's entry is owned by an account that stays on the source: the target
    must refuse the entry (skipped checks would commit it without its owner) and nothing is lost."""
    owner = {}
    for k in range(1, ACCOUNTS + 1):
        stays = [
            s for s in range(1, ACCOUNTS + 1) if FOUR.get_shard(s) == FOUR.get_shard(k) == FIVE.get_shard(s)
        ]
        owner[k] = k if FIVE.get_shard(k) == FOUR.get_shard(k) else stays[0]
    _own_seed(manager, shard5_url, owner)
    with pytest.raises(Exception, match="foreign key constraint"):
        add_shard(manager, "shard-5", OwnBase, options=MoveOptions(batch_size=8))
    dangling = {
        s: scalar_on(
            manager,
            s,
            "SELECT count(*) FROM t_entries e WHERE NOT EXISTS"
            " (SELECT 1 FROM t_accounts a WHERE a.account_id = e.owner_id)",
        )
        for s in ALL
    }
    assert dangling == dict.fromkeys(ALL, 0)
    assert sum(scalar_on(manager, s, "SELECT count(*) FROM t_entries") for s in FOUR.shard_ids) == ACCOUNTS
    assert scalar_on(manager, "shard-5", "SELECT count(*) FROM t_entries") == 0


def test_a_deferrable_unique_constraint_is_checked_on_the_target(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``customers.name`` is ``UNIQUE DEFERRABLE`` (checked by a trigger, not the index): a
    customer already on shard-5 has the name of one that moves there. The move must fail on it;
    skipped triggers would store both names."""
    _seeded(manager, shard5_url)
    _sql_everywhere(
        manager,
        "ALTER TABLE customers ADD CONSTRAINT customers_name_u UNIQUE (name) DEFERRABLE INITIALLY IMMEDIATE",
    )
    moving = next(k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) == "shard-5")
    newcomer = next(k for k in range(10_000, 20_000) if FIVE.get_shard(k) == "shard-5")
    with manager.connect("shard-5") as conn:  # a customer written on its new shard (its key is new)
        conn.execute(
            text("INSERT INTO customers (customer_id, name, balance) VALUES (:k, :n, 0)"),
            {"k": newcomer, "n": f"c{moving}"},
        )
        conn.commit()
    with watching_trust(monkeypatch) as trust, pytest.raises(Exception, match="customers_name_u"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    assert 1 not in trust.target, trust.target
    for shard_id in ALL:
        twice = scalar_on(
            manager,
            shard_id,
            "SELECT count(*) FROM (SELECT name FROM customers GROUP BY name HAVING count(*) > 1) d",
        )
        assert twice == 0, f"{shard_id}: {twice} names stored twice under a unique constraint"


def test_a_user_trigger_on_the_source_only_fires_on_every_delete(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit trigger on the sources' order_items (not on shard-5) records each deleted row:
    every item the move takes away from a source is recorded there."""
    _seeded(manager, shard5_url)
    _sql_everywhere(
        manager,
        "CREATE TABLE item_deletes (customer_id bigint, order_id uuid, item_no int);"
        "CREATE FUNCTION record_item_delete() RETURNS trigger AS $$ BEGIN"
        " INSERT INTO item_deletes VALUES (OLD.customer_id, OLD.order_id, OLD.item_no); RETURN OLD; END"
        " $$ LANGUAGE plpgsql;"
        "CREATE TRIGGER record_item_delete AFTER DELETE ON order_items"
        " FOR EACH ROW EXECUTE FUNCTION record_item_delete()",
        list(FOUR.shard_ids),
    )
    with watching_trust(monkeypatch) as trust:
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
    assert 1 not in trust.source, trust.source
    assert 1 in trust.target, trust.target  # shard-5 has no user trigger: its COPY may skip them
    moved = scalar_on(manager, "shard-5", "SELECT count(*) FROM order_items")
    recorded = sum(scalar_on(manager, s, "SELECT count(*) FROM item_deletes") for s in FOUR.shard_ids)
    assert moved > 0 and recorded == moved, (moved, recorded)
    for shard_id in FOUR.shard_ids:  # each source recorded exactly the items that left it
        stale = scalar_on(
            manager,
            shard_id,
            "SELECT count(*) FROM item_deletes d JOIN order_items i USING (customer_id, order_id, item_no)",
        )
        assert stale == 0
    check_consistent(manager, FIVE, ALL)


ROLE = "shardkit_mover"


@pytest.fixture
def non_superuser(
    shard_map: dict[str, str], shard5_url: str
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """(the five servers' superuser URLs, the same as a role that is not a superuser but owns the
    empty schema)."""
    urls = {**shard_map, "shard-5": shard5_url}
    _as_admin(
        urls,
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}')"
        f" THEN CREATE ROLE {ROLE} LOGIN NOSUPERUSER; END IF; END $$;"
        f" ALTER SCHEMA public OWNER TO {ROLE}",
    )
    yield urls, {s: make_url(u).set(username=ROLE).render_as_string(False) for s, u in urls.items()}


def _as_admin(urls: dict[str, str], sql: str) -> None:
    with ShardManager.from_urls(urls) as admin:
        _sql_everywhere(admin, sql, list(urls))


@pytest.mark.parametrize("granted", [False, True], ids=["plain", "granted-set-on-parameter"])
def test_a_mover_that_is_not_a_superuser_moves_with_every_check(
    non_superuser: tuple[dict[str, str], dict[str, str]], monkeypatch: pytest.MonkeyPatch, granted: bool
) -> None:
    """The whole move as a non-superuser (with or without ``GRANT SET ON PARAMETER
    session_replication_role``, PostgreSQL 15+): no error from ``set_config``, the checks ran."""
    admin_urls, role_urls = non_superuser
    four = {s: u for s, u in role_urls.items() if s != "shard-5"}
    if granted:
        _as_admin(admin_urls, f"GRANT SET ON PARAMETER session_replication_role TO {ROLE}")
    try:
        with ShardManager.from_urls(four, connect_timeout=3) as manager:
            assert (
                scalar_on(manager, "shard-1", "SELECT CAST(current_setting('is_superuser') = 'on' AS int)")
                == 0
            )
            seed(manager, FOUR, CUSTOMERS, 2, 1)
            install_ring(manager, FOUR)
            manager.add_shard(ShardConfig(id="shard-5", url=role_urls["shard-5"]))
            with watching_trust(monkeypatch) as trust:
                add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=8))
            assert trust.source and trust.target and 1 not in trust.source and 1 not in trust.target
            locked, parents = _locked_on_target(manager)
            assert parents > 0 and locked > 0  # the target's foreign-key checks ran
            check_fleet(manager, FIVE, None, CUSTOMERS * 2)
            check_consistent(manager, FIVE, ALL)
    finally:
        if granted:
            _as_admin(admin_urls, f"REVOKE SET ON PARAMETER session_replication_role FROM {ROLE}")
