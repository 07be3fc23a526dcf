"""`alembic upgrade` across four real PostgreSQL shards: every revision on every shard, in turn."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from alembic import command
from alembic.util import CommandError
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sa_shardkit.alembic import MIGRATION_LOCK_ID, ShardMigrationError, ShardState
from tests.alembic_support import (
    AlembicProject,
    columns_on,
    execute_on,
    lines_mentioning,
    revision_on,
    tables_on,
)
from tests.fleet import TestFleet

DEMO_TABLES = {"customers", "orders", "order_items", "products", "alembic_version"}

# Two steps: the first succeeds everywhere, the second collides with a table pre-created on shard 3.
LOYALTY_UPGRADE = """
    op.add_column("customers", sa.Column("loyalty_tier", sa.String(20), nullable=True))
    op.create_table(
        "loyalty_cards",
        sa.Column("customer_id", sa.BigInteger(), primary_key=True),
        sa.Column("card_no", sa.String(32), nullable=False),
    )
"""


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    return AlembicProject(tmp_path, shard_map)


def _failing_on_shard_3(project: AlembicProject, shard_map: dict[str, str]) -> tuple[str, str]:
    """Every shard at the project head, then a new revision that collides on shard 3 only."""
    command.upgrade(project.config(), "head")
    old_head = project.head
    new_head = project.add_revision("t_loyalty", LOYALTY_UPGRADE)
    execute_on(shard_map["shard-3"], "CREATE TABLE loyalty_cards (legacy_id integer)")
    project.output()
    return old_head, new_head


def test_upgrade_head_brings_every_shard_to_head_with_the_demo_tables(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    for url in shard_map.values():
        assert revision_on(url) == (project.head,)
        assert DEMO_TABLES <= tables_on(url)
    assert "shardkit: OK, 4 shard(s) done" in project.output()


def test_upgrade_is_a_no_op_on_shards_already_at_head(project: AlembicProject) -> None:
    command.upgrade(project.config(), "head")
    project.output()
    command.upgrade(project.config(), "head")
    output = project.output()
    assert len(lines_mentioning(output, ["up to date"])) == 4
    assert "migrated" not in output


def test_failing_shard_stops_the_run_and_its_ddl_is_rolled_back(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    old_head, new_head = _failing_on_shard_3(project, shard_map)
    with pytest.raises(ShardMigrationError, match="shard-3") as info:
        command.upgrade(project.config(), "head")

    for shard_id in ("shard-1", "shard-2"):
        assert revision_on(shard_map[shard_id]) == (new_head,)
        assert "loyalty_tier" in columns_on(shard_map[shard_id], "customers")
    # shard 3: the first step (add_column) succeeded before the collision, and was rolled back with it
    assert revision_on(shard_map["shard-3"]) == (old_head,)
    assert "loyalty_tier" not in columns_on(shard_map["shard-3"], "customers")
    assert columns_on(shard_map["shard-3"], "loyalty_cards") == {"legacy_id"}
    # shard 4: never attempted
    assert revision_on(shard_map["shard-4"]) == (old_head,)
    assert "loyalty_cards" not in tables_on(shard_map["shard-4"])

    states = {o.shard_id: o.state for o in info.value.report.outcomes}
    assert states == {
        "shard-1": ShardState.MIGRATED,
        "shard-2": ShardState.MIGRATED,
        "shard-3": ShardState.FAILED,
        "shard-4": ShardState.NOT_ATTEMPTED,
    }


def test_failure_summary_and_exit_code_from_the_alembic_command_line(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    old_head, new_head = _failing_on_shard_3(project, shard_map)
    result = project.cli("upgrade", "head")
    assert result.returncode != 0
    out = result.stdout
    assert lines_mentioning(out, ["shard-1", "migrated", f"{old_head} -> {new_head}"])
    assert lines_mentioning(out, ["shard-2", "migrated"])
    assert lines_mentioning(
        out, ["shard-3", "FAILED", f"{old_head} (unchanged)", "DuplicateTable", "loyalty_cards"]
    )
    assert lines_mentioning(out, ["shard-4", "not attempted", old_head])
    assert "FAILED: shardkit: upgrade STOPPED at shard-3" in out
    assert "Traceback" not in result.stdout + result.stderr


def test_rerun_after_fixing_the_conflict_continues_where_it_stopped(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    _, new_head = _failing_on_shard_3(project, shard_map)
    with pytest.raises(ShardMigrationError):
        command.upgrade(project.config(), "head")
    project.output()
    execute_on(shard_map["shard-3"], "DROP TABLE loyalty_cards")

    command.upgrade(project.config(), "head")

    output = project.output()
    assert all(revision_on(url) == (new_head,) for url in shard_map.values())
    assert lines_mentioning(output, ["shard-1", "up to date"])
    assert lines_mentioning(output, ["shard-2", "up to date"])
    assert lines_mentioning(output, ["shard-3", "migrated"])
    assert lines_mentioning(output, ["shard-4", "migrated"])


def test_shard_that_is_down_fails_fast_naming_it_and_no_shard_is_touched(
    project: AlembicProject, shard_map: dict[str, str], pg_fleet: TestFleet
) -> None:
    pg_fleet.server(2).stop()
    started = time.perf_counter()
    with pytest.raises(ShardMigrationError, match="shard-3.*unavailable") as info:
        command.upgrade(project.config(), "head")
    assert time.perf_counter() - started < 15  # a connect attempt, not a hang
    for shard_id in ("shard-1", "shard-2", "shard-4"):
        assert revision_on(shard_map[shard_id]) == ()
        assert "customers" not in tables_on(shard_map[shard_id])
    states = {o.shard_id: o.state for o in info.value.report.outcomes}
    assert states["shard-3"] is ShardState.UNAVAILABLE
    assert {states[s] for s in ("shard-1", "shard-2", "shard-4")} == {ShardState.NOT_ATTEMPTED}
    assert lines_mentioning(project.output(), ["shard-3", "UNAVAILABLE"])


def test_shard_being_migrated_by_another_run_is_refused(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    other_run = create_engine(shard_map["shard-2"], poolclass=NullPool)
    with other_run.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        with pytest.raises(ShardMigrationError, match="shard-2.*another migration run"):
            command.upgrade(project.config(), "head")
    other_run.dispose()
    assert revision_on(shard_map["shard-1"]) == (project.head,)
    assert revision_on(shard_map["shard-2"]) == ()
    assert revision_on(shard_map["shard-3"]) == ()


def test_unknown_target_revision_is_rejected_before_any_shard_is_touched(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    with pytest.raises(CommandError, match="nonexistent"):
        command.upgrade(project.config(), "nonexistent")
    assert all(revision_on(url) == () for url in shard_map.values())
    assert "shardkit:" not in project.output()


def test_shards_come_from_shard_n_url_env_vars_when_the_ini_lists_none(
    tmp_path: Path, shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = AlembicProject(tmp_path, shard_map, list_shards_in_ini=False)
    monkeypatch.setenv("SHARD_1_URL", shard_map["shard-1"])
    monkeypatch.setenv("SHARD_2_URL", shard_map["shard-2"])
    command.upgrade(project.config(), "head")
    assert revision_on(shard_map["shard-1"]) == revision_on(shard_map["shard-2"]) == (project.head,)
    assert revision_on(shard_map["shard-3"]) == ()


def test_lock_timeout_fails_a_shard_whose_table_is_held_by_a_long_transaction(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    project.add_revision("t_tier", 'op.add_column("customers", sa.Column("tier", sa.String(20)))')
    application = create_engine(shard_map["shard-2"], poolclass=NullPool)
    with application.connect() as conn, conn.begin():
        conn.execute(text("SELECT count(*) FROM customers"))  # holds ACCESS SHARE until commit
        started = time.perf_counter()
        with pytest.raises(ShardMigrationError, match="shard-2.*LockNotAvailable"):
            command.upgrade(project.config("lock_timeout=300ms"), "head")
        assert time.perf_counter() - started < 10
    application.dispose()
    assert revision_on(shard_map["shard-1"]) == ("t_tier",)
    assert "tier" not in columns_on(shard_map["shard-2"], "customers")


def test_revision_with_an_autocommit_block_creates_its_index_concurrently_on_every_shard(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    project.add_revision(
        "t_concurrent",
        """
        op.add_column("customers", sa.Column("email", sa.Text(), nullable=True), if_not_exists=True)
        with op.get_context().autocommit_block():
            op.create_index(
                "ix_customers_email", "customers", ["email"], postgresql_concurrently=True, if_not_exists=True
            )
        # after the block's commits, the run still holds the shard's migration lock and timeouts
        op.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            "AND objid = {MIGRATION_LOCK_ID} AND pid = pg_backend_pid()) "
            "OR current_setting('lock_timeout') <> '4s' OR current_setting('statement_timeout') <> '7min' "
            "THEN RAISE EXCEPTION 'lock lost'; END IF; END $$"
        )
        """.replace("{MIGRATION_LOCK_ID}", str(MIGRATION_LOCK_ID)),
    )
    command.upgrade(project.config("lock_timeout=4s", "statement_timeout=7min"), "head")
    for url in shard_map.values():
        assert revision_on(url) == ("t_concurrent",)
        assert "email" in columns_on(url, "customers")
        engine = create_engine(url, poolclass=NullPool)
        with engine.connect() as conn:
            valid = conn.execute(
                text("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_customers_email'::regclass")
            ).scalar()
        engine.dispose()
        assert valid is True


def test_failure_after_an_autocommit_block_reports_the_revision_the_shard_really_reached(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    old_head = project.head
    project.add_revision(
        "t_tier", 'op.add_column("customers", sa.Column("tier", sa.Text()), if_not_exists=True)'
    )
    project.add_revision(
        "t_online_index",
        """
        with op.get_context().autocommit_block():  # commits t_tier (and its version row) first
            op.create_index("ix_orders_created", "orders", ["created_at"], postgresql_concurrently=True)
        """,
    )
    project.add_revision(
        "t_cards", 'op.create_table("cards", sa.Column("id", sa.Integer(), primary_key=True))'
    )
    execute_on(shard_map["shard-1"], "CREATE TABLE cards (legacy integer)")

    with pytest.raises(ShardMigrationError) as info:
        command.upgrade(project.config(), "head")

    assert revision_on(shard_map["shard-1"]) == ("t_tier",)
    failed = info.value.report.outcomes[0]
    assert (failed.shard_id, failed.state, failed.before, failed.after) == (
        "shard-1",
        ShardState.FAILED,
        (old_head,),
        ("t_tier",),
    )
    assert lines_mentioning(
        project.output(), ["shard-1", f"{old_head} -> t_tier (committed before the failure)"]
    )
