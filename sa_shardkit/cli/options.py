"""Options shared by subcommands: where the shard configuration comes from."""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError
from ..manager import ShardManager

F = TypeVar("F", bound=Callable[..., Any])
_ENV_URL = re.compile(r"^SHARD_\d+_URL$")


def _verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value:
        return
    # an environment variable, so that alembic child processes list every shard too; for this
    # command only (tests and callers run several commands in one process)
    before = os.environ.get("SHARDKIT_VERBOSE")
    os.environ["SHARDKIT_VERBOSE"] = "1"

    def restore() -> None:
        if before is None:
            os.environ.pop("SHARDKIT_VERBOSE", None)
        else:
            os.environ["SHARDKIT_VERBOSE"] = before

    ctx.call_on_close(restore)


def config_options(fn: F) -> F:
    """``--config FILE``, ``--url URL`` (repeatable): the shards a command works on; ``--verbose``."""
    fn = click.option(
        "--verbose",
        is_flag=True,
        expose_value=False,
        callback=_verbose,
        help="List every shard in reports (over 16 shards they list only the shards needing attention).",
    )(fn)
    fn = click.option(
        "--url",
        "urls",
        multiple=True,
        metavar="URL",
        help="Shard URL (repeat for each shard; ids shard-1, shard-2, ...).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="ini/TOML file with a [shardkit] section (default: alembic.ini if present, else SHARD_<N>_URL).",
    )(fn)
    return fn


def load_manager(config_path: str | None, urls: tuple[str, ...] = ()) -> ShardManager:
    """URLs given on the command line, else the config file (``--config``, default ``./alembic.ini``),
    else ``SHARD_<N>_URL`` env vars; a config whose ``[shardkit]`` lists no shards defers to them too."""
    if urls:
        return ShardManager.from_urls(list(urls))
    if config_path:
        return ShardManager.from_config(config_path)
    if Path("alembic.ini").exists() and _has_section(Path("alembic.ini")):
        return ShardManager.from_config("alembic.ini")
    if any(_ENV_URL.match(name) for name in os.environ):
        return ShardManager.from_env()
    raise ConfigError(
        "no shards configured: pass --url/--config, set SHARD_1_URL..., or add [shardkit] to alembic.ini"
    )


def _has_section(path: Path) -> bool:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser.has_section("shardkit")
