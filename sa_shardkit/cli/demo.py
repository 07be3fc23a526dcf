"""`shardkit demo`."""

from __future__ import annotations

import click
from rich.console import Console

from ..demo.run import STEPS, run_demo


@click.command()
@click.option(
    "--url",
    "urls",
    multiple=True,
    metavar="URL",
    help="Run on these shards (scratch databases: the demo resets its tables there) instead of SQLite files.",
)
@click.option(
    "--add-url", metavar="URL", default=None, help="With --url: the server step 6 adds as the next shard."
)
@click.option(
    "--customers",
    default=200,
    show_default=True,
    type=click.IntRange(10, 100_000),
    help="How many customers.",
)
@click.option(
    "--step",
    "step_numbers",
    multiple=True,
    type=click.IntRange(1, len(STEPS)),
    help="Run only this step (repeatable); what it builds on is set up quietly first.",
)
@click.option("--list", "list_steps", is_flag=True, help="List the steps and exit.")
def demo(
    urls: tuple[str, ...],
    add_url: str | None,
    customers: int,
    step_numbers: tuple[int, ...],
    list_steps: bool,
) -> None:
    """The product's story, step by step, through the public API.

    Schema by the Alembic migrations, routed writes, one-shard transactions, scatter reads, a saga
    and its recovery, a shard added online. Embedded SQLite shards by default (the PostgreSQL steps
    on throwaway local servers when the binaries are installed); --url runs it on your servers.
    Exit code 1 if a step's figures do not check out.
    """
    if list_steps:
        for step in STEPS.values():
            needs = " (PostgreSQL)" if step.needs_postgres else ""
            click.echo(f"{step.number}. {step.title}{needs}")
        return
    if add_url and not urls:
        raise click.UsageError("--add-url needs --url (the embedded demo starts its own servers)")
    report = run_demo(urls, steps=step_numbers, customers=customers, add_url=add_url, console=Console())
    if report.failed_checks:
        raise SystemExit(1)
