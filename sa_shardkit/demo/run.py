"""`shardkit demo`: the product's story through its public API, on SQLite files or on given servers."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ..manager import ShardManager
from .fleets import DEMO_SHARDS, DemoFleet, LocalPostgresStarter, reset_demo_schema, sqlite_manager
from .story import STEPS, DemoReport, FleetChooser, run_steps

__all__ = ["DEMO_SHARDS", "STEPS", "DemoReport", "run_demo", "sqlite_manager"]


def run_demo(
    urls: Sequence[str] = (),
    *,
    steps: Sequence[int] | None = None,
    customers: int = 200,
    add_url: str | None = None,
    console: Console | None = None,
) -> DemoReport:
    """Run the story (all steps, or ``steps``) and return each step's figures.

    Without ``urls``: four SQLite files in a temporary directory (no server); the steps that need
    PostgreSQL run on throwaway local servers when the binaries are installed, else are skipped with
    the reason. With ``urls`` (``--url``): those shards, reset first (the demo refuses databases
    holding tables it does not own), so a re-run tells the same story; ``add_url`` is the server
    step 6 adds as the next shard.
    """
    console = console or Console()
    numbers = sorted(set(steps)) if steps else sorted(STEPS)
    unknown = [n for n in numbers if n not in STEPS]
    if unknown:
        raise ValueError(f"no demo step {unknown[0]}: steps are 1-{len(STEPS)}")
    started = time.perf_counter()
    tmp: tempfile.TemporaryDirectory[str] | None = None
    starter: LocalPostgresStarter | None = None
    manager = ShardManager.from_urls(list(urls), connect_timeout=5) if urls else None
    if manager is None:
        tmp = tempfile.TemporaryDirectory(prefix="shardkit-demo-")
        main = DemoFleet(sqlite_manager(Path(tmp.name)), f"{DEMO_SHARDS} SQLite files", postgres=False)
        console.print(
            f"[bold]sa_shardkit demo[/]: {DEMO_SHARDS} SQLite files in {tmp.name} act as shards (no server)."
        )
        if any(STEPS[n].needs_postgres for n in numbers):
            starter = LocalPostgresStarter()
            if starter.error is None:
                console.print(
                    "[dim]Steps 5-6 need PostgreSQL: starting 5 throwaway local servers in the background.[/]"
                )
    else:
        reset_demo_schema(manager, [add_url] if add_url else [])
        postgres = manager.engine(manager.shard_ids[0]).dialect.name == "postgresql"
        main = DemoFleet(
            manager, f"{len(manager.shard_ids)} servers (--url)", postgres=postgres, spare_url=add_url
        )
        console.print(
            f"[bold]sa_shardkit demo[/] on {', '.join(manager.safe_url(s) for s in manager.shard_ids)}"
        )

    def postgres_fleet() -> tuple[DemoFleet | None, str]:
        if starter is None:
            return None, "needs PostgreSQL, and the shards given are not PostgreSQL servers"
        fleet = starter.demo_fleet()
        return fleet, starter.error or ""

    chooser = FleetChooser(main, postgres_fleet)
    try:
        report = run_steps(chooser, numbers, customers, console)
    finally:
        for fleet in chooser.fleets:
            fleet.manager.dispose()
        if starter is not None:
            starter.close()
        if tmp is not None:
            tmp.cleanup()
    _summary(console, report, time.perf_counter() - started)
    return report


def _summary(console: Console, report: DemoReport, seconds: float) -> None:
    ran = [n for n in report.steps if n not in report.skipped]
    line = f"{len(ran)} step(s) in {seconds:.1f} s"
    if report.skipped:
        line += f", skipped: {', '.join(map(str, report.skipped))}"
    failed = report.failed_checks
    if failed:
        console.print(f"[bold red]FAILED[/] {line}:\n  " + "\n  ".join(failed))
    else:
        console.print(f"[bold green]OK[/] {line}; every figure checked.")
