"""The exit-code contract of every ``shardkit`` command, and the one-line error that goes with it.

=====  =====================================================================================
code   meaning
=====  =====================================================================================
0      success
1      the operation ran and failed: a shard down or unreachable, a migration failed or was
       refused, the lint found errors, a shard is behind, sagas remain unfinished
2      bad input: a usage error, a bad URL or option value, an unknown shard id, a missing or
       invalid configuration, a gap in ``SHARD_<N>_URL``; nothing was changed
130    interrupted (Ctrl-C)
=====  =====================================================================================

A failure is one line on stderr, ``shardkit: error: <what went wrong>``, passwords masked; never a
traceback and never 255. (The ``alembic`` command itself keeps Alembic's own codes: 255 for any
failure, 2 for a usage error.) A command signals an operation failure with
``raise SystemExit(EXIT_FAILED)`` after printing its report, or with :func:`fail`; bad input is a
:class:`~sa_shardkit.errors.ConfigError` (or ``click.UsageError``), raised before anything changes.
"""

from __future__ import annotations

from typing import NoReturn

import click
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..errors import ConfigError, RingError, SagaInputError, UnknownShardError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_BAD_INPUT: tuple[type[BaseException], ...] = (
    ConfigError,
    RingError,
    UnknownShardError,
    SagaInputError,
    ArgumentError,
)


class CommandFailed(click.ClickException):
    """An operation failed (exit code 1); the message is the one line printed."""

    exit_code = EXIT_FAILED


def is_bad_input(error: BaseException) -> bool:
    """Bad input, also when Alembic wrapped our configuration error in a ``CommandError``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, _BAD_INPUT) or isinstance(seen, click.UsageError):
            return True
        seen = seen.__cause__
    return False


def exit_code_for(error: BaseException) -> int:
    """The contract's code for an exception that reached the top of a command."""
    if isinstance(error, (KeyboardInterrupt, click.exceptions.Abort)):
        return EXIT_INTERRUPTED
    if is_bad_input(error):
        return EXIT_USAGE
    if isinstance(error, click.ClickException):
        return error.exit_code if error.exit_code not in (0, 255, -1) else EXIT_FAILED
    return EXIT_FAILED


def one_line(error: BaseException) -> str:
    """The error as the single line the contract prints (no SQLAlchemy background link, no SQL)."""
    if isinstance(error, click.ClickException):
        text = error.format_message()
    elif isinstance(error, SQLAlchemyError) and (orig := getattr(error, "orig", None)) is not None:
        text = f"{type(orig).__name__}: {orig}"  # the driver's own message, without the SQL
    elif isinstance(error, (KeyboardInterrupt, click.exceptions.Abort)):
        text = "interrupted"
    else:
        text = str(error) or type(error).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first.strip()


def report(error: BaseException) -> int:
    """Print the one-line error for ``error`` on stderr; return the contract's exit code."""
    message = one_line(error)
    if isinstance(error, click.UsageError):
        where = error.ctx.command_path if error.ctx is not None else "shardkit"
        message = f"{message.rstrip('.')} (see '{where} --help')"
    for prefix in ("FAILED: ", "shardkit: "):  # Alembic's and the migration summary's own prefixes
        message = message.removeprefix(prefix)
    click.echo(f"shardkit: error: {message}", err=True)
    return exit_code_for(error)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Stop the command with the one-line error ``message`` and ``code``."""
    click.echo(f"shardkit: error: {message}", err=True)
    raise SystemExit(code)
