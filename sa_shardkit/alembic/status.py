"""Where every shard stands against the migration scripts: at head, behind, unknown, or unreachable.

Shards are read in parallel (read-only), so one slow or dead server costs one connect timeout, not
one per shard.
"""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.exc import SQLAlchemyError

from ..manager import ShardManager
from ..summary import hidden, summarise, tally


class RevisionState(str, enum.Enum):
    AT_HEAD = "at head"
    BEHIND = "behind"
    """At a known revision that is not a head: ``upgrade head`` will bring it forward."""
    EMPTY = "empty"
    """No ``alembic_version`` row: never migrated."""
    UNKNOWN = "unknown revision"
    """At a revision the scripts do not know (migrated by newer code, or a deleted revision)."""
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class ShardRevision:
    """One shard's current revision(s) and what that means."""

    shard_id: str
    heads: tuple[str, ...]
    state: RevisionState
    error: str | None = None

    @property
    def at_head(self) -> bool:
        return self.state is RevisionState.AT_HEAD


@dataclass(frozen=True)
class FleetStatus:
    """Every selected shard's revision; ``in_sync`` when all are at the scripts' head(s)."""

    shards: tuple[ShardRevision, ...]
    script_heads: tuple[str, ...]

    @property
    def in_sync(self) -> bool:
        return all(s.at_head for s in self.shards)

    @property
    def diverged(self) -> bool:
        """Shards disagree among themselves (not merely all behind together)."""
        return len({s.heads for s in self.shards}) > 1

    def describe(self, verbose: bool | None = None) -> str:
        """One line per shard (over 16 shards: counts, then only the shards not at head)."""
        heads = ",".join(self.script_heads) or "base"
        lines = [f"shardkit: migration status (scripts head: {heads})"]
        listed = list(self.shards)
        if summarise(len(listed), verbose):
            lines.append(f"  by state: {tally(s.state.value for s in listed)}")
            listed = [s for s in listed if not s.at_head or s.error]
            lines.append(f"  {hidden(len(self.shards) - len(listed), 'shard(s) at head')}")
        width = max((len(s.shard_id) for s in listed), default=0)
        for s in listed:
            line = f"  {s.shard_id:<{width}}  {','.join(s.heads) or 'base':<20}  {s.state.value}"
            if s.error:
                line += f"  {s.error}"
            lines.append(line.rstrip())
        if self.in_sync:
            lines.append(f"shardkit: OK, all {len(self.shards)} shard(s) at head")
        else:
            lagging = [s.shard_id for s in self.shards if not s.at_head]
            kind = "DRIFT" if self.diverged else "BEHIND"
            lines.append(f"shardkit: {kind}: not at head: {', '.join(lagging)}")
        return "\n".join(lines)


def classify(script: ScriptDirectory, heads: tuple[str, ...]) -> RevisionState:
    """What a shard's ``alembic_version`` rows mean against ``script``."""
    if not heads:
        return RevisionState.EMPTY if script.get_heads() else RevisionState.AT_HEAD
    try:
        script.get_revisions(heads)
    except CommandError:
        return RevisionState.UNKNOWN
    if set(heads) == set(script.get_heads()):
        return RevisionState.AT_HEAD
    return RevisionState.BEHIND


def read_heads(manager: ShardManager, shard_id: str) -> tuple[str, ...]:
    """The shard's ``alembic_version`` rows (empty when never migrated)."""
    with manager.connect(shard_id) as conn:
        return tuple(sorted(MigrationContext.configure(conn).get_current_heads()))


def fleet_status(manager: ShardManager, script: ScriptDirectory) -> FleetStatus:
    """Every shard of ``manager`` against the scripts' heads, read in parallel."""

    def one(shard_id: str) -> ShardRevision:
        try:
            heads = read_heads(manager, shard_id)
        except SQLAlchemyError as error:  # ShardUnavailableError, or the server died mid-query
            return ShardRevision(shard_id, (), RevisionState.UNREACHABLE, str(error))
        return ShardRevision(shard_id, heads, classify(script, heads))

    ids = list(manager.shard_ids)
    with ThreadPoolExecutor(max_workers=max(1, min(len(ids), 16)), thread_name_prefix="shardkit-rev") as pool:
        shards = tuple(pool.map(one, ids))
    return FleetStatus(shards, tuple(sorted(script.get_heads())))
