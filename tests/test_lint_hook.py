"""`alembic upgrade -x lint=1` through the sharded env: unsafe revisions are refused before any shard
is touched, `-x allow_unsafe=1` applies them anyway, and the decision is printed either way."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.util import CommandError
from click.testing import CliRunner

from sa_shardkit.cli.lint import lint
from tests.alembic_support import AlembicProject, columns_on, execute_on, revision_on

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "expand_contract" / "versions"
RENAME = "op.alter_column('customers', 'name', new_column_name='full_name')"


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> Iterator[AlembicProject]:
    """The project's migrations on the four test shards, every shard upgraded to the demo schema."""
    proj = AlembicProject(tmp_path, shard_map)
    command.upgrade(proj.config(), "head")
    proj.output()
    yield proj


def copy_example(project: AlembicProject, name: str) -> str:
    """Chain an example revision onto the project's head (as a user would add it)."""
    path = next(EXAMPLE.glob(f"{name}*.py"))
    source = path.read_text().replace("down_revision = None", f"down_revision = {project.head!r}")
    (project.versions / path.name).write_text(source)
    return path.name.split("_")[0]


def test_unsafe_revision_is_refused_and_no_shard_is_touched(project: AlembicProject) -> None:
    base = project.head
    project.add_revision("0002", RENAME)
    with pytest.raises(CommandError, match="shardkit lint refused the upgrade"):
        command.upgrade(project.config("lint=1"), "head")
    output = project.output()
    assert "[shardkit:rename-outside-contract]" in output
    assert "shardkit lint: refusing the upgrade: unsafe revision(s) 0002; no shard was touched" in output
    for url in project.shards.values():
        assert revision_on(url) == (base,)
        assert "name" in columns_on(url, "customers")


def test_allow_unsafe_applies_the_revision_and_says_so(project: AlembicProject) -> None:
    project.add_revision("0002", RENAME)
    command.upgrade(project.config("lint=1", "allow_unsafe=1"), "head")
    assert "shardkit lint: UNSAFE revision(s) 0002 applied anyway (-x allow_unsafe=1)" in project.output()
    for url in project.shards.values():
        assert revision_on(url) == ("0002",)
        assert "full_name" in columns_on(url, "customers")


def test_safe_expand_revision_passes_and_backfills_every_shard(project: AlembicProject) -> None:
    for number, url in enumerate(project.shards.values(), 1):
        execute_on(
            url, f"INSERT INTO customers (customer_id, name, balance) VALUES ({number}, 'c{number}', 0)"
        )
    rev = copy_example(project, "a1e5c0de0001")
    command.upgrade(project.config("lint=1"), "head")
    output = project.output()
    assert "shardkit lint: clean: 1 revision checked" in output and "-> upgrade proceeds" in output
    for number, url in enumerate(project.shards.values(), 1):
        assert revision_on(url) == (rev,)
        assert _scalar(url, "SELECT full_name FROM customers") == f"c{number}"


def test_contract_step_is_refused_while_the_models_still_map_the_column(project: AlembicProject) -> None:
    base = project.head
    copy_example(project, "a1e5c0de0001")
    copy_example(project, "a1e5c0de0002")
    with pytest.raises(CommandError):
        command.upgrade(project.config("lint=1"), "head")
    assert "[shardkit:contract-drops-mapped]" in project.output()
    for url in project.shards.values():  # not even the safe expand step ran
        assert revision_on(url) == (base,)
        assert "full_name" not in columns_on(url, "customers")


def test_lint_configured_on_in_alembic_ini_runs_without_x(project: AlembicProject) -> None:
    project.ini.write_text(project.ini.read_text().replace("[shardkit]\n", "[shardkit]\nlint = true\n", 1))
    project.add_revision("0002", RENAME)
    with pytest.raises(CommandError):
        command.upgrade(project.config(), "head")
    assert "shardkit lint: refusing the upgrade" in project.output()
    command.upgrade(project.config("lint=0"), "head")  # -x lint=0 overrides the ini
    assert "shardkit lint" not in project.output()
    assert all(revision_on(url) == ("0002",) for url in project.shards.values())


def test_offline_sql_upgrade_is_linted_too(project: AlembicProject) -> None:
    base = project.head
    project.add_revision("0002", RENAME)
    with pytest.raises(CommandError):
        command.upgrade(project.config("lint=1"), f"{base}:head", sql=True)
    assert "[shardkit:rename-outside-contract]" in project.output()


def test_pending_lints_only_what_the_shards_have_not_applied(project: AlembicProject) -> None:
    project.add_revision("0002", RENAME)
    args = ["--pending", "--config", str(project.ini), "--models", "sa_shardkit.demo.models:Base"]
    result = CliRunner().invoke(lint, args, catch_exceptions=False)
    assert result.exit_code == 1
    headers = [line.split()[0] for line in result.output.splitlines() if line and not line.startswith(" ")]
    assert headers[:-1] == ["0002"]  # 0001 is on every shard already; the last line is the summary


def test_downgrade_is_not_linted_and_says_so(project: AlembicProject) -> None:
    project.add_revision(
        "0002", RENAME, downgrade="op.alter_column('customers', 'full_name', new_column_name='name')"
    )
    command.upgrade(project.config("allow_unsafe=1"), "head")
    command.downgrade(project.config("lint=1"), "-1")
    assert "shardkit lint: downgrades are not linted -> downgrade proceeds" in project.output()
    assert all("name" in columns_on(url, "customers") for url in project.shards.values())


def test_shardkit_migrations_upgrade_lint_refuses_and_allow_unsafe_applies(project: AlembicProject) -> None:
    base = project.head
    project.add_revision("0002", RENAME)
    upgrade = [
        sys.executable,
        "-m",
        "sa_shardkit",
        "migrations",
        "upgrade",
        "--config",
        str(project.ini),
        "--lint",
    ]
    refused = subprocess.run(upgrade, capture_output=True, text=True, timeout=120, cwd=project.root)
    assert refused.returncode == 1
    assert "shardkit lint: refusing the upgrade: unsafe revision(s) 0002" in refused.stdout
    assert "shardkit lint refused the upgrade (1 error(s) in 0002)" in refused.stderr
    assert all(revision_on(url) == (base,) for url in project.shards.values())
    applied = subprocess.run(
        [*upgrade, "--allow-unsafe"], capture_output=True, text=True, timeout=120, cwd=project.root
    )
    assert applied.returncode == 0, applied.stderr
    assert "shardkit lint: UNSAFE revision(s) 0002 applied anyway (-x allow_unsafe=1)" in applied.stdout
    assert all(revision_on(url) == ("0002",) for url in project.shards.values())


def _scalar(url: str, sql: str) -> object:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()
