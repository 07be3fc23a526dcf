"""The Python API: Alembic's commands returning the per-shard report, and one ad-hoc statement on
every shard in turn (stop at the first failure), checked on each server directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from sa_shardkit import ShardManager
from sa_shardkit.alembic import (
    ShardMigrationError,
    current,
    downgrade,
    run_on_every_shard,
    stamp,
    upgrade,
)
from sa_shardkit.testing import free_port
from tests.alembic_support import AlembicProject, columns_on, execute_on, revision_on


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    return AlembicProject(tmp_path, shard_map)


def states(report: object) -> list[str]:
    return [o.state.value for o in report.outcomes]  # type: ignore[attr-defined]


def test_upgrade_returns_each_shards_outcome(project: AlembicProject, shard_map: dict[str, str]) -> None:
    head = project.head
    report = upgrade(project.ini, "head")
    assert states(report) == ["migrated"] * 4
    assert [o.after for o in report.outcomes] == [(head,)] * 4
    assert {revision_on(url) for url in shard_map.values()} == {(head,)}
    assert states(upgrade(str(project.ini))) == ["up to date"] * 4


def test_current_downgrade_and_stamp_report_per_shard(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    head = project.head
    upgrade(project.ini, "head", shards=["shard-1", "shard-2"])
    seen = current(project.ini)
    assert states(seen) == ["checked"] * 4
    assert [o.after for o in seen.outcomes] == [(head,), (head,), (), ()]
    down = downgrade(project.ini, "-1", shards=["shard-2"])
    assert [o.shard_id for o in down.outcomes] == ["shard-2"] and states(down) == ["migrated"]
    assert revision_on(shard_map["shard-2"]) != (head,)
    stamped = stamp(project.ini, "head", shards=["shard-2"])
    assert states(stamped) == ["migrated"] and revision_on(shard_map["shard-2"]) == (head,)


def test_a_failed_upgrade_raises_with_the_report(project: AlembicProject, shard_map: dict[str, str]) -> None:
    upgrade(project.ini, "head")
    project.add_revision(
        "t_collide", "op.create_table('loyalty', sa.Column('k', sa.Integer, primary_key=True))"
    )
    execute_on(shard_map["shard-3"], "CREATE TABLE loyalty (k int)")
    with pytest.raises(ShardMigrationError) as failure:
        upgrade(project.ini, "head")
    assert states(failure.value.report) == ["migrated", "migrated", "FAILED", "not attempted"]
    assert "DuplicateTable" in (failure.value.report.outcomes[2].error or "")
    assert revision_on(shard_map["shard-4"]) != ("t_collide",)


def test_a_statement_runs_on_every_shard_in_turn(manager: ShardManager, shard_map: dict[str, str]) -> None:
    manager.run_on_all("CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text)")
    report = run_on_every_shard(manager, "ALTER TABLE customers ADD COLUMN IF NOT EXISTS tier text")
    assert states(report) == ["applied"] * 4
    assert all("tier" in columns_on(url, "customers") for url in shard_map.values())
    assert (
        states(run_on_every_shard(manager, "ALTER TABLE customers ADD COLUMN IF NOT EXISTS tier text"))
        == ["applied"] * 4
    )  # idempotent: a re-run is harmless


def test_a_statement_stops_at_the_first_failing_shard(
    manager: ShardManager, shard_map: dict[str, str]
) -> None:
    manager.run_on_all("CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text)")
    execute_on(shard_map["shard-3"], "ALTER TABLE customers ADD COLUMN tier text")
    with pytest.raises(ShardMigrationError) as failure:
        run_on_every_shard(manager, "ALTER TABLE customers ADD COLUMN tier text")
    report = failure.value.report
    assert states(report) == ["applied", "applied", "FAILED", "not attempted"]
    assert "DuplicateColumn" in (report.outcomes[2].error or "")
    assert "tier" not in columns_on(shard_map["shard-4"], "customers")
    assert "STOPPED at shard-3" in str(failure.value)


def test_a_statement_outside_a_transaction_for_concurrent_indexes(
    manager: ShardManager, shard_map: dict[str, str]
) -> None:
    manager.run_on_all("CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text)")
    statement = "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_customers_name ON customers (name)"
    assert states(run_on_every_shard(manager, statement, transaction=False)) == ["applied"] * 4
    rows = manager.run_on_all("SELECT indexname FROM pg_indexes WHERE indexname = 'ix_customers_name'")
    assert all(found == [("ix_customers_name",)] for found in rows.values())


def test_nothing_runs_unless_every_shard_answers(shard_map: dict[str, str]) -> None:
    urls = {**shard_map, "shard-5": f"postgresql+psycopg://app@127.0.0.1:{free_port()}/app"}
    with ShardManager.from_urls(urls, connect_timeout=2) as manager:
        manager.run_on_all("CREATE TABLE t (k int)", shard_ids=list(shard_map))
        with pytest.raises(ShardMigrationError) as failure:
            run_on_every_shard(manager, "ALTER TABLE t ADD COLUMN v int")
    assert states(failure.value.report) == ["not attempted"] * 4 + ["UNAVAILABLE"]
    assert all("v" not in columns_on(url, "t") for url in shard_map.values())
