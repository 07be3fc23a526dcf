"""Options shared by subcommands: where the shard configuration comes from."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError
from ..manager import ShardManager

F = TypeVar("F", bound=Callable[..., Any])


def config_options(fn: F) -> F:
    """``--config FILE`` and ``--url URL`` (repeatable): the shards a command works on."""
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
    """URLs given on the command line, else the config file, else ``SHARD_<N>_URL`` env vars."""
    if urls:
        return ShardManager.from_urls(list(urls))
    if config_path:
        return ShardManager.from_config(config_path)
    if any(k.startswith("SHARD_") and k.endswith("_URL") for k in os.environ):
        return ShardManager.from_env()
    if Path("alembic.ini").exists():
        try:
            return ShardManager.from_config("alembic.ini")
        except ConfigError:
            pass
    raise ConfigError(
        "no shards configured: pass --url/--config, set SHARD_1_URL..., or add [shardkit] to alembic.ini"
    )
