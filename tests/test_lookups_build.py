"""Backfilling a lookup over existing rows: batched, resumable, with progress; then reads trust it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from sa_shardkit import DuplicateKeyError, ShardManager
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


def _same_email_twice(fleet: ShardManager) -> tuple[int, int]:
    """Two customers on two shards with one email, written before the lookup was built."""
    a, b = 1, next(k for k in range(2, 100) if fleet.shard_for(k) != fleet.shard_for(1))
    for cid, email in ((a, "same@example.com"), (b, "same@example.com"), (b + 1, "own@example.com")):
        with fleet.connect(fleet.shard_for(cid)) as conn:
            conn.execute(insert(LkCustomer).values(customer_id=cid, email=email, name=""))
            conn.commit()
    return a, b


def test_building_a_unique_lookup_over_duplicates_fails_and_leaves_it_untrusted(fleet: ShardManager) -> None:
    a, b = _same_email_twice(fleet)
    index = lookup_named("LkCustomer.email")
    with pytest.raises(DuplicateKeyError) as info:
        build_lookup(fleet, index)
    error = info.value
    assert (error.column, error.value) == ("LkCustomer.email", "same@example.com")
    assert error.holders == (
        ("same@example.com", sorted([(a, fleet.shard_for(a)), (b, fleet.shard_for(b))], key=repr)),
    )
    for cid in (a, b):
        assert f"customer_id={cid} (shard {fleet.shard_for(cid)!r})" in str(error)
    assert read_state(fleet, index)[0] == "duplicates"
    same = select(LkCustomer).where(LkCustomer.email == "same@example.com")
    assert fleet.shards_for(same) == fleet.shard_ids  # not trusted: a read scans every shard
    with fleet.sessionmaker()() as session:
        assert sorted(c.customer_id for c in session.scalars(same)) == sorted([a, b])  # both found
    with fleet.sessionmaker()() as session:  # a new row cannot take the value either
        session.add(LkCustomer(customer_id=b + 2, email="same@example.com"))
        with pytest.raises(DuplicateKeyError):
            session.commit()
    with fleet.sessionmaker()() as session:  # the fix: give one of them another address
        fixed = session.get(LkCustomer, b)
        assert fixed is not None
        fixed.email = "other@example.com"
        session.commit()
    report = build_lookup(fleet, index)  # re-checks the values it recorded, finds none shared
    assert report.duplicates == [] and read_state(fleet, index)[0] == "ready"
    forget_readiness()
    with fleet.sessionmaker()() as session:
        for email, cid in (("same@example.com", a), ("other@example.com", b), ("own@example.com", b + 1)):
            stmt = select(LkCustomer).where(LkCustomer.email == email)
            assert fleet.shards_for(stmt) == (fleet.shard_for(cid),)
            assert session.scalars(stmt).one().customer_id == cid


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


def test_cli_build_over_duplicates_exits_1_naming_them(fleet: ShardManager, shard_urls: list[str]) -> None:
    a, b = _same_email_twice(fleet)
    done = shardkit(shard_urls, "build", "LkCustomer.email")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("shardkit: error: LkCustomer.email is declared unique, but 1 value(s)")
    assert (
        "'same@example.com'" in done.stderr
        and "run `shardkit lookups build LkCustomer.email` again" in done.stderr
    )
    listed = " ".join(done.stdout.split())
    assert "duplicate email='same@example.com':" in listed
    for cid in (a, b):
        assert f"customer_id={cid} on {fleet.shard_for(cid)}" in listed
    status = shardkit(shard_urls, "status")
    assert "duplicates" in status.stdout
