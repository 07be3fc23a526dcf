"""The six steps of ``shardkit demo`` and the runner that prints each as a titled panel.

A step runs on a :class:`~.fleets.DemoFleet`; what it needs from earlier steps (the schema, the
customers) is set up quietly first when those steps did not run on that fleet (``--step N``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, RenderableType

from .data import transactions, write_customers
from .fleets import DemoFleet
from .online import add_fifth_shard
from .reads import reads
from .render import skipped_panel, step_panel
from .schema import migrate
from .transfer import sagas

StepOutput = tuple[list[RenderableType], dict[str, Any]]


@dataclass(frozen=True)
class StepContext:
    fleet: DemoFleet
    customers: int
    console: Console


@dataclass(frozen=True)
class DemoStep:
    number: int
    title: str
    run: Callable[[StepContext], StepOutput]
    needs_postgres: bool = False
    needs_spare: bool = False
    requires: tuple[str, ...] = ()
    provides: str | None = None


STEPS: dict[int, DemoStep] = {
    s.number: s
    for s in (
        DemoStep(
            1,
            "Schema: the project's Alembic migrations, shard by shard",
            lambda c: migrate(c.fleet.manager),
            provides="schema",
        ),
        DemoStep(
            2,
            "Customers and orders through ShardedSession",
            lambda c: write_customers(c.fleet.manager, c.customers),
            requires=("schema",),
            provides="customers",
        ),
        DemoStep(
            3,
            "One-shard transactions: commit together, or leave nothing",
            lambda c: transactions(c.fleet.manager),
            requires=("schema", "customers"),
        ),
        DemoStep(
            4,
            "Keyed reads and scatter-gather, checked by brute force",
            lambda c: reads(c.fleet.manager),
            requires=("schema", "customers"),
        ),
        DemoStep(
            5,
            "A cross-shard credit transfer saga, a crash, recovery",
            lambda c: sagas(c.fleet.manager),
            needs_postgres=True,
            requires=("schema", "customers"),
        ),
        DemoStep(
            6,
            "A 5th shard joins online while a writer writes",
            lambda c: add_fifth_shard(c.fleet.manager, _spare(c.fleet), c.customers, c.console),
            needs_postgres=True,
            needs_spare=True,
            requires=("schema", "customers"),
        ),
    )
}
"""Step number -> step; ``shardkit demo --list`` prints the titles."""

PROVIDERS = {s.provides: s for s in STEPS.values() if s.provides}

CHECKS: dict[int, dict[str, Any]] = {
    1: {"at_head_all": True},
    2: {"misplaced": 0, "products_on_every_shard": True},
    3: {"committed_items": 3, "committed_status": "paid", "failed_rows_left": 0, "cross_shard_rows_left": 0},
    4: {"top_matches": True, "group_by_matches": True, "count_matches": True},
    5: {"money_conserved": True, "recovered": 1, "first_status": "complete", "retry_status": "complete"},
    6: {"lost": 0, "misplaced": 0, "writer_error": "none"},
}
"""What each step's figures must say; a run whose figures differ fails (exit code 1 in the CLI)."""


def _spare(fleet: DemoFleet) -> str:
    assert fleet.spare_url is not None
    return fleet.spare_url


@dataclass
class StepResult:
    number: int
    title: str
    where: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0


@dataclass
class DemoReport:
    """What a demo run did: each step's figures (the numbers its panel printed), or why it was skipped."""

    steps: dict[int, StepResult] = field(default_factory=dict)

    def figures(self, number: int) -> dict[str, Any]:
        return self.steps[number].figures

    @property
    def failed_checks(self) -> list[str]:
        """``step N: figure = got (expected ...)`` for every check a step that ran did not pass."""
        failed = []
        for number, result in self.steps.items():
            if result.skipped is not None:
                continue
            for name, expected in CHECKS.get(number, {}).items():
                got = result.figures.get(name)
                if got != expected:
                    failed.append(f"step {number}: {name} = {got!r} (expected {expected!r})")
        return failed

    @property
    def skipped(self) -> list[int]:
        return [n for n, r in self.steps.items() if r.skipped is not None]


class FleetChooser:
    """Which fleet each step runs on: the main one, or PostgreSQL for the steps that need it."""

    def __init__(self, main: DemoFleet, postgres: Callable[[], tuple[DemoFleet | None, str]]) -> None:
        self.main = main
        self._postgres = postgres
        self._pg: DemoFleet | None = None
        self._pg_reason: str | None = None

    def fleet_for(self, step: DemoStep) -> tuple[DemoFleet | None, str]:
        fleet = self.main
        if step.needs_postgres and not self.main.postgres:
            if self._pg is None and self._pg_reason is None:
                self._pg, self._pg_reason = self._postgres()
            if self._pg is None:
                return None, self._pg_reason or "needs PostgreSQL"
            fleet = self._pg
        if step.needs_spare and fleet.spare_url is None:
            return None, (
                "needs one more server to add as a shard: shardkit demo --url URL1 ... --url URL4 --add-url URL5 "
                "(a scratch database; the demo resets what it created there)"
            )
        return fleet, ""

    @property
    def fleets(self) -> list[DemoFleet]:
        return [self.main] + ([self._pg] if self._pg is not None else [])


def run_steps(chooser: FleetChooser, numbers: Sequence[int], customers: int, console: Console) -> DemoReport:
    report = DemoReport()
    for number in numbers:
        step = STEPS[number]
        fleet, reason = chooser.fleet_for(step)
        if fleet is None:
            console.print(skipped_panel(number, step.title, f"Step {number} {reason}."))
            report.steps[number] = StepResult(number, step.title, "-", skipped=reason)
            continue
        _prepare(fleet, step, customers, console)
        started = time.perf_counter()
        body, figures = step.run(StepContext(fleet, customers, console))
        seconds = time.perf_counter() - started
        if step.provides:
            fleet.ready.add(step.provides)
        where = f"{fleet.label} · {seconds:.1f} s"
        console.print(step_panel(number, step.title, where, body, figures))
        report.steps[number] = StepResult(number, step.title, fleet.label, figures, seconds=seconds)
    return report


def _prepare(fleet: DemoFleet, step: DemoStep, customers: int, console: Console) -> None:
    """Run the steps this one builds on quietly, when they have not run on this fleet."""
    done = []
    for need in step.requires:
        if need in fleet.ready:
            continue
        provider = PROVIDERS[need]
        quiet = Console(file=io.StringIO())
        provider.run(StepContext(fleet, customers, quiet))
        fleet.ready.add(need)
        done.append(f"step {provider.number} ({need})")
    if done:
        console.print(f"[dim]prepared on {fleet.label}: {', '.join(done)}[/]")
