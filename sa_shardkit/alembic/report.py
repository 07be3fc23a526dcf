"""What happened on each shard during one Alembic command, and the summary printed at the end.

A fleet-wide migration is a sequence of per-shard transactions, so its result is a list: which shards
reached the target, which one failed (and why), which were never attempted. The summary is printed
whether the run succeeded or not, so an operator always knows where the fleet stands.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from alembic.util import CommandError

from ..errors import MigrationError
from ..summary import hidden, summarise, tally


class ShardState(str, enum.Enum):
    """The outcome of one shard in one run."""

    MIGRATED = "migrated"
    """The shard's revision changed and the transaction committed."""
    UP_TO_DATE = "up to date"
    """Nothing to do: the shard was already at the target."""
    FAILED = "FAILED"
    """The shard's transaction rolled back: it is still at its revision from before the run."""
    UNAVAILABLE = "UNAVAILABLE"
    """The shard could not be reached; nothing ran anywhere (checked before the first shard)."""
    NOT_ATTEMPTED = "not attempted"
    """An earlier shard failed, so this one was left alone."""
    CHECKED = "checked"
    """A read-only command (``current``) looked at the shard."""
    APPLIED = "applied"
    """An ad-hoc statement (:func:`sa_shardkit.alembic.run_on_every_shard`) committed on the shard."""


@dataclass(frozen=True)
class ShardOutcome:
    """One shard's line in the summary."""

    shard_id: str
    state: ShardState
    before: tuple[str, ...] = ()
    """The shard's revision(s) before the run (empty: no ``alembic_version`` table / base)."""
    after: tuple[str, ...] = ()
    """The shard's revision(s) after the run (equal to ``before`` unless the state is MIGRATED)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state in (
            ShardState.MIGRATED,
            ShardState.UP_TO_DATE,
            ShardState.CHECKED,
            ShardState.APPLIED,
        )


@dataclass(frozen=True)
class MigrationReport:
    """Per-shard outcomes of one command (``upgrade``, ``downgrade``, ``stamp``, ``current``...)."""

    command: str
    target: str | None
    outcomes: Sequence[ShardOutcome] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.state in (ShardState.FAILED, ShardState.UNAVAILABLE)]

    def by_state(self, state: ShardState) -> list[str]:
        return [o.shard_id for o in self.outcomes if o.state is state]

    def summary(self, verbose: bool | None = None) -> str:
        """The text block printed after every run: one line per shard, then a verdict.

        Over more than 16 shards: a count per state, then only the shards that did not end ok
        (``verbose``, or ``SHARDKIT_VERBOSE=1``: every shard).
        """
        goal = f" to {self.target}" if self.target else ""
        lines = [f"shardkit: {self.command}{goal} on {len(self.outcomes)} shard(s)"]
        listed = list(self.outcomes)
        if summarise(len(listed), verbose):
            lines.append(f"  by state: {tally(o.state.value for o in listed)}")
            listed = [o for o in listed if not o.ok]
            lines.append(f"  {hidden(len(self.outcomes) - len(listed), 'shard(s) that ended ok')}")
        width = max((len(o.shard_id) for o in listed), default=0)
        for o in listed:
            revisions = _revs(o.before)
            if o.state is ShardState.MIGRATED:
                revisions = f"{_revs(o.before)} -> {_revs(o.after)}"
            elif o.state is ShardState.FAILED and o.after != o.before:
                revisions = f"{_revs(o.before)} -> {_revs(o.after)} (committed before the failure)"
            elif o.state is ShardState.FAILED:
                revisions = f"{_revs(o.before)} (unchanged)"
            line = f"  {o.shard_id:<{width}}  {o.state.value:<13}  {revisions}"
            if o.error:
                line += f"  {o.error}"
            lines.append(line.rstrip())
        if self.ok:
            lines.append(f"shardkit: OK, {len(self.outcomes)} shard(s) done")
        else:
            counted = tally(o.state.value for o in self.outcomes)
            lines.append(f"shardkit: STOPPED at {', '.join(o.shard_id for o in self.failed)} ({counted})")
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: the error message of a failed run."""
        if self.ok:
            return f"shardkit: {self.command} OK on {len(self.outcomes)} shard(s)"
        failed = self.failed
        done = [o.shard_id for o in self.outcomes if o.state is not ShardState.CHECKED and o.ok]
        skipped = self.by_state(ShardState.NOT_ATTEMPTED)
        names = ", ".join(o.shard_id for o in failed)
        parts = [f"shardkit: {self.command} STOPPED at {names}: {failed[0].error}"]
        if done:
            parts.append(f"done: {', '.join(done)}")
        if skipped:
            parts.append(f"not attempted: {', '.join(skipped)}")
        parts.append("fix the cause and re-run: shards already at the target are skipped")
        return "; ".join(parts)


def _revs(revisions: tuple[str, ...]) -> str:
    return ",".join(revisions) if revisions else "base"


class ShardMigrationError(MigrationError, CommandError):
    """A fleet-wide Alembic command did not complete on every shard; ``report`` says where it stopped.

    It is also Alembic's ``CommandError``, so the ``alembic`` command line prints one ``FAILED:`` line
    and exits non-zero instead of showing a traceback. (It lives here rather than in
    ``sa_shardkit.errors`` so that the core package does not import Alembic.)
    """

    def __init__(self, message: str, report: MigrationReport) -> None:
        super().__init__(message)
        self.report = report
