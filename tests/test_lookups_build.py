"""Backfilling a lookup over existing rows: batched, resumable, with progress; then reads trust it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from sa_shardkit import ShardManager
from sa_shardkit.lookups import lookup_named
from sa_shardkit.lookups.build import build_lookup
from sa_shardkit.lookups.store import forget_readiness, read_state
from tests.lookup_models import LkCustomer, LkOrder, create_schema

ROOT = Path(__file__).resolve().parent.parent


def preexisting_orders(manager: ShardManager, count: int = 60) -> dict[int, int]:
    """Rows written straight to their shards, as if before the lookup was declared (no entries)."""
    owners = {oid: oid % 7 + 1 for oid in range(1, count + 1)}
    for oid, cid in owners.items():
        with manager.connect(manager.shard_for(cid)) as conn:
            conn.execute(insert(LkOrder).values(order_id=oid, customer_id=cid, status="old"))
            conn.commit()
    return owners


@pytest.fixture
def fleet(manager: ShardManager) -> ShardManager:
    create_schema(manager, build=False)
    forget_readiness()
    return manager


def test_an_interrupted_build_resumes_and_then_routes(fleet: ShardManager) -> None:
    owners = preexisting_orders(fleet)
    index = lookup_named("LkOrder.order_id")
    calls: list[tuple[str, int, int]] = []

    def stop_after_two(shard: str, done: int, total: int) -> None:
        calls.append((shard, done, total))
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_lookup(fleet, index, batch_size=4, progress=stop_after_two)
    assert read_state(fleet, index)[0] == "building"
    assert (
        fleet.shards_for(select(LkOrder).where(LkOrder.order_id == 1)) == fleet.shard_ids
    )  # not trusted yet
    seen: list[tuple[str, int, int]] = []
    report = build_lookup(fleet, index, batch_size=4, progress=lambda *a: seen.append(a))
    assert report.resumed
    first_shard = calls[0][0]
    assert report.rows[first_shard] == calls[1][2] - calls[1][1]  # the rest of the interrupted shard only
    assert all(done <= total for _, done, total in seen)
    assert read_state(fleet, index)[0] == "ready"
    with fleet.sessionmaker()() as session:
        for oid, cid in owners.items():
            stmt = select(LkOrder).where(LkOrder.order_id == oid)
            assert fleet.shards_for(stmt) == (fleet.shard_for(cid),)
            assert session.scalars(stmt).one().customer_id == cid


def test_building_a_unique_lookup_reports_existing_duplicates(fleet: ShardManager) -> None:
    a, b = 1, next(k for k in range(2, 100) if fleet.shard_for(k) != fleet.shard_for(1))
    for cid in (a, b):
        with fleet.connect(fleet.shard_for(cid)) as conn:
            conn.execute(insert(LkCustomer).values(customer_id=cid, email="same@example.com", name=""))
            conn.commit()
    report = build_lookup(fleet, lookup_named("LkCustomer.email"))
    assert len(report.duplicates) == 1
    value, kept, refused = report.duplicates[0]
    assert value == "same@example.com" and {kept, refused} == {a, b}


def shardkit(urls: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``shardkit lookups ARGS --url ... --models tests.lookup_models:Base`` in a subprocess."""
    url_args = [arg for url in urls for arg in ("--url", url)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sa_shardkit",
            "lookups",
            *args,
            *url_args,
            "--models",
            "tests.lookup_models:Base",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_build_prints_progress_and_marks_ready(fleet: ShardManager, shard_urls: list[str]) -> None:
    preexisting_orders(fleet, 25)
    done = shardkit(shard_urls, "build", "LkOrder.order_id", "--batch-size", "5")
    assert done.returncode == 0, done.stderr
    assert "LkOrder.order_id: ready; 25 rows scanned, 25 entries added" in done.stdout
    status = shardkit(shard_urls, "status")
    assert status.returncode == 0, status.stderr
    assert "ready" in status.stdout and "not built" in status.stdout  # orders built, the others not
    unknown = shardkit(shard_urls, "build", "Nope.x")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("shardkit: error: no lookup 'Nope.x'")
