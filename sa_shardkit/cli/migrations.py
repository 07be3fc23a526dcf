"""`shardkit migrations status|upgrade|downgrade|current`: Alembic across every shard.

The same engine as ``alembic -c alembic.ini ...`` (``migrations/env.py`` calls
:func:`sa_shardkit.alembic.run_migrations`), with shard targeting as options instead of ``-x``.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import click
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from ..alembic import fleet_status, select_shards, settings_from_alembic_config
from ..errors import ConfigError
from ..manager import ShardManager
from .lint import lint
from .options import config_options

shard_option = click.option(
    "--shard",
    "shards",
    multiple=True,
    metavar="ID",
    help="Only this shard (repeatable). Default: every configured shard.",
)


def alembic_config(
    config_path: str | None, urls: tuple[str, ...], shards: tuple[str, ...], x: tuple[str, ...] = ()
) -> Config:
    """The Alembic config of ``--config`` (default ``alembic.ini``), with ``--url``/``--shard`` applied."""
    path = Path(config_path or "alembic.ini")
    if not path.exists():
        raise ConfigError(f"Alembic config {str(path)!r} not found: pass --config PATH/alembic.ini")
    x_args = list(x)
    if shards:
        x_args.append(f"shards={','.join(shards)}")
    config = Config(str(path), cmd_opts=Namespace(x=x_args))
    if urls:
        ids = [f"shard-{i}" for i in range(1, len(urls) + 1)]
        config.set_section_option("shardkit", "shards", ", ".join(ids))
        for shard_id, url in zip(ids, urls, strict=True):
            config.set_section_option("shardkit", f"{shard_id}.url", url.replace("%", "%%"))
    return config


parallel_option = click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Migrate up to N shards at once (one alembic process per shard; -x parallel=N).",
)


def _parallel_x(parallel: int, urls: tuple[str, ...]) -> tuple[str, ...]:
    if parallel == 1:
        return ()
    if urls:  # the per-shard child processes read the shards from the config file, not from --url
        raise click.UsageError(
            "--parallel needs the shards in --config/alembic.ini or SHARD_<N>_URL, not --url"
        )
    return (f"parallel={parallel}",)


def _run(fn: Callable[..., object], *args: object, **kw: object) -> None:
    """Run an Alembic command; its errors become one line and exit code 1."""
    try:
        fn(*args, **kw)
    except CommandError as error:
        raise click.ClickException(str(error)) from error


@click.group()
def migrations() -> None:
    """Alembic migrations across every shard (one shard after another, stop at the first failure)."""


migrations.add_command(lint)  # `shardkit migrations lint` (sa_shardkit/cli/lint.py)


@migrations.command()
@config_options
@shard_option
def status(config_path: str | None, urls: tuple[str, ...], shards: tuple[str, ...]) -> None:
    """Every shard's revision against the scripts' head; exit code 1 when any shard is not at head."""
    config = alembic_config(config_path, urls, ())
    settings = select_shards(settings_from_alembic_config(config), list(shards) or None)
    with ShardManager(settings) as manager:
        report = fleet_status(manager, ScriptDirectory.from_config(config))
    click.echo(report.describe())
    if not report.in_sync:
        raise SystemExit(1)


@migrations.command()
@config_options
@shard_option
@click.argument("revision", default="head")
@click.option("--sql", is_flag=True, help="Print the SQL per shard instead of running it (offline).")
@click.option(
    "--sql-dir", type=click.Path(file_okay=False), help="With --sql: one <shard>.sql file per shard."
)
@click.option(
    "--lint/--no-lint",
    "lint_first",
    default=None,
    help="Lint the revisions first and refuse unsafe ones (-x lint=1; default: lint in [shardkit]).",
)
@click.option(
    "--allow-unsafe", is_flag=True, help="Apply revisions the lint finds unsafe (-x allow_unsafe=1)."
)
@parallel_option
def upgrade(
    config_path: str | None,
    urls: tuple[str, ...],
    shards: tuple[str, ...],
    revision: str,
    sql: bool,
    sql_dir: str | None,
    lint_first: bool | None,
    allow_unsafe: bool,
    parallel: int,
) -> None:
    """Upgrade every shard (or --shard ones) to REVISION (default: head), in configuration order."""
    x: tuple[str, ...] = (f"sql_dir={sql_dir}",) if sql_dir else ()
    x += _parallel_x(parallel, urls)
    if lint_first is not None:
        x += (f"lint={int(lint_first)}",)
    if allow_unsafe:
        x += ("allow_unsafe=1",)
    _run(command.upgrade, alembic_config(config_path, urls, shards, x), revision, sql=sql)


@migrations.command(context_settings={"ignore_unknown_options": True})  # `downgrade -1`
@config_options
@shard_option
@click.argument("revision")
@click.option("--sql", is_flag=True, help="Print the SQL per shard instead of running it (offline).")
@parallel_option
def downgrade(
    config_path: str | None,
    urls: tuple[str, ...],
    shards: tuple[str, ...],
    revision: str,
    sql: bool,
    parallel: int,
) -> None:
    """Downgrade every shard (or --shard ones) to REVISION, in reverse configuration order."""
    x = _parallel_x(parallel, urls)
    _run(command.downgrade, alembic_config(config_path, urls, shards, x), revision, sql=sql)


@migrations.command()
@config_options
@shard_option
@click.option("--strict", is_flag=True, help="Exit non-zero when any shard is not at head.")
def current(config_path: str | None, urls: tuple[str, ...], shards: tuple[str, ...], strict: bool) -> None:
    """Each shard's current revision, as `alembic current` prints it."""
    x = ("strict=1",) if strict else ()
    _run(command.current, alembic_config(config_path, urls, shards, x))
