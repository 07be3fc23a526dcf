"""`shardkit demo` tells the product's story through the library, and its figures are true.

Embedded (SQLite files; the PostgreSQL steps on throwaway local servers) and on real servers
(`--url`), twice, to show re-runs repeat the story. The figures are checked against the shards
themselves, queried directly.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from alembic.script import ScriptDirectory
from rich.console import Console
from sqlalchemy import create_engine, text

from sa_shardkit import ConfigError, HashRing, ShardManager
from sa_shardkit.demo import fleets
from sa_shardkit.demo.run import STEPS, DemoReport, run_demo
from sa_shardkit.demo.schema import MIGRATIONS
from sa_shardkit.testing import find_pg_bin

CUSTOMERS = 60
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=100)


def assert_story(report: DemoReport, *, customers: int, steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> None:
    assert report.failed_checks == []
    assert sorted(report.steps) == list(steps)
    assert report.skipped == []
    if 1 in steps:
        one = report.figures(1)
        assert one["shards"] == 4 and one["at_head"] == 4 and one["head"] == HEAD
    if 2 in steps:
        two = report.figures(2)
        assert two["customers"] == customers and two["misplaced"] == 0 and two["products_on_every_shard"]
        assert sum(two["customers_per_shard"].values()) == customers
        assert all(n > 0 for n in two["customers_per_shard"].values())
    if 3 in steps:
        three = report.figures(3)
        assert (three["committed_items"], three["committed_status"]) == (3, "paid")
        assert three["failed_rows_inside"] == 3 and three["failed_rows_left"] == 0
        assert three["cross_shard_refused"] == "CrossShardTransactionError"
        assert three["cross_shard_rows_left"] == 0
    if 4 in steps:
        four = report.figures(4)
        assert four["keyed_shards"] == 1 and four["scatter_shards"] == 4
        assert four["orders_counted"] == four["orders_brute_force"] > 0
        assert four["top_matches"] and four["group_by_matches"]
    if 5 in steps:
        five = report.figures(5)
        assert five["in_flight_mid_way"] == "10.00" and five["recovered"] == 1
        assert five["total_before"] == five["total_after"] == f"{100 * customers}.00"
    if 6 in steps:
        six = report.figures(6)
        assert six["lost"] == 0 and six["misplaced"] == 0 and six["writer_error"] == "none"
        assert 0.1 < six["moved_ring_share"] < 0.3 and six["rows_moved"] > 0
        assert six["new_shard_rows"] > 0 and six["written_during_move"] > 0
        assert sum(six["after"].values()) == sum(six["before"].values()) + six["written_during_move"]


def test_demo_lists_its_steps() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sa_shardkit", "demo", "--list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{s.number}. {s.title}{' (PostgreSQL)' if s.needs_postgres else ''}" for s in STEPS.values()
    ]


def test_demo_one_step_from_the_command_line_with_no_server() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sa_shardkit", "demo", "--step", "4", "--customers", "30"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prepared on 4 SQLite files: step 1 (schema), step 2 (customers)" in result.stdout
    assert "4 · Keyed reads and scatter-gather" in result.stdout
    assert "OK 1 step(s)" in result.stdout


@pytest.mark.skipif(
    find_pg_bin() is None, reason="steps 5-6 of the embedded demo need local PostgreSQL binaries"
)
def test_embedded_demo_runs_the_whole_story() -> None:
    report = run_demo(customers=CUSTOMERS, console=quiet())
    assert_story(report, customers=CUSTOMERS)
    assert report.steps[1].where == "4 SQLite files"
    assert report.steps[5].where == report.steps[6].where == "4 throwaway local PostgreSQL servers"


def test_embedded_demo_says_plainly_what_it_skipped_without_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleets, "find_pg_bin", lambda: None)  # as on a machine without PostgreSQL
    out = quiet()
    report = run_demo(customers=30, console=out)
    assert report.skipped == [5, 6]
    assert report.failed_checks == []
    printed = out.file.getvalue()  # type: ignore[attr-defined]
    assert "(skipped)" in printed and "apt-get install postgresql" in printed and "--add-url" in printed


def test_demo_on_real_servers_repeats_the_same_story(shard_urls: list[str], shard5_url: str) -> None:
    first = run_demo(shard_urls, customers=CUSTOMERS, add_url=shard5_url, console=quiet())
    assert_story(first, customers=CUSTOMERS)
    second = run_demo(shard_urls, customers=CUSTOMERS, add_url=shard5_url, console=quiet())
    assert_story(second, customers=CUSTOMERS)
    for n in (1, 2, 4):
        assert first.figures(n) == second.figures(n)
    assert first.figures(6)["before"] == second.figures(6)["before"]
    assert first.figures(6)["moved_ring_share"] == second.figures(6)["moved_ring_share"]

    # where the rows physically are: every customer on the shard the final 5-shard ring assigns
    ring = HashRing([f"shard-{i}" for i in range(1, 6)])
    total = 0
    for i, url in enumerate([*shard_urls, shard5_url], 1):
        engine = create_engine(url)
        with engine.connect() as conn:
            ids = conn.execute(text("SELECT customer_id FROM customers")).scalars().all()
            assert conn.execute(text("SELECT count(*) FROM products")).scalar() == 5
        engine.dispose()
        assert all(ring.get_shard(c) == f"shard-{i}" for c in ids)
        total += len(ids)
    assert total == CUSTOMERS


def test_demo_on_real_servers_without_a_spare_skips_step_6_and_says_how(shard_urls: list[str]) -> None:
    out = quiet()
    report = run_demo(shard_urls, steps=[6], customers=20, console=out)
    assert report.skipped == [6]
    assert "--add-url" in out.file.getvalue()  # type: ignore[attr-defined]


def test_demo_refuses_databases_it_does_not_own(manager: ShardManager, shard_urls: list[str]) -> None:
    with manager.connect("shard-2") as conn:
        conn.execute(text("CREATE TABLE invoices (id int PRIMARY KEY)"))
        conn.execute(text("CREATE TABLE customers (customer_id bigint PRIMARY KEY)"))
        conn.commit()
    with pytest.raises(ConfigError, match=r"refusing to run the demo on shard-2 .*invoices"):
        run_demo(shard_urls, steps=[1], console=quiet())
    with manager.connect("shard-2") as conn:  # nothing was dropped
        names = (
            conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
        )
    assert sorted(names) == ["customers", "invoices"]
