"""`shardkit lookups build|repair|status`: backfill a lookup online, remove stale entries, show them."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import ConfigError, DuplicateKeyError, NotShardedError
from ..lookups import LookupIndex, declared_lookups, lookup_named
from ..lookups.build import DUPLICATES_STATE, build_lookup, repair_lookup
from ..lookups.store import count_entries, is_ready, read_state
from ..manager import ShardManager
from .options import config_options, load_manager
from .rebalance import load_models

MODELS_HELP = "Module (or package.module:Base) whose import declares the lookups."


@click.group()
def lookups() -> None:
    """Lookup indexes: route by a column other than the shard key (``__shard_lookups__``)."""


def _chosen(models: str, targets: tuple[str, ...]) -> list[LookupIndex]:
    load_models(models if ":" in models else f"{models}:__name__")
    try:
        return [lookup_named(t) for t in targets] if targets else list(declared_lookups())
    except NotShardedError as error:
        raise ConfigError(str(error)) from None  # bad input: exit code 2, nothing changed


@lookups.command("build")
@config_options
@click.argument("targets", nargs=-1, metavar="MODEL.ATTR...")
@click.option("--models", required=True, help=MODELS_HELP)
@click.option("--batch-size", default=1000, show_default=True, help="Owning rows per batch.")
@click.option("--restart", is_flag=True, help="Scan from the start instead of resuming.")
def build_command(
    config_path: str | None,
    urls: tuple[str, ...],
    targets: tuple[str, ...],
    models: str,
    batch_size: int,
    restart: bool,
) -> None:
    """Backfill lookups from the existing rows (online, batched, resumable), then mark them ready.

    A unique lookup whose existing rows share a value fails (exit 1) naming every such value and
    the rows holding it, and is marked 'duplicates' (reads do not use it) until a build finds none.
    """
    console = Console()
    with load_manager(config_path, urls) as manager:
        for index in _chosen(models, targets):
            _build_one(manager, index, console, batch_size=batch_size, restart=restart)


def _build_one(
    manager: ShardManager, index: LookupIndex, console: Console, *, batch_size: int, restart: bool
) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(shard: str, done: int, total: int) -> None:
            if shard not in tasks:
                tasks[shard] = bar.add_task(f"{index.describe()} {shard}", total=total)
            bar.update(tasks[shard], completed=done, total=max(total, done))

        try:
            report = build_lookup(manager, index, batch_size=batch_size, progress=progress, restart=restart)
        except DuplicateKeyError as error:
            bar.stop()
            for value, holders in error.holders:  # every one (the error line shows the first five)
                rows = ", ".join(f"{index.key_attribute}={key!r} on {shard}" for key, shard in holders)
                console.print(f"  duplicate {index.attribute}={value!r}: {rows}")
            raise
    resumed = " (resumed)" if report.resumed else ""
    console.print(
        f"{index.describe()}: ready{resumed}; {sum(report.rows.values())} rows scanned, "
        f"{report.entries} entries added"
    )


@lookups.command("repair")
@config_options
@click.argument("targets", nargs=-1, metavar="MODEL.ATTR...")
@click.option("--models", required=True, help=MODELS_HELP)
@click.option("--batch-size", default=1000, show_default=True, help="Entries per batch.")
def repair_command(
    config_path: str | None, urls: tuple[str, ...], targets: tuple[str, ...], models: str, batch_size: int
) -> None:
    """Remove stale entries (no committed owning row), safely while the application writes."""
    with load_manager(config_path, urls) as manager:
        for index in _chosen(models, targets):
            report = repair_lookup(manager, index, batch_size=batch_size)
            click.echo(
                f"{index.describe()}: {report.checked} entries checked, {report.removed} stale removed"
            )


@lookups.command("status")
@config_options
@click.option("--models", required=True, help=MODELS_HELP)
def status_command(config_path: str | None, urls: tuple[str, ...], models: str) -> None:
    """Each lookup's state (building/ready/duplicates) and entries per shard."""
    with load_manager(config_path, urls) as manager:
        table = Table("lookup", "table", "unique", "state", *manager.shard_ids)
        for index in _chosen(models, ()):
            counts = count_entries(manager, index)
            state = read_state(manager, index)[0] or "not built"
            if state == "ready" and not is_ready(manager, index):
                state = "stale: built under another ring, run build"
            elif state == DUPLICATES_STATE:
                state = "duplicates: not used by reads; fix the values, then run build"
            table.add_row(
                index.describe(),
                index.name,
                "yes" if index.unique else "no",
                state,
                *map(str, counts.values()),
            )
        Console().print(table)
