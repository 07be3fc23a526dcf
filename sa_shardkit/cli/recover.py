"""`shardkit recover`: finish or compensate sagas left half-done by dead processes (once, or as a worker)."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType

import click

from ..errors import ConfigError
from ..manager import ShardManager
from ..saga import CREDIT_TRANSFER, RecoveryReport, Saga, SagaOptions, resolve_in_doubt
from ..saga import recover as recover_pass
from ..saga.inspect import parse_duration
from .options import config_options, load_manager


def load_sagas(paths: Iterable[str]) -> list[Saga]:
    """Import ``module:name`` references to a Saga (or a list of Sagas); default: the credit transfer."""
    found: list[Saga] = []
    for path in paths:
        module_name, _, attribute = path.partition(":")
        if not module_name or not attribute:
            raise ConfigError(f"--saga {path!r}: expected MODULE:NAME, e.g. myapp.sagas:checkout")
        try:
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"--saga {path!r}: {error}") from None
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, Saga):
                raise ConfigError(f"--saga {path!r} is a {type(item).__name__}, not a sa_shardkit Saga")
            found.append(item)
    return found or [CREDIT_TRANSFER]


def _unfinished(report: RecoveryReport) -> bool:
    return bool(report.pending or report.unknown_type or report.unreachable or report.overdue)


def _details(report: RecoveryReport) -> None:
    """The open sagas recovery left alone (live lease) or that are overdue, one line each."""
    shown = {s.saga_id: s for s in [*report.live, *report.overdue]}
    for info in sorted(shown.values(), key=lambda s: s.created_at):
        left = info.lease_seconds_left
        lease = (
            "-"
            if left is None
            else (f"lease {left:.1f}s left" if left > 0 else f"lease expired {-left:.1f}s ago")
        )
        flags = " OVERDUE" if info in report.overdue else ""
        click.echo(
            f"  {info.saga_id} ({info.saga_type}) {info.state}{flags}: status {info.status}, age {info.age_seconds:.0f}s,"
            f" {lease}, owner {info.owner}, home {info.home_shard}, shards {','.join(info.shards) or '-'}"
        )


def _resolve(manager: ShardManager, older_than: float, *, always: bool) -> bool:
    """Resolve in-doubt two-phase transactions; print what happened; True if some remain."""
    report = resolve_in_doubt(manager, older_than=older_than)
    busy = bool(report.committed or report.rolled_back or report.waiting or report.unreachable)
    if always or busy:
        click.echo(f"{time.strftime('%H:%M:%S')} {report}" if not always else str(report))
    return bool(report.waiting or report.unreachable)


@click.command()
@config_options
@click.option(
    "--saga",
    "saga_paths",
    multiple=True,
    metavar="MODULE:NAME",
    help="Saga definition(s) to recover (repeatable). Default: sa_shardkit's credit transfer.",
)
@click.option("--loop", is_flag=True, help="Keep running: a pass every --interval seconds until stopped.")
@click.option(
    "--interval",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between passes.",
)
@click.option(
    "--max-age",
    callback=lambda ctx, param, value: parse_duration(value),
    default="10m",
    show_default=True,
    metavar="AGE",
    help="A one-pass run exits 1 if any saga has been open longer than AGE (90s, 15m, 12h), running or not.",
)
@click.option(
    "--lease",
    default=SagaOptions().lease_seconds,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds this worker's claim on a saga lasts without a heartbeat (if it dies, others wait this long).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N sagas per shard per pass.")
@click.option(
    "--in-doubt-after",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Also resolve two-phase transactions left prepared by dead coordinators: roll back an "
    "undecided one after this many seconds (decided ones are committed at once).",
)
def recover(
    config_path: str | None,
    urls: tuple[str, ...],
    saga_paths: tuple[str, ...],
    loop: bool,
    interval: float,
    lease: float,
    limit: int | None,
    in_doubt_after: float,
    max_age: float,
) -> None:
    """Drive sagas whose runner died (lease expired) to a final state.

    Safe to run from several processes at once. Reports the open sagas it left alone because their
    lease is live. One pass exits 1 if sagas remain unfinished (a shard unreachable, an unknown saga
    type) or any saga is older than --max-age; with --loop it runs until SIGTERM/SIGINT.
    """
    sagas = load_sagas(saga_paths)
    options = SagaOptions(lease_seconds=lease)
    with load_manager(config_path, urls) as manager:
        if not loop:
            report = recover_pass(manager, sagas, options=options, limit=limit, max_age=max_age)
            click.echo(str(report))
            _details(report)
            in_doubt = _resolve(manager, in_doubt_after, always=True)
            if _unfinished(report) or in_doubt:
                sys.exit(1)
            return
        stop = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        click.echo(f"recovery worker: {', '.join(s.name for s in sagas)}; a pass every {interval:g}s")
        while not stop.is_set():
            report = recover_pass(manager, sagas, options=options, limit=limit, max_age=max_age)
            if report.finished or _unfinished(report):
                click.echo(f"{time.strftime('%H:%M:%S')} {report}")
                _details(report)
            _resolve(manager, in_doubt_after, always=False)
            stop.wait(interval)
        click.echo("recovery worker stopped")
