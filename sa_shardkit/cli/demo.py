"""`shardkit demo`."""

from __future__ import annotations

import click

from ..demo.run import run_demo
from .options import load_manager


@click.command()
@click.option(
    "--url", "urls", multiple=True, metavar="URL", help="Run on these shards instead of SQLite files."
)
@click.option("--customers", default=200, show_default=True, help="How many customers to create.")
def demo(urls: tuple[str, ...], customers: int) -> None:
    """Run the sharding story: embedded SQLite shards by default, PostgreSQL with --url."""
    if urls:
        with load_manager(None, urls) as manager:
            run_demo(manager, customers=customers)
    else:
        run_demo(customers=customers)
