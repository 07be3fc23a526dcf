"""`shardkit sagas`: list open (running or stuck) sagas; `shardkit sagas purge`: prune old finished ones."""

from __future__ import annotations

import json

import click

from ..saga.inspect import SagaInfo, SagaListing, list_sagas, parse_duration, purge_sagas
from .exits import EXIT_FAILED
from .options import config_options, load_manager


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _lease(info: SagaInfo) -> str:
    if info.lease_seconds_left is None:
        return "-"
    left = info.lease_seconds_left
    return f"{left:.1f}s left" if left > 0 else f"expired {-left:.1f}s ago"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def render(listing: SagaListing) -> str:
    """The table operators read: one saga per line, oldest first."""
    header = ("SAGA ID", "TYPE", "STATE", "STATUS", "AGE", "LEASE", "OWNER", "HOME", "SHARDS", "ERROR")
    rows = [
        (
            s.saga_id,
            s.saga_type,
            s.state,
            s.status,
            _age(s.age_seconds),
            _lease(s),
            s.owner or "-",
            s.home_shard,
            ",".join(s.shards) or "-",
            (s.error or "")[:60],
        )
        for s in listing.sagas
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    stuck = sum(1 for s in listing.sagas if s.state == "stuck")
    running = sum(1 for s in listing.sagas if s.state == "running")
    lines.append(f"{len(listing.sagas)} saga(s): {running} running, {stuck} stuck")
    lines += [f"unreachable: {shard}: {reason}" for shard, reason in sorted(listing.unreachable.items())]
    return "\n".join(lines)


@click.group(invoke_without_command=True)
@config_options
@click.option("--all", "include_finished", is_flag=True, help="Include finished sagas.")
@click.option(
    "--older-than",
    callback=_duration,
    default=None,
    metavar="AGE",
    help="Only sagas older than AGE (90s, 15m, 12h, 30d).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=1000, show_default=True, help="At most N per shard."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of the table.")
@click.pass_context
def sagas(
    ctx: click.Context,
    config_path: str | None,
    urls: tuple[str, ...],
    include_finished: bool,
    older_than: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """List open sagas: state (running = under a live lease, stuck = lease expired), status, age,
    lease owner and expiry, home shard and the shards its steps run on.

    Exits 1 if a shard's saga log could not be read.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = (config_path, urls)
    if ctx.invoked_subcommand is not None:
        return
    with load_manager(config_path, urls) as manager:
        listing = list_sagas(
            manager, include_finished=include_finished, older_than=older_than or 0.0, limit=limit
        )
    if as_json:
        click.echo(
            json.dumps(
                {"sagas": [s.as_json() for s in listing.sagas], "unreachable": listing.unreachable}, indent=2
            )
        )
    else:
        click.echo(render(listing))
    if listing.unreachable:
        raise SystemExit(EXIT_FAILED)


@sagas.command()
@config_options
@click.option(
    "--older-than",
    callback=_duration,
    required=True,
    metavar="AGE",
    help="Purge finished sagas (and receipts) older than AGE, e.g. 30d; at least 1h.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--dry-run", is_flag=True, help="Count what would be purged; delete nothing.")
@click.pass_context
def purge(
    ctx: click.Context,
    config_path: str | None,
    urls: tuple[str, ...],
    older_than: float,
    batch_size: int,
    dry_run: bool,
) -> None:
    """Delete finished saga log rows and receipts older than --older-than, in short batches (safe
    while sagas run; open sagas and their receipts are never touched). A purged id can be reused.

    Exits 1 if a shard could not be purged (nothing is deleted anywhere when a log is unreadable).
    """
    outer_config, outer_urls = ctx.obj.get("config", (None, ())) if ctx.obj else (None, ())
    with load_manager(config_path or outer_config, urls or outer_urls) as manager:
        report = purge_sagas(manager, older_than, batch_size=batch_size, dry_run=dry_run)
    click.echo(("dry run: would have " if dry_run else "") + str(report))
    for shard in manager.shard_ids:
        if shard in report.sagas:
            click.echo(
                f"  {shard}: {report.sagas[shard]} saga rows, {report.receipts.get(shard, 0)} receipts"
            )
    if report.unreachable:
        raise SystemExit(EXIT_FAILED)
