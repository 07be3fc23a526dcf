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
    return bool(report.pending or report.unknown_type or report.unreachable)


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
    "--lease",
    default=30.0,
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
) -> None:
    """Drive sagas whose runner died (lease expired) to a final state.

    Safe to run from several processes at once. One pass exits 1 if sagas remain unfinished (a shard
    unreachable, an unknown saga type); with --loop it runs until SIGTERM/SIGINT.
    """
    sagas = load_sagas(saga_paths)
    options = SagaOptions(lease_seconds=lease)
    with load_manager(config_path, urls) as manager:
        if not loop:
            report = recover_pass(manager, sagas, options=options, limit=limit)
            click.echo(str(report))
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
            report = recover_pass(manager, sagas, options=options, limit=limit)
            if report.finished or _unfinished(report):
                click.echo(f"{time.strftime('%H:%M:%S')} {report}")
            _resolve(manager, in_doubt_after, always=False)
            stop.wait(interval)
        click.echo("recovery worker stopped")
