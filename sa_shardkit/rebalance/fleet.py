"""The whole fleet's stored state at once: what a resume (and ``--status``) must look at."""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import RingState, ShardState


@dataclass(frozen=True)
class FleetView:
    """Every shard's row at once: the newest state, and a move whose last step did not finish.

    A move ends by bumping every shard to ``v+2`` one shard at a time; a kill in between leaves
    some shards at ``v+1`` (still "moving") and others at ``v+2``. Only the whole fleet's rows show
    that, so resuming reads them all, not only the newest version.
    """

    shards: dict[str, ShardState]

    @property
    def newest(self) -> RingState | None:
        if not self.shards:
            return None
        return max((s.state for s in self.shards.values()), key=lambda st: st.version)

    @property
    def lagging(self) -> dict[str, ShardState]:
        """Shards at an older version than the newest."""
        newest = self.newest
        return {
            k: s for k, s in self.shards.items() if newest is not None and s.state.version < newest.version
        }

    @property
    def unfinished(self) -> RingState | None:
        """The in-flight state of the move not yet finished on every shard, or None.

        The newest state when it is in flight; else, when the final bump was interrupted, the
        in-flight state that lagging shards still hold (its target is the newest ring).
        """
        newest = self.newest
        if newest is None or newest.in_flight:
            return newest
        for shard in self.lagging.values():
            state = shard.state
            if state.version == newest.version - 1 and state.target == newest.ring:
                return state
        return None

    @property
    def split(self) -> bool:
        """Shards stored at more than one version."""
        return len({s.state.version for s in self.shards.values()}) > 1


__all__ = ["FleetView"]
