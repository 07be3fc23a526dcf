"""`shardkit ring`: each shard's share of the keys as a bar chart, now and after a planned change.

Shares are exact fractions of the hash space (the expected fraction of keys), computed from the
configuration alone: no server is contacted, so a change can be planned before any shard exists.
"""

from __future__ import annotations

import click
from rich import box
from rich.console import Console
from rich.table import Table
from xxhash import xxh3_64_hexdigest

from ..errors import ConfigError
from ..ring import HashRing, moved_share
from .options import config_options, load_manager
from .output import output_console

BAR_WIDTH = 24


def ring_fingerprint(ring: HashRing) -> str:
    """A short id of a ring's exact layout (members, weights, vnodes): equal rings, equal id."""
    return xxh3_64_hexdigest(ring.to_json().encode())[:12]


def _pair(value: str, option: str) -> tuple[str, float]:
    shard_id, _, weight = value.partition("=")
    if not shard_id:
        raise ConfigError(f"{option} {value!r}: expected SHARD or SHARD=WEIGHT")
    try:
        return shard_id, float(weight) if weight else 1.0
    except ValueError:
        raise ConfigError(f"{option} {value!r}: weight {weight!r} is not a number") from None


def planned_ring(
    ring: HashRing, add: tuple[str, ...], remove: tuple[str, ...], weight: tuple[str, ...]
) -> HashRing:
    """``ring`` with the planned additions, removals and weight changes applied, in that order."""
    for value in add:
        ring = ring.add_shard(*_pair(value, "--add"))
    for shard_id in remove:
        ring = ring.remove_shard(shard_id)
    for value in weight:
        shard_id, new_weight = _pair(value, "--weight")
        if "=" not in value:
            raise ConfigError(f"--weight {value!r}: expected SHARD=WEIGHT")
        ring = ring.with_weight(shard_id, new_weight)
    return ring


def _bar(share: float, largest: float, width: int = BAR_WIDTH) -> str:
    cells = round(width * share / largest) if largest else 0
    return "█" * cells


def render_ring(console: Console, current: HashRing, planned: HashRing | None) -> None:
    before = current.shares()
    after = planned.shares() if planned is not None else None
    largest = max([*before.values(), *(after or {}).values()])
    ids = list(dict.fromkeys([*current.shard_ids, *(planned.shard_ids if planned is not None else ())]))
    title = f"Key distribution (ring {ring_fingerprint(current)}, vnodes {current.vnodes})"
    width = BAR_WIDTH if planned is None else BAR_WIDTH // 2
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("shard", no_wrap=True)
    table.add_column("weight", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    if after is not None and planned is not None:
        table.title = f"{title}\nplanned: ring {ring_fingerprint(planned)}"
        table.add_column("planned", justify="right", no_wrap=True)
        table.add_column(" ", no_wrap=True)
        table.add_column("change", justify="right", no_wrap=True)
    for shard_id in ids:
        now = before.get(shard_id, 0.0)
        weight = current.weights.get(shard_id)
        row = [shard_id, f"{weight:g}" if weight is not None else "-", f"{now:6.2%}"]
        row.append(f"[cyan]{_bar(now, largest, width)}[/]")
        if after is not None and planned is not None:
            then = after.get(shard_id, 0.0)
            planned_weight = planned.weights.get(shard_id)
            row[1] += f" -> {planned_weight:g}" if planned_weight is not None else " -> -"
            row += [f"{then:6.2%}", f"[green]{_bar(then, largest, width)}[/]", f"{then - now:+.2%}"]
        table.add_row(*row)
    console.print(table)
    if planned is not None:
        moves = moved_share(current, planned)
        console.print(f"Keys that change shard: {sum(moves.values()):.2%} of the hash space")
        for (source, target), share in sorted(moves.items(), key=lambda m: -m[1]):
            console.print(f"  {source} -> {target}: {share:.2%}")


@click.command()
@config_options
@click.option("--add", "add", multiple=True, metavar="ID[=WEIGHT]", help="Plan adding a shard.")
@click.option("--remove", "remove", multiple=True, metavar="ID", help="Plan removing a shard.")
@click.option("--weight", "weight", multiple=True, metavar="ID=WEIGHT", help="Plan a weight change.")
def ring(
    config_path: str | None,
    urls: tuple[str, ...],
    add: tuple[str, ...],
    remove: tuple[str, ...],
    weight: tuple[str, ...],
) -> None:
    """Each shard's share of the keys; with --add/--remove/--weight, before and after the change."""
    with load_manager(config_path, urls) as manager:
        # the ring the shards store (what every process routes by), else the configured one
        current = manager.placement.refresh(log_failures=False).ring
    planned = planned_ring(current, add, remove, weight) if (add or remove or weight) else None
    render_ring(output_console(), current, planned)
