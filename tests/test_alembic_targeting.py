"""Targeting shards (`-x shard=`, `-x shards=`), offline `--sql` per shard, downgrade order, hooks."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

import pytest
from alembic import command
from alembic.util import CommandError

from sa_shardkit.alembic import ShardMigrationError, ShardState
from tests.alembic_support import AlembicProject, execute_on, interval_on, revision_on, tables_on


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    return AlembicProject(tmp_path, shard_map)


def test_x_shard_migrates_only_that_shard(project: AlembicProject, shard_map: dict[str, str]) -> None:
    command.upgrade(project.config("shard=shard-2"), "head")
    assert {s: revision_on(u) for s, u in shard_map.items()} == {
        "shard-1": (),
        "shard-2": (project.head,),
        "shard-3": (),
        "shard-4": (),
    }


def test_x_shards_migrates_the_listed_shards_in_configuration_order(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config("shards=shard-4,shard-1"), "head")
    assert [s for s, u in shard_map.items() if revision_on(u)] == ["shard-1", "shard-4"]
    progress = re.findall(r"\] (shard-\d): upgrade", project.output())
    assert progress == ["shard-1", "shard-4"]


def test_unknown_shard_id_is_rejected_before_any_shard_is_touched(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    with pytest.raises(CommandError, match="unknown shard.*'shard-9'.*configured shards: shard-1"):
        command.upgrade(project.config("shards=shard-1,shard-9"), "head")
    assert all(revision_on(url) == () for url in shard_map.values())


def test_downgrade_runs_shards_in_reverse_order(project: AlembicProject, shard_map: dict[str, str]) -> None:
    command.upgrade(project.config(), "head")
    project.output()
    command.downgrade(project.config(), "base")
    progress = re.findall(r"\] (shard-\d): downgrade", project.output())
    assert progress == ["shard-4", "shard-3", "shard-2", "shard-1"]
    for url in shard_map.values():
        assert revision_on(url) == ()
        assert "customers" not in tables_on(url)


def test_offline_sql_is_one_delimited_script_per_shard_and_touches_nothing(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head", sql=True)
    sql = project.output()
    blocks = re.findall(
        r"-- ===== shardkit: BEGIN shard (shard-\d).*?-- ===== shardkit: END shard \1", sql, re.S
    )
    assert blocks == ["shard-1", "shard-2", "shard-3", "shard-4"]
    for shard_id in shard_map:
        block = sql.split(f"BEGIN shard {shard_id}")[1].split(f"END shard {shard_id}")[0]
        assert "CREATE TABLE IF NOT EXISTS customers" in block
        assert re.search(rf"(INSERT INTO|UPDATE) alembic_version .*'{project.head}'", block)
        # one transaction, plus one more commit per autocommit block (CREATE INDEX CONCURRENTLY)
        statements = re.findall(r"^(BEGIN|COMMIT);$", block, re.M)
        assert statements and statements[0] == "BEGIN" and statements[-1] == "COMMIT"
        assert statements == ["BEGIN", "COMMIT"] * (len(statements) // 2)
    assert all(revision_on(url) == () for url in shard_map.values())


def test_offline_sql_sets_the_configured_timeouts_before_the_first_transaction(
    project: AlembicProject,
) -> None:
    command.upgrade(
        project.config("shard=shard-2", "lock_timeout=2s", "statement_timeout=1min"), "head", sql=True
    )
    block = project.output().split("BEGIN shard shard-2")[1]
    lock, statement, begin = (
        block.index(s) for s in ("SET lock_timeout = '2s';", "SET statement_timeout = '1min';", "BEGIN;")
    )
    assert lock < statement < begin


def test_offline_sql_dir_writes_one_file_per_selected_shard(project: AlembicProject, tmp_path: Path) -> None:
    out = tmp_path / "sql"
    command.upgrade(project.config(f"sql_dir={out}", "shards=shard-1,shard-3"), "head", sql=True)
    assert sorted(p.name for p in out.iterdir()) == ["shard-1.sql", "shard-3.sql"]
    assert "CREATE TABLE IF NOT EXISTS orders" in (out / "shard-3.sql").read_text()


VETO_ENV = """
from alembic import context
from alembic.util import CommandError

from sa_shardkit.alembic import MigrationPlan, run_migrations
from sa_shardkit.demo.models import Base


def veto(plan: MigrationPlan) -> None:
    if plan.x_args.get("veto"):
        raise CommandError(f"vetoed {plan.command} {plan.destination} on {','.join(plan.shard_ids)}")


run_migrations(Base.metadata, before_migrate=[veto])
"""


def test_before_migrate_hook_sees_the_plan_and_can_stop_the_run(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    (project.migrations / "env.py").write_text(VETO_ENV)
    with pytest.raises(CommandError, match="vetoed upgrade head on shard-1,shard-2,shard-3,shard-4"):
        command.upgrade(project.config("veto=1"), "head")
    assert all(revision_on(url) == () for url in shard_map.values())
    command.upgrade(project.config(), "head")  # no veto: runs
    with pytest.raises(CommandError, match="vetoed downgrade base on shard-4,shard-3,shard-2,shard-1"):
        command.downgrade(project.config("veto=1"), "base")
    assert all(revision_on(url) == (project.head,) for url in shard_map.values())


def test_x_parallel_migrates_shards_at_the_same_time(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    project.add_revision(
        "t_slow",
        """
        op.execute("CREATE TABLE IF NOT EXISTS ran (started timestamptz, finished timestamptz)")
        op.execute("INSERT INTO ran SELECT clock_timestamp(), clock_timestamp() + interval '3 seconds'")
        op.execute("SELECT pg_sleep(3)")
        """,
    )
    command.upgrade(project.config("parallel=4"), "head")
    intervals = [interval_on(url) for url in shard_map.values()]
    assert all(revision_on(url) == ("t_slow",) for url in shard_map.values())
    # one after another, no two 3-second migrations could overlap in time
    overlapping = [(a, b) for a, b in combinations(intervals, 2) if a[0] < b[1] and b[0] < a[1]]
    assert overlapping
    assert "OK, 4 shard(s) done" in project.output()


def test_x_parallel_starts_no_further_shard_after_a_failure(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    old_head = project.head
    project.add_revision(
        "t_cards",
        """
        op.execute("DO $$ BEGIN IF to_regclass('slow_marker') IS NOT NULL THEN PERFORM pg_sleep(4); END IF; END $$")
        op.create_table("cards", sa.Column("id", sa.Integer(), primary_key=True))
        """,
    )
    execute_on(shard_map["shard-1"], "CREATE TABLE cards (legacy integer)")  # shard-1 fails at once
    execute_on(shard_map["shard-2"], "CREATE TABLE slow_marker ()")  # shard-2 is still running then

    with pytest.raises(ShardMigrationError, match="shard-1.*DuplicateTable") as info:
        command.upgrade(project.config("parallel=2"), "head")

    states = {o.shard_id: o.state for o in info.value.report.outcomes}
    assert states == {
        "shard-1": ShardState.FAILED,
        "shard-2": ShardState.MIGRATED,
        "shard-3": ShardState.NOT_ATTEMPTED,
        "shard-4": ShardState.NOT_ATTEMPTED,
    }
    assert [revision_on(url) for url in shard_map.values()] == [
        (old_head,),
        ("t_cards",),
        (old_head,),
        (old_head,),
    ]


def test_x_parallel_must_be_a_positive_number(project: AlembicProject) -> None:
    with pytest.raises(CommandError, match="parallel='many'"):
        command.upgrade(project.config("parallel=many"), "head")
