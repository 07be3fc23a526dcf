"""`shardkit rebalance`: add or remove a shard online, with a dry run and a progress bar."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..config import ShardConfig
from ..errors import ConfigError
from ..manager import ShardManager
from ..rebalance import (
    FleetView,
    MoveOptions,
    MoveStatus,
    ProgressCallback,
    RebalancePlan,
    RebalanceProgress,
    RebalanceResult,
    RingState,
    install_ring,
    load_ring_state,
    move_status,
    plan_rebalance,
    read_fleet_state,
    rebalance,
    table_set,
)
from ..rebalance import resume as resume_move
from ..rebalance.join import alembic_config
from ..rebalance.rebalancer import drop_leftovers
from ..ring import HashRing
from ..summary import hidden, summarise, tally, verbose_requested
from .options import config_options, load_manager
from .output import output_console
from .recover import load_sagas

T = TypeVar("T")


def load_models(spec: str) -> Any:
    """``package.module:Base`` (a declarative base or a MetaData) -> that object."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--models must look like package.module:Base, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot load models {spec!r}: {error}") from None


@click.command()
@config_options
@click.option("--add", "add", nargs=2, metavar="ID URL", default=None, help="Put this shard on the ring.")
@click.option("--weight", type=float, default=None, help="Weight of the shard being added (default 1).")
@click.option("--remove", "remove", metavar="ID", default=None, help="Drain this shard and take it off.")
@click.option("--resume", is_flag=True, help="Finish the move in flight (after a crash or kill).")
@click.option("--status", "show_status", is_flag=True, help="Show the stored ring state and exit.")
@click.option("--dry-run", is_flag=True, help="Print what would move (ranges, keys, rows) and exit.")
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help=f"Shard keys per batch (default {MoveOptions.batch_size}; --resume: the move's own).",
)
@click.option(
    "--sleep",
    type=float,
    default=None,
    help="Seconds to pause between batches (default 0; --resume: the move's own).",
)
@click.option(
    "--models",
    default="sa_shardkit.demo.models:Base",
    show_default=True,
    help="Declarative base (or MetaData) whose sharded tables move: package.module:Base.",
)
@click.option(
    "--saga",
    "saga_paths",
    multiple=True,
    metavar="MODULE:NAME",
    help="A saga definition (repeatable) whose receipts recorded before revision 0007 need their "
    "step keys worked out (the built-in credit transfer is always known).",
)
def rebalance_command(
    config_path: str | None,
    urls: tuple[str, ...],
    add: tuple[str, str] | None,
    weight: float | None,
    remove: str | None,
    resume: bool,
    show_status: bool,
    dry_run: bool,
    batch_size: int | None,
    sleep: float | None,
    models: str,
    saga_paths: tuple[str, ...],
) -> None:
    """Add (--add ID URL) or remove (--remove ID) a shard while the application keeps running.

    Rows move one key batch at a time (copy, verify, cut over, delete); a killed run continues
    where it stopped when run again (or with --resume, which needs only the fleet's original
    configuration: the move stored its options and the joining shard's URL, without password).
    """
    if sum(bool(x) for x in (add, remove, resume, show_status)) != 1:
        raise click.UsageError("give exactly one of --add ID URL, --remove ID, --resume, --status")
    console = output_console()
    with load_manager(config_path, urls) as manager:
        if show_status:
            _print_status(console, manager)
            return
        tables = load_models(models)
        load_sagas(saga_paths)  # defined sagas: the step keys of old receipts (rebalance.receipt_keys)
        options = _options(batch_size, sleep)
        view = FleetView(read_fleet_state(manager))
        moving = view.unfinished
        if resume or (moving is not None and not dry_run):
            if moving is None:
                dropped = drop_leftovers(manager, view)
                if dropped:
                    console.print(f"Dropped staging tables left by a killed mover on: {', '.join(dropped)}.")
                console.print("No move in flight; the fleet routes by the stored ring.")
                return
            if not resume and not _same_change(moving, add, remove):
                raise ConfigError(f"a move to {moving.target!r} is in flight: finish it with --resume first")
            if add is not None and add[0] not in manager.shard_ids:  # its URL, password included
                manager.add_shard(ShardConfig(id=add[0], url=add[1], weight=weight or 1))
            result = _run_with_progress(
                console, lambda p: resume_move(manager, tables, options=options, progress=p)
            )
            if result is not None:
                _print_result(console, result)
            return
        new_ring = _target_ring(manager, add, weight, remove, install=not dry_run)
        old = _stored_state(manager, add[0] if add else None, install=False).ring
        plan = plan_rebalance(manager, old, new_ring, table_set(tables))
        _print_plan(console, plan)
        if dry_run:
            console.print("[bold]Dry run:[/] nothing was moved.")
            return
        migrations = alembic_config(config_path)  # a joining shard is migrated to the fleet's revision
        result = _run_with_progress(
            console,
            lambda p: rebalance(
                manager,
                new_ring,
                tables,
                options=options or MoveOptions(),
                progress=p,
                rows_expected=plan.rows_to_move,
                migrations=migrations,
            ),
        )
        _print_result(console, result)


