"""A shard whose alembic_version names a revision the migrations folder lacks fails every command,
naming the revision and the shard, before any shard is touched; never "up to date"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.util import CommandError
from click.testing import CliRunner

from sa_shardkit.cli import cli
from sa_shardkit.cli.exits import EXIT_FAILED
from tests.alembic_support import AlembicProject, execute_on, revision_on

GONE = "gone_rev"


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    project = AlembicProject(tmp_path, shard_map)
    command.upgrade(project.config(), "head")
    execute_on(shard_map["shard-2"], f"UPDATE alembic_version SET version_num = '{GONE}'")
    project.output()
    return project


def revisions(shard_map: dict[str, str]) -> dict[str, tuple[str, ...]]:
    return {shard_id: revision_on(url) for shard_id, url in shard_map.items()}


COMMANDS: dict[str, Callable[[AlembicProject], None]] = {
    "upgrade": lambda p: command.upgrade(p.config(), "head"),
    "downgrade": lambda p: command.downgrade(p.config(), "-1"),
    "stamp": lambda p: command.stamp(p.config(), "head"),
    "current": lambda p: command.current(p.config()),
    "upgrade --sql": lambda p: command.upgrade(p.config(), "0001:head", sql=True),
    "downgrade --sql": lambda p: command.downgrade(p.config(), "head:0001", sql=True),
    "upgrade -x parallel=2": lambda p: command.upgrade(p.config("parallel=2"), "head"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_alembic_commands_name_the_revision_and_the_shard(
    name: str, project: AlembicProject, shard_map: dict[str, str]
) -> None:
    before = revisions(shard_map)
    with pytest.raises(CommandError) as failure:
        COMMANDS[name](project)
    message = str(failure.value)
    assert f"Can't locate revision identified by '{GONE}'" in message
    assert "shard-2" in message
    output = project.output()
    assert "up to date" not in output + message
    assert revisions(shard_map) == before  # refused before any shard was touched


@pytest.mark.parametrize(
    "args",
    [
        ["upgrade"],
        ["upgrade", "--parallel", "2"],
        ["downgrade", "-1"],
        ["downgrade", "-1", "--parallel", "2"],
        ["upgrade", "--sql"],
        ["current"],
        ["status"],
    ],
    ids=" ".join,
)
def test_shardkit_migrations_commands_fail_naming_revision_and_shard(
    args: list[str], project: AlembicProject, shard_map: dict[str, str]
) -> None:
    before = revisions(shard_map)
    result = CliRunner().invoke(cli, ["migrations", *args, "--config", str(project.ini)])
    assert result.exit_code == EXIT_FAILED, result.output
    assert GONE in result.output and "shard-2" in result.output
    assert "up to date" not in result.output
    assert revisions(shard_map) == before
