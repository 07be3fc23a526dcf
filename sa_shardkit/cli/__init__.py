"""The `shardkit` console script: one click group; each subcommand lives in its own module."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from ..lint.defaults import project_on_sys_path
from .demo import demo
from .exits import EXIT_FAILED, EXIT_OK, report
from .locate import locate
from .lookups import lookups
from .migrations import migrations
from .rebalance import rebalance_command
from .recover import recover
from .ring import ring
from .sagas import sagas
from .status import status


class ShardkitGroup(click.Group):
    """Every failure of every subcommand ends in the exit-code contract of :mod:`.exits`.

    Done in the group (not only in :func:`main`), so ``CliRunner().invoke(cli, ...)`` in the tests
    sees exactly what the console script does.
    """

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        # `--models myapp.models:Base`, `--saga myapp.sagas:x` import from the project, as with
        # `python -m` and Alembic's `prepend_sys_path = .` (a console script alone does not do that)
        project_on_sys_path(None)
        try:
            value = super().main(argv, prog_name or "shardkit", complete_var, standalone_mode=False, **extra)
        except SystemExit as done:
            raise SystemExit(_own_code(done.code)) from None
        except BaseException as error:  # noqa: BLE001 - the contract: one line and a documented code
            raise SystemExit(report(error)) from None
        if isinstance(value, int) and value != 0:  # click.exceptions.Exit(n) under standalone_mode=False
            raise SystemExit(_own_code(value))
        if not standalone_mode:
            return value
        raise SystemExit(EXIT_OK)


def _own_code(code: object) -> int:
    """A command's own exit code, kept; never Alembic's 255 (``sys.exit(-1)``) from a wrapped call."""
    if code is None or code == 0:
        return EXIT_OK
    if isinstance(code, int) and 0 < code < 255:
        return code
    if not isinstance(code, int):  # sys.exit("message")
        click.echo(f"shardkit: error: {code}", err=True)
    return EXIT_FAILED


@click.group(cls=ShardkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sa_shardkit")
def cli() -> None:
    """Horizontal sharding for SQLAlchemy on PostgreSQL."""


cli.add_command(demo)
cli.add_command(status)
cli.add_command(locate)
cli.add_command(ring)
cli.add_command(migrations)
cli.add_command(recover)
cli.add_command(sagas)
cli.add_command(rebalance_command)
cli.add_command(lookups)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``shardkit`` console script (exit codes: :mod:`sa_shardkit.cli.exits`).

    Returns on success (so ``main([...])`` can be called from Python); any other outcome raises
    ``SystemExit`` with its documented code.
    """
    try:
        cli.main(args=argv, prog_name="shardkit")
    except SystemExit as done:
        if done.code not in (0, None):
            raise
