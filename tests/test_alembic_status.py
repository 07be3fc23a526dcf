"""Where the shards stand: `alembic current`, `shardkit migrations status`, and autogenerate's reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.util import CommandError
from click.testing import CliRunner

from sa_shardkit.alembic import ShardMigrationError
from sa_shardkit.cli import cli
from tests.alembic_support import AlembicProject, execute_on, lines_mentioning, revision_on, shardkit_warnings
from tests.fleet import TestFleet


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    return AlembicProject(tmp_path, shard_map)


def test_current_reports_every_shard_revision_and_the_drift(project: AlembicProject) -> None:
    command.upgrade(project.config("shards=shard-1,shard-2"), "head")
    project.output()
    command.current(project.config())
    out = project.output()
    head = project.head
    assert lines_mentioning(out, ["shard-1", head, "at head"])
    assert lines_mentioning(out, ["shard-2", head, "at head"])
    assert lines_mentioning(out, ["shard-3", "base", "empty"])
    assert lines_mentioning(out, ["shard-4", "base", "empty"])
    assert "DRIFT: not at head: shard-3, shard-4" in out


def test_current_strict_fails_on_drift_and_passes_when_in_sync(project: AlembicProject) -> None:
    command.upgrade(project.config("shard=shard-1"), "head")
    with pytest.raises(CommandError, match="not at head: shard-2, shard-3, shard-4"):
        command.current(project.config("strict=1"))
    command.upgrade(project.config(), "head")
    command.current(project.config("strict=1"))
    assert "OK, all 4 shard(s) at head" in project.output()


def test_current_never_prints_a_password(project: AlembicProject, shard_map: dict[str, str]) -> None:
    # the test servers trust every local connection, so a password in the URL is accepted and ignored
    with_password = {s: u.replace("postgres@", "postgres:s3cret@") for s, u in shard_map.items()}
    secret_project = AlembicProject(project.root / "secret", with_password)
    command.current(secret_project.config())
    out = secret_project.output()
    assert "shard-1 (postgresql+psycopg://postgres:***@" in out
    assert "s3cret" not in out


def test_status_command_exit_code_is_zero_only_when_every_shard_is_at_head(project: AlembicProject) -> None:
    runner = CliRunner()
    args = ["migrations", "status", "--config", str(project.ini)]
    command.upgrade(project.config("shards=shard-1,shard-2,shard-3"), "head")

    behind = runner.invoke(cli, args)
    assert behind.exit_code == 1
    assert lines_mentioning(behind.output, ["shard-4", "empty"])

    command.upgrade(project.config(), "head")
    in_sync = runner.invoke(cli, args)
    assert in_sync.exit_code == 0, in_sync.output
    assert "OK, all 4 shard(s) at head" in in_sync.output


def test_status_command_reports_a_revision_the_scripts_do_not_know(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    execute_on(shard_map["shard-2"], "UPDATE alembic_version SET version_num = 'from_the_future'")
    result = CliRunner().invoke(cli, ["migrations", "status", "--config", str(project.ini)])
    assert result.exit_code == 1
    assert lines_mentioning(result.output, ["shard-2", "from_the_future", "unknown revision"])
    assert "DRIFT" in result.output


def test_shardkit_migrations_upgrade_targets_shards_and_exits_non_zero_on_failure(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["migrations", "upgrade", "--config", str(project.ini), "--shard", "shard-3"])
    assert ok.exit_code == 0, ok.output
    assert [s for s, u in shard_map.items() if revision_on(u)] == ["shard-3"]
    bad = runner.invoke(cli, ["migrations", "upgrade", "--config", str(project.ini), "--shard", "nope"])
    assert bad.exit_code == 2  # bad input: the exit-code contract (sa_shardkit/cli/exits.py)
    assert "unknown shard(s) 'nope'" in bad.output


def test_autogenerate_warns_when_shards_are_at_different_revisions(
    project: AlembicProject,
) -> None:
    command.upgrade(project.config("shards=shard-1,shard-2,shard-4"), "head")
    head = project.head
    with shardkit_warnings() as warned:
        command.revision(project.config(), "nothing new", autogenerate=True, rev_id="auto_a")
    assert len(warned) == 1
    assert f"shard shard-3 is at base but reference shard shard-1 is at {head}" in warned[0]


def test_autogenerate_compares_the_models_with_the_chosen_reference_shard(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    command.upgrade(project.config(), "head")
    execute_on(shard_map["shard-2"], "DROP INDEX ix_orders_status")  # a hand-made change on one shard

    with shardkit_warnings() as warned:
        command.revision(project.config(), "against shard 1", autogenerate=True, rev_id="auto_a")
    assert "ix_orders_status" not in (project.versions / "auto_a_against_shard_1.py").read_text()
    assert len(warned) == 1
    assert (
        "shard shard-2 has the same revision as reference shard shard-1 but a different schema" in warned[0]
    )
    assert "ix_orders_status" in warned[0]

    (project.versions / "auto_a_against_shard_1.py").unlink()
    command.revision(
        project.config("reference=shard-2"), "against shard 2", autogenerate=True, rev_id="auto_b"
    )
    assert (
        'op.create_index(op.f("ix_orders_status")'
        in (project.versions / "auto_b_against_shard_2.py").read_text()
    )


def test_unknown_reference_shard_is_a_clear_error(project: AlembicProject) -> None:
    with pytest.raises(CommandError, match="unknown reference shard 'shard-7'"):
        command.revision(project.config("reference=shard-7"), "x", autogenerate=True)


def test_current_still_reports_the_other_shards_when_one_is_down(
    project: AlembicProject, pg_fleet: TestFleet
) -> None:
    command.upgrade(project.config(), "head")
    project.output()
    pg_fleet.server(1).stop()
    with pytest.raises(ShardMigrationError, match="shard-2"):
        command.current(project.config())
    out = project.output()
    assert lines_mentioning(out, ["shard-2", "unreachable"])
    for shard_id in ("shard-1", "shard-3", "shard-4"):
        assert lines_mentioning(out, [shard_id, project.head, "at head"])


def test_shardkit_migrations_parallel_refuses_urls_the_child_processes_cannot_see(
    project: AlembicProject, shard_map: dict[str, str]
) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "migrations",
            "upgrade",
            "--config",
            str(project.ini),
            "--parallel",
            "2",
            "--url",
            shard_map["shard-1"],
        ],
    )
    assert result.exit_code == 2
    assert "--parallel needs the shards in --config" in result.output
    assert revision_on(shard_map["shard-1"]) == ()
