"""The exit-code contract (sa_shardkit/cli/exits.py): bad input is one line on stderr and a documented code.

Each case runs the real console script in a subprocess, from an empty directory, with only the
shard configuration the case gives, and checks: the exit code, exactly one line on stderr naming the
problem, no traceback, no password.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sa_shardkit import ShardManager
from sa_shardkit.cli.exits import EXIT_FAILED, EXIT_USAGE
from sa_shardkit.saga import create_saga_tables
from sa_shardkit.testing import free_port
from tests.cli_support import PASSWORD, require_password, shardkit
from tests.fleet import TestFleet

SECRET = "s3cret"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)


def cases(urls: list[str], password_url: str) -> list[Case]:
    u1, u2 = urls[0], urls[1]
    down = f"postgresql+psycopg://app:{SECRET}@127.0.0.1:{free_port()}/app"
    wrong_password = password_url.replace("shardkit_pw@", f"shardkit_pw:{SECRET}@")
    return [
        Case("postgres:// scheme", ("status", "--url", f"postgres://app:{SECRET}@db1/app"), EXIT_USAGE,
             "scheme 'postgres://' is not a SQLAlchemy dialect: use postgresql+psycopg://"),
        Case("mysql:// scheme", ("locate", "--url", f"mysql://root:{SECRET}@localhost/test", "42"), EXIT_USAGE,
             "sa_shardkit supports PostgreSQL only"),
        Case("not a URL", ("ring", "--url", "::nonsense::"), EXIT_USAGE, "not a database URL"),
        Case("unreachable host", ("locate", "--url", down, "42"), EXIT_FAILED, "is unavailable"),
        Case("wrong password", ("locate", "--url", wrong_password, "42"), EXIT_FAILED,
             "password authentication failed"),
        Case("unknown shard id (ring)", ("ring", "--url", u1, "--remove", "shard-9"), EXIT_USAGE,
             "unknown shard 'shard-9'"),
        Case("unknown shard id (migrations)", ("migrations", "status", "--shard", "shard-9"), EXIT_USAGE,
             "unknown shard(s) 'shard-9'", {"SHARD_1_URL": u1, "ALEMBIC_INI": "1"}),
        Case("missing config file", ("status", "--config", "nope.ini"), EXIT_USAGE, "'nope.ini' does not exist"),
        Case("no configuration at all", ("status",), EXIT_USAGE, "no shards configured"),
        Case("missing alembic.ini", ("migrations", "upgrade"), EXIT_USAGE, "'alembic.ini' not found"),
        Case("gap in SHARD_<N>_URL", ("status",), EXIT_USAGE,
             "SHARD_2_URL is not set but SHARD_3_URL is", {"SHARD_1_URL": u1, "SHARD_3_URL": u2}),
        Case("unknown option", ("status", "--bogus"), EXIT_USAGE, "No such option '--bogus'"),
        Case("bad option value", ("migrations", "upgrade", "--parallel", "0"), EXIT_USAGE, "'--parallel'"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def password_url(pg_fleet: TestFleet) -> str:
    return require_password(pg_fleet.server(1))


def test_every_bad_input_is_one_line_with_its_documented_exit_code(
    shard_urls: list[str], password_url: str, tmp_path: Path
) -> None:
    repo_ini = Path(__file__).resolve().parent.parent / "alembic.ini"
    failures = []
    for case in cases(shard_urls, password_url):
        cwd = tmp_path / case.name.replace(" ", "_").replace("/", "_")
        cwd.mkdir()
        env = dict(case.env)
        if env.pop("ALEMBIC_INI", None):
            (cwd / "alembic.ini").write_text(repo_ini.read_text())
            (cwd / "migrations").symlink_to(repo_ini.parent / "migrations")
        result = shardkit(*case.args, cwd=cwd, env=env)
        lines = result.stderr.splitlines()
        problems = []
        if result.returncode != case.code:
            problems.append(f"exit {result.returncode}, expected {case.code}")
        if len(lines) != 1 or not lines[0].startswith("shardkit: error: "):
            problems.append(f"stderr is not one 'shardkit: error:' line: {result.stderr[-600:]!r}")
        if case.says not in result.stderr:
            problems.append(f"stderr does not say {case.says!r}: {result.stderr[-300:]!r}")
        if SECRET in result.stderr + result.stdout or PASSWORD in result.stderr + result.stdout:
            problems.append("a password was printed")
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_the_right_password_gets_past_the_same_check(password_url: str, tmp_path: Path) -> None:
    """The wrong-password case fails because of the password, not because the role cannot log in."""
    good = password_url.replace("shardkit_pw@", f"shardkit_pw:{PASSWORD}@")
    result = shardkit("locate", "--url", good, "42", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("42\tshard-1\t")


def test_an_operation_failure_exits_1_and_never_255(shard_urls: list[str], tmp_path: Path) -> None:
    down = f"postgresql+psycopg://app@127.0.0.1:{free_port()}/app"
    result = shardkit("status", "--url", shard_urls[0], "--url", down, cwd=tmp_path)
    assert result.returncode == EXIT_FAILED
    assert "PROBLEM: shard-2 primary: unreachable" in " ".join(result.stdout.split())
    assert "Traceback" not in result.stderr


def test_recover_with_an_alembic_ini_that_lists_no_shards_uses_shard_n_url(
    manager: ShardManager, shard_urls: list[str], tmp_path: Path
) -> None:
    """`shardkit recover --config alembic.ini`: the project's ini (its [shardkit] lists no shards)
    defers to SHARD_<N>_URL exactly like the implicit ./alembic.ini and like Alembic's env."""
    create_saga_tables(manager)
    shutil.copy(REPO / "alembic.ini", tmp_path / "alembic.ini")
    env = {f"SHARD_{i}_URL": url for i, url in enumerate(shard_urls, 1)}
    explicit = shardkit("recover", "--config", "alembic.ini", cwd=tmp_path, env=env)
    implicit = shardkit("recover", cwd=tmp_path, env=env)
    for result in (explicit, implicit):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("recovery: 0 completed, 0 compensated, 0 still pending")
    missing = shardkit("recover", "--config", "alembic.ini", cwd=tmp_path)
    assert missing.returncode == EXIT_USAGE
    assert "lists no shards" in missing.stderr and "SHARD_<N>_URL" in missing.stderr