rebalance_command.name = "rebalance"


def _options(batch_size: int | None, sleep: float | None) -> MoveOptions | None:
    """The options given on the command line; None when none is (resume: the move's own)."""
    if batch_size is None and sleep is None:
        return None
    default = MoveOptions()
    return MoveOptions(
        batch_size=default.batch_size if batch_size is None else batch_size,
        sleep=default.sleep if sleep is None else sleep,
    )


def _target_ring(
    manager: ShardManager,
    add: tuple[str, str] | None,
    weight: float | None,
    remove: str | None,
    *,
    install: bool,
) -> HashRing:
    if add is not None:
        shard_id, url = add
        if shard_id not in manager.shard_ids:
            manager.add_shard(ShardConfig(id=shard_id, url=url, weight=weight or 1))
    state = _stored_state(manager, add[0] if add is not None else None, install=install)
    if add is not None:
        if add[0] in state.ring:
            return state.ring
        return state.ring.add_shard(add[0], weight or manager.config(add[0]).weight)
    assert remove is not None
    manager.config(remove)
    return state.ring.remove_shard(remove) if remove in state.ring else state.ring


def _stored_state(manager: ShardManager, joining: str | None, *, install: bool) -> RingState:
    """The stored state; without one, the configured ring (minus a joining shard), stored if asked."""
    stored = load_ring_state(manager)
    if stored is not None:
        return stored
    ring = manager.ring
    if joining is not None and joining in ring:
        ring = ring.remove_shard(joining)
    return install_ring(manager, ring) if install else RingState(0, ring)


def _same_change(moving: RingState, add: tuple[str, str] | None, remove: str | None) -> bool:
    """Whether ``--add``/``--remove`` asks for the move that is in flight (then it is finished)."""
    assert moving.target is not None
    if add is not None:
        return add[0] in moving.target and add[0] not in moving.ring
    return remove is not None and remove in moving.ring and remove not in moving.target


def _print_plan(console: Console, plan: RebalancePlan) -> None:
    table = Table(title=f"Rebalance plan: {plan.share_moved:.1%} of the ring changes shard")
    table.add_column("from")
    table.add_column("to")
    table.add_column("ring share", justify="right")
    table.add_column("keys", justify="right")
    names = sorted({t for (_, _, t) in plan.rows})
    for name in names:
        table.add_column(name, justify="right")
    for (source, target), share in sorted(plan.flows().items()):
        cells = [f"{plan.rows.get((source, target, n), 0):,}" for n in names]
        table.add_row(source, target, f"{share:.2%}", f"{plan.keys.get((source, target), 0):,}", *cells)
    console.print(table)
    if plan.total_rows:
        console.print(
            f"{plan.rows_to_move:,} of {plan.total_rows:,} rows move "
            f"({plan.rows_to_move / plan.total_rows:.1%}) in {len(plan.moves)} ring ranges."
        )


