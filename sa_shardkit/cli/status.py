"""`shardkit status`: every shard and replica at a glance; exit code 1 when one is down or behind."""

from __future__ import annotations

import json
from dataclasses import asdict

import click
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from ..rebalance.join import alembic_config
from ..status import FleetStatusReport, NodeStatus, collect_status
from ..summary import hidden, summarise, tally
from .options import config_options, load_manager
from .output import output_console


def migration_scripts(config_path: str | None) -> ScriptDirectory | None:
    """The Alembic scripts named by ``--config`` (or ./alembic.ini), when it has ``[alembic]``."""
    config = alembic_config(config_path)
    if config is None:
        return None
    try:
        return ScriptDirectory.from_config(config)
    except CommandError as error:
        raise ConfigError(f"{config.config_file_name}: {error}") from None


def _revision(node: NodeStatus) -> str:
    if node.revision is None:
        return "-"
    text = ",".join(node.revision) or "base"
    return f"{text} ({node.revision_state})" if node.revision_state else text


def _state(node: NodeStatus) -> str:
    if not node.configured:
        return "NOT CONFIGURED"
    if node.problem and not node.reachable:
        return "DOWN"
    return "BEHIND" if node.problem else "ok"


_STYLE = {
    "NOT CONFIGURED": "[red]NOT CONFIGURED[/]",
    "DOWN": "[red]DOWN[/]",
    "BEHIND": "[yellow]BEHIND[/]",
    "ok": "[green]ok[/]",
}


def render_status(console: Console, report: FleetStatusReport, verbose: bool | None = None) -> None:
    """The shard table and rows per table; over 16 shards, counts and only the servers with a problem."""
    ring = f"ring version {report.ring_version}" if report.ring_version is not None else "configured ring"
    if report.ring_version is None:
        console.print("no ring is stored on the shards (never rebalanced): routing by the configured ring")
    else:
        console.print(
            f"ring version {report.ring_version} is stored on the shards; every process routes by it"
        )
    primaries = [n for n in report.nodes if n.role == "primary"]
    many = summarise(len(primaries), verbose)
    listed = [n for n in report.nodes if n.problem] if many else list(report.nodes)
    if many:
        console.print(
            f"{len(primaries)} shard(s), {len(report.nodes) - len(primaries)} replica(s): "
            f"{tally(_state(n) for n in report.nodes)}; "
            f"{sum(n.connections or 0 for n in report.nodes):,} client connection(s) in all"
        )
        console.print(hidden(len(report.nodes) - len(listed), "server(s) without a problem"))
    table = Table(title=f"Shards ({ring})", title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in [
        ("shard", "left"),
        ("role", "left"),
        ("state", "left"),
        ("latency", "right"),
        ("server", "left"),
        ("revision", "left"),
        ("ring", "right"),
        ("conns", "right"),
        ("rows", "right"),
    ]:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for node in listed:
        state = _STYLE[_state(node)]
        if node.role == "replica" and node.lag_seconds is not None:
            state += f" lag {node.lag_seconds:.1f}s"
        counts = [n for n in node.row_counts.values() if n is not None]
        table.add_row(
            node.shard_id,
            node.role,
            state,
            f"{node.latency_ms:.1f} ms" if node.latency_ms is not None else "-",
            node.server_version or "-",
            _revision(node),
            f"{node.ring_share:.1%}" if node.ring_share is not None else "-",
            str(node.connections) if node.connections is not None else "-",
            f"{sum(counts):,}" if node.role == "primary" and node.reachable else "-",
        )
    if listed:
        console.print(table)
    if report.tables:
        console.print(_rows_table(report, primaries, many))
    complete = "" if report.counts_complete else "+ (a lower bound: not every shard was counted)"
    console.print(f"fleet total: {report.total_rows():,}{complete} rows")
    if report.healthy:
        console.print(f"[green]OK[/]: {len(primaries)} shard(s), every server reachable and up to date")
    else:
        for problem in report.problems:
            console.print(f"[red]PROBLEM[/]: {problem}")


def _rows_table(report: FleetStatusReport, primaries: list[NodeStatus], many: bool) -> Table:
    """Rows per table: a column per shard, or (over 16 shards) the total, smallest and largest shard."""
    kind = "" if report.exact_counts else " (estimates)"
    rows = Table(title=f"Rows per table{kind}", title_justify="left", box=box.SIMPLE_HEAD)
    rows.add_column("table", no_wrap=True)
    columns = ["fewest on a shard", "most on a shard"] if many else [n.shard_id for n in primaries]
    for name in [*columns, "total"]:
        rows.add_column(name, justify="right", no_wrap=True)
    for name in report.tables:
        cells = [node.row_counts.get(name) for node in primaries]
        known = [c for c in cells if c is not None]
        partial = "+" if None in cells else ""  # a shard that did not answer: a lower bound
        shown = (
            [f"{min(known, default=0):,}", f"{max(known, default=0):,}"]
            if many
            else [f"{c:,}" if c is not None else "?" for c in cells]
        )
        rows.add_row(name, *shown, f"{sum(known):,}{partial}")
    return rows


@click.command()
@config_options
@click.option("--estimate", is_flag=True, help="Row counts from planner statistics (fast on big tables).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status(config_path: str | None, urls: tuple[str, ...], estimate: bool, as_json: bool) -> None:
    """Every shard and replica: reachable, latency, version, migrations, rows, ring share.

    Lists every shard of the ring the shards store. Exit code 1 when a shard or replica is down, a
    replica lags past its bound, a shard's migrations are behind (or differ between shards when the
    Alembic scripts are not known), or the stored ring has a shard this configuration lacks.
    """
    scripts = migration_scripts(config_path)
    with load_manager(config_path, urls) as manager:
        report = collect_status(manager, script=scripts, exact_counts=not estimate)
    if as_json:
        payload = {
            "healthy": report.healthy,
            "script_heads": report.script_heads,
            "ring_version": report.ring_version,
            "unlisted_shards": list(report.unlisted),
            "total_rows": report.total_rows(),
            "counts_complete": report.counts_complete,
            "nodes": [asdict(node) for node in report.nodes],
        }
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        render_status(output_console(), report)
    if not report.healthy:
        raise SystemExit(1)
