"""The `shardkit` console script: one click group; each subcommand lives in its own module."""

from __future__ import annotations

import sys

import click

from ..errors import ShardKitError
from .demo import demo
from .locate import locate
from .migrations import migrations
from .rebalance import rebalance_command
from .recover import recover
from .ring import ring
from .status import status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sa_shardkit")
def cli() -> None:
    """Horizontal sharding for SQLAlchemy on PostgreSQL."""


cli.add_command(demo)
cli.add_command(status)
cli.add_command(locate)
cli.add_command(ring)
cli.add_command(migrations)
cli.add_command(recover)
cli.add_command(rebalance_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: configuration and shard errors are one clear line, never a traceback."""
    try:
        cli.main(args=argv, prog_name="shardkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ShardKitError as error:
        click.echo(f"shardkit: error: {error}", err=True)
        sys.exit(2)