def _run_with_progress(console: Console, run: Callable[[ProgressCallback], T]) -> T:
    """Run a move with a progress bar (rows of the whole move: earlier runs' rows included)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows  {task.fields[rate]:>10} rows/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("moving", total=None, rate="-")

        def on_progress(p: RebalanceProgress) -> None:
            bar.update(
                task,
                total=p.rows_expected or None,
                completed=p.rows_moved_total,
                description=p.phase,
                rate=f"{p.rows_per_second:,.0f}",
            )

        return run(on_progress)


def _print_result(console: Console, result: RebalanceResult) -> None:
    if result.finished_interrupted:
        console.print(
            "Finished the move's last step (every row had moved; the final version bump was interrupted)."
        )
    console.print(
        f"[bold green]Done:[/] ring version {result.version} ({escape(repr(result.new))}); moved "
        f"{result.rows_moved:,} rows / {result.keys_moved:,} keys in {result.batches} batches, "
        f"{result.seconds:.1f} s, of which {result.start_wait_seconds:.1f} s waiting for every process to "
        f"see the move ({result.moving_rows_per_second:,.0f} rows/s after it); longest cut-over "
        f"{result.max_fence_seconds * 1000:.0f} ms."
    )
    if result.positioned_rows:
        moved = ", ".join(f"{name} {rows:,}" for name, rows in result.positioned_rows.items())
        console.print(f"Moved with their value's ring position: {moved} rows.")


def _print_status(console: Console, manager: ShardManager) -> None:
    rows = read_fleet_state(manager)
    status = move_status(manager)
    if not rows or status is None:
        console.print("No ring stored yet (the first rebalance stores the configured ring).")
        return
    listed = rows
    if summarise(len(rows)):  # over 16 shards: counts, then the shards behind or moving
        newest = max(row.state.version for row in rows.values())
        console.print(
            f"{len(rows)} shard(s) store a ring: {tally(f'version {r.state.version}' for r in rows.values())}"
        )
        listed = {
            shard_id: row
            for shard_id, row in rows.items()
            if row.state.version < newest or row.watermark or shard_id in status.lagging
        }
        console.print(hidden(len(rows) - len(listed), "idle shard(s) at the newest version"))
    table = Table(title="Stored ring state per shard")
    for name in ("shard", "version", "ring", "moving to", "watermark", "drained", "rows moved", "batches"):
        table.add_column(name)
    for shard_id, row in listed.items():
        state = row.state
        counts = status.per_shard.get(shard_id)
        table.add_row(
            shard_id,
            str(state.version),
            _ring_ids(state.ring.shard_ids),
            _ring_ids(state.target.shard_ids) if state.target is not None else "-",
            escape(row.watermark or "-"),
            "yes" if row.drained else "no",
            f"{counts.rows_moved:,}" if counts else "-",
            f"{counts.batches:,}" if counts else "-",
        )
    if listed:
        console.print(table)
    console.print(_status_line(status))


def _ring_ids(shard_ids: Sequence[str]) -> str:
    """A ring's shards: their ids, or over 8 shards their count and the first and last id."""
    if len(shard_ids) <= 8 or verbose_requested():
        return ", ".join(shard_ids)
    return f"{len(shard_ids)} shards ({shard_ids[0]} ... {shard_ids[-1]})"


def _status_line(status: MoveStatus) -> str:
    """The move's figures in one line (the same ones ``RebalanceJob.progress()`` reports)."""
    if status.phase == "idle":
        return f"No move in flight; the fleet routes by ring version {status.version}."
    expected = f" of {status.rows_expected:,}" if status.rows_expected else ""
    share = f" ({status.rows_moved / status.rows_expected:.0%})" if status.rows_expected else ""
    lagging = f"; shards at an older version: {', '.join(status.lagging)}" if status.lagging else ""
    return (
        f"Move in flight ({status.phase}): {status.rows_moved:,}{expected} rows moved{share}, "
        f"{status.keys_moved:,} keys in {status.batches:,} batches{lagging}. "
        "Finish it with --resume if no mover is running."
    )
