"""A real mover process (the CLI) SIGKILLed at every step boundary, the last one included, then
``shardkit rebalance --resume`` with the fleet's original configuration and no options repeated.

Done means: every shard at one ring version, nothing in flight, no staging table on any shard
(removed ones included), every row exactly once on the shard the new ring assigns, and the
resumed run kept the batch size the move was started with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, make_url, select, text
from sqlalchemy.orm import Session

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.demo.models import Customer, Order
from sa_shardkit.rebalance import FleetView, RingRouter, install_ring, read_fleet_state
from sa_shardkit.rebalance.record import read_records
from tests.rebalance_data import check_fleet, rows_everywhere, seed
from tests.rebalance_kill import kill_mover_at, url_args

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
CUSTOMERS, ORDERS_EACH = 400, 2
BATCH = 15


def _urls(manager: ShardManager) -> list[str]:
    return url_args(manager, FOUR.shard_ids)


def _staging_tables(manager: ShardManager) -> dict[str, int]:
    found = {}
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            found[shard_id] = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'shardkit_in_%'")
            ).scalar_one()
    return {s: n for s, n in found.items() if n}


def _assert_finished(everything: ShardManager, new: HashRing, version: int) -> None:
    view = FleetView(read_fleet_state(everything))
    assert {s.state.version for s in view.shards.values()} == {version}, {
        s: st.state.version for s, st in view.shards.items()
    }
    assert view.unfinished is None and view.newest is not None and view.newest.ring == new
    assert _staging_tables(everything) == {}
    check_fleet(everything, new, None, CUSTOMERS * ORDERS_EACH)
    record, counts = read_records(everything, version - 1)
    assert record is not None and record.options["batch_size"] == BATCH
    keys, batches = sum(c.keys_moved for c in counts.values()), sum(c.batches for c in counts.values())
    assert keys > 0 and batches * BATCH >= keys  # every run of the move, the resumed one too, used BATCH


def _resume(manager: ShardManager) -> str:
    result = CliRunner().invoke(rebalance_command, [*_urls(manager), "--resume"])
    assert result.exit_code == 0, result.output
    return result.output


ADD_STOPS = {
    "start bump": {"sql": "SET version", "nth": 2},
    "cut-over (targets committed, source not)": {"sql": "SET watermark", "nth": 1},
    "between batches": {"sql": "SET watermark", "nth": 6},
    "final version bump": {"sql": "SET version", "nth": 6},
}


@pytest.mark.parametrize("stop", list(ADD_STOPS.values()), ids=list(ADD_STOPS))
def test_add_killed_at_each_step_is_finished_by_resume(
    manager: ShardManager, shard5_url: str, stop: dict[str, Any]
) -> None:
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    kill_mover_at([*_urls(manager), "--add", "shard-5", shard5_url, "--batch-size", str(BATCH)], stop)
    output = _resume(manager)  # the original configuration: shard-5 is not in it
    assert "Done:" in output and "HashRing([" in output.replace("\n", "")
    new = FOUR.add_shard("shard-5")
    with ShardManager.from_urls(
        {**{s: manager.config(s).primary_url for s in FOUR.shard_ids}, "shard-5": shard5_url}
    ) as five:
        _assert_finished(five, new, 3)


def test_remove_killed_in_the_final_bump_is_finished_by_resume(manager: ShardManager) -> None:
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    # start bump: 4 updates; final bump: the 2nd of 4
    kill_mover_at(
        [*_urls(manager), "--remove", "shard-2", "--batch-size", str(BATCH)], {"sql": "SET version", "nth": 6}
    )
    split = FleetView(read_fleet_state(manager))
    assert split.split and split.unfinished is not None  # killed between two shards' final bumps
    again = CliRunner().invoke(rebalance_command, [*_urls(manager), "--remove", "shard-2"])
    assert again.exit_code == 0, again.output
    assert "Finished the move's last step" in again.output  # not "moved 0 rows" and a split fleet
    _assert_finished(manager, FOUR.remove_shard("shard-2"), 3)
    with manager.connect("shard-2") as conn:
        assert conn.execute(text("SELECT count(*) FROM customers")).scalar_one() == 0


def test_remove_killed_mid_move_is_finished_by_resume(manager: ShardManager) -> None:
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    for shard_id in ("shard-2", "shard-3"):  # staging tables an older version's mover left behind
        with manager.connect(shard_id) as conn:
            conn.execute(text("CREATE UNLOGGED TABLE shardkit_in_orders (LIKE orders)"))
            conn.commit()
    kill_mover_at(
        [*_urls(manager), "--remove", "shard-2", "--batch-size", str(BATCH)],
        {"sql": "SET watermark", "nth": 3},
    )
    _resume(manager)
    _assert_finished(manager, FOUR.remove_shard("shard-2"), 3)


def test_the_stored_joining_url_has_no_password() -> None:
    from sa_shardkit.rebalance.record import url_without_password

    stored = url_without_password("postgresql+psycopg://app:s3cret@db5:5432/app")
    assert "s3cret" not in stored and make_url(stored).username == "app"


def test_keyed_reads_in_the_crash_window_of_a_remove_see_each_row_once(manager: ShardManager) -> None:
    """Killed between a batch's target commits and its source commit: the batch's rows are on two
    shards. Keyed session reads still see every row exactly once (they go by the watermark).
    (Scatter reads are not filtered yet: see the rebalancing page's limits.)"""
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    kill_mover_at(
        [*_urls(manager), "--remove", "shard-2", "--batch-size", str(BATCH)],
        {"sql": "SET watermark", "nth": 1},
    )
    copies = rows_everywhere(manager, list(FOUR.shard_ids))
    assert any(n == 2 for n in copies["customers"].values())  # the window is real: rows on two shards
    RingRouter(manager)
    with manager.sessionmaker()() as session:
        for key in range(1, CUSTOMERS + 1):
            assert session.get(Customer, key) is not None, key
            orders = session.scalars(select(Order).where(Order.customer_id == key)).all()
            assert len(orders) == ORDERS_EACH, (key, len(orders))
    _resume(manager)
    _assert_finished(manager, FOUR.remove_shard("shard-2"), 3)


def _scatter_sees_each_row_once(session: Session, manager: ShardManager) -> None:
    """Scatter reads through the session: a count, every id, ORDER BY ... LIMIT (rows and ORM
    entities), and a GROUP BY over the child table; and Core ``query_all_shards``: each committed
    row exactly once."""
    everyone = list(range(1, CUSTOMERS + 1))
    core = manager.query_all_shards(select(Customer.customer_id).order_by(Customer.customer_id))
    assert core.scalars().all() == everyone
    assert session.scalar(select(func.count()).select_from(Customer)) == CUSTOMERS
    ids = session.scalars(select(Customer.customer_id)).all()
    assert sorted(ids) == everyone, (len(ids), len(set(ids)))
    first = session.scalars(select(Customer.customer_id).order_by(Customer.customer_id).limit(150)).all()
    assert first == everyone[:150]
    last = session.scalars(select(Customer).order_by(Customer.customer_id.desc()).limit(150)).all()
    assert [c.customer_id for c in last] == everyone[::-1][:150]
    keyed = session.scalars(select(Customer.customer_id).where(Customer.customer_id.in_(everyone))).all()
    assert sorted(keyed) == everyone  # routed by key to old and new shards: the same filter
    assert session.scalar(select(func.count(Order.order_id))) == CUSTOMERS * ORDERS_EACH
    per_customer = session.execute(select(Order.customer_id, func.count()).group_by(Order.customer_id)).all()
    assert sorted(per_customer) == [(c, ORDERS_EACH) for c in everyone]


SCATTER_CHANGES = {
    "add": lambda url: ["--add", "shard-5", url],
    "remove": lambda url: ["--remove", "shard-2"],
}


@pytest.mark.parametrize("change", list(SCATTER_CHANGES))
def test_scatter_reads_in_the_crash_window_see_each_row_once(
    manager: ShardManager, shard5_url: str, change: str
) -> None:
    """The mover is SIGKILLed right after a batch's targets committed and before its source did
    (one source's second cut-over: its first batch has moved for good). The batch's rows are on two shards,
    the first batch's on their new shard only; ShardedSession scatters (count, ids, ORDER BY ...
    LIMIT, GROUP BY) see each row exactly once, before and after ``--resume``."""
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    argv = [*_urls(manager), *SCATTER_CHANGES[change](shard5_url), "--batch-size", str(BATCH)]
    source = "shard-1" if change == "add" else "shard-2"  # its batches run one after the other
    kill_mover_at(argv, {"sql": "SET watermark", "nth": 2, "port": manager.config(source).primary_url.port})
    four = {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    urls = {**four, "shard-5": shard5_url} if change == "add" else four
    new = FOUR.add_shard("shard-5") if change == "add" else FOUR.remove_shard("shard-2")
    with ShardManager.from_urls(urls) as reader:
        copies = rows_everywhere(reader, list(urls))
        twice = [pk for pk, n in copies["customers"].items() if n == 2]
        assert twice, "the crash window is real: some customers are on two shards"
        moved = [
            pk
            for (pk, shard), n in copies["customers@"].items()
            if shard == new.get_shard(pk) != FOUR.get_shard(pk) and copies["customers"][(pk,)] == 1
        ]
        assert moved, "the first batch moved for good"
        with reader.sessionmaker()() as session:
            _scatter_sees_each_row_once(session, reader)
        _resume(manager)
        _assert_finished(reader, new, 3)
        with ShardManager.from_urls(urls) as after, after.sessionmaker()() as session:
            _scatter_sees_each_row_once(session, after)


def test_resume_on_a_password_server_says_what_it_needs_then_the_add_command_finishes_it(
    manager: ShardManager, fifth_server: Any, shard5_url: str, tmp_path: Path
) -> None:
    """The joining shard's URL is stored without its password: ``--resume`` with no password at
    hand fails with one line naming the shard and what to supply (no password printed, nothing
    moved); the original ``--add ID URL`` command (password in the URL) then finishes the move."""
    from tests.cli_support import PASSWORD, require_password, shardkit

    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    bare = require_password(fifth_server.servers[0])
    with ShardManager.from_urls({"x": shard5_url}) as admin, admin.connect("x") as conn:
        conn.execute(text("GRANT ALL ON SCHEMA public TO shardkit_pw"))
        conn.commit()
    with_password = bare.replace("shardkit_pw@", f"shardkit_pw:{PASSWORD}@")
    add = ["--add", "shard-5", with_password, "--batch-size", str(BATCH)]
    kill_mover_at([*_urls(manager), *add], {"sql": "SET watermark", "nth": 3})
    no_secrets = {"PGPASSWORD": "", "PGPASSFILE": str(tmp_path / "no-pgpass")}
    resumed = shardkit("rebalance", *_urls(manager), "--resume", cwd=tmp_path, env=no_secrets)
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("shardkit: error:")]
    assert resumed.returncode != 0 and len(errors) == 1, resumed.stderr
    assert "shard-5" in errors[0] and "PGPASSWORD" in errors[0] and "--add shard-5" in errors[0]
    assert PASSWORD not in resumed.stdout + resumed.stderr
    again = shardkit("rebalance", *_urls(manager), *add[:3], cwd=tmp_path, env=no_secrets)
    assert again.returncode == 0, again.stdout + again.stderr
    assert PASSWORD not in again.stdout + again.stderr
    with ShardManager.from_urls(
        {**{s: manager.config(s).primary_url for s in FOUR.shard_ids}, "shard-5": with_password}
    ) as five:
        _assert_finished(five, FOUR.add_shard("shard-5"), 3)
