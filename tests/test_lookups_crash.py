"""A writer SIGKILLed at every point between its two writes never makes a committed row unfindable,
and no entry it leaves behind makes a read wrong; concurrent writers of one unique value: one wins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from sa_shardkit import ShardManager
from sa_shardkit.lookups import lookup_named
from sa_shardkit.lookups.build import repair_lookup
from sa_shardkit.lookups.store import forget_readiness
from tests.lookup_models import LkCustomer, LkOrder, create_schema

ROOT = Path(__file__).resolve().parent.parent
POINTS = ["mid_flush", "after_entries", "before_removals", "before_unlock", "none"]


def run_writer(urls: list[str], *args: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.lookup_writer", ",".join(urls), *args], env=env, timeout=120, cwd=ROOT
    )
    return done.returncode


def physical_orders(manager: ShardManager) -> dict[int, tuple[str, int]]:
    """order_id -> (shard, customer_id), read from every server directly."""
    found = {}
    for shard in manager.shard_ids:
        with manager.connect(shard) as conn:
            for oid, cid in conn.execute(select(LkOrder.order_id, LkOrder.customer_id)):
                found[oid] = (shard, cid)
    return found


def entry_values(manager: ShardManager, name: str) -> set[object]:
    table = lookup_named(name).table
    values = set()
    for shard in manager.shard_ids:
        with manager.connect(shard) as conn:
            values.update(conn.execute(select(table.c.value)).scalars())
    return values


def assert_reads_right(manager: ShardManager, probes: set[int]) -> None:
    """Every committed row is found through its lookup; every probed value reads exactly what exists."""
    rows = physical_orders(manager)
    with manager.sessionmaker()() as session:
        for oid in probes | set(rows) | entry_values(manager, "LkOrder.order_id"):
            stmt = select(LkOrder).where(LkOrder.order_id == oid)
            got = [(o.order_id, o.customer_id) for o in session.scalars(stmt)]
            want = [(oid, rows[oid][1])] if oid in rows else []
            assert got == want, f"order {oid}: read {got}, stored {want}"
            if oid in rows:
                assert rows[oid][0] in manager.shards_for(stmt)
                assert len(manager.shards_for(stmt)) == 1


@pytest.fixture
def fleet(manager: ShardManager) -> ShardManager:
    create_schema(manager)
    forget_readiness()
    with manager.sessionmaker()() as session:
        session.add_all([LkOrder(order_id=10, customer_id=1), LkOrder(order_id=20, customer_id=2)])
        session.commit()
    return manager


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize(
    "scenario, args, probes",
    [
        ("insert", ("30", "3"), {30}),
        ("delete", ("10",), {10}),
        ("change", ("20", "21"), {20, 21}),
    ],
    ids=["insert", "delete", "change-value"],
)
def test_a_writer_killed_at_any_point_leaves_reads_right(
    fleet: ShardManager,
    shard_urls: list[str],
    scenario: str,
    args: tuple[str, ...],
    probes: set[int],
    point: str,
) -> None:
    code = run_writer(shard_urls, scenario, point, *args)
    assert code == (0 if point == "none" else -signal.SIGKILL)
    before = physical_orders(fleet)
    if point in ("mid_flush", "after_entries"):  # the owning transaction died: nothing changed
        assert set(before) == {10, 20}
    elif scenario == "insert":
        assert 30 in before
    assert_reads_right(fleet, probes | {10, 20})
    repair_lookup(fleet, lookup_named("LkOrder.order_id"))
    assert entry_values(fleet, "LkOrder.order_id") == set(physical_orders(fleet))  # nothing stale left
    assert_reads_right(fleet, probes | {10, 20})
    # the killed writer's value locks died with it: the same values can be written again at once
    assert run_writer(shard_urls, "insert", "none", "40", "3") == 0


@pytest.mark.parametrize("point", ["mid_flush", "after_entries", "before_unlock"])
def test_a_killed_unique_writer_never_blocks_or_duplicates_the_value(
    fleet: ShardManager, shard_urls: list[str], point: str
) -> None:
    code = run_writer(shard_urls, "email", point, "5", "kim@example.com")
    assert code == -signal.SIGKILL
    committed = point == "before_unlock"
    other = next(k for k in range(6, 200) if fleet.shard_for(k) != fleet.shard_for(5))
    second = run_writer(shard_urls, "email", "none", str(other), "kim@example.com")
    assert second == (1 if committed else 0)  # 1: DuplicateKeyError, the first one's row stands
    holders = [
        cid
        for shard in fleet.shard_ids
        for cid in fleet.run_on_all(
            "SELECT customer_id FROM lk_customers WHERE email = 'kim@example.com'", shard_ids=[shard]
        )[shard]
    ]
    assert [h[0] for h in holders] == [5 if committed else other]
    with fleet.sessionmaker()() as session:
        found = session.scalars(select(LkCustomer).where(LkCustomer.email == "kim@example.com")).one()
        assert found.customer_id == (5 if committed else other)


def test_two_processes_racing_for_the_same_emails_one_wins_each(
    fleet: ShardManager, shard_urls: list[str], tmp_path: Path
) -> None:
    emails = [f"user{i}@example.com" for i in range(25)]
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # keys 1 and 2 start on different shards? pick them so every pair of keys differs in shard
    base_a = 1
    base_b = next(
        k
        for k in range(2, 200)
        if all(fleet.shard_for(k + 1000 * i) != fleet.shard_for(base_a + 1000 * i) for i in range(25))
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.lookup_writer",
                ",".join(shard_urls),
                "race",
                "none",
                str(base),
                str(go),
                *emails,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for base in (base_a, base_b)
    ]
    go.touch()
    outputs = [p.communicate(timeout=180)[0].split("\n") for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    results: dict[str, list[str]] = {}
    for out in outputs:
        for line in filter(None, out):
            verdict, email = line.split()
            results.setdefault(email, []).append(verdict)
    assert {e: sorted(v) for e, v in results.items()} == {e: ["dup", "ok"] for e in emails}
    counts = fleet.run_on_all("SELECT email, count(*) FROM lk_customers GROUP BY email")
    total: dict[str, int] = {}
    for rows in counts.values():
        for email, n in rows:
            total[email] = total.get(email, 0) + n
    assert total == dict.fromkeys(emails, 1)
    assert entry_values(fleet, "LkCustomer.email") == set(emails)
