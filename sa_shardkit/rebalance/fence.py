"""Deprecated: routing by the stored ring, with its fence, is every manager's own now.

Every :class:`~sa_shardkit.ShardManager` follows the ring the shards store by itself
(``manager.placement``, :mod:`sa_shardkit.placement`); nothing needs to be built per process.
:class:`RingRouter` stays as an alias for code written before: it adds nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..manager import ShardManager
from ..placement import MAX_REROUTES, REFRESH_SECONDS, STICKY_SECONDS, MovingRead, Placement
from ..ring import ShardKey
from ..ring_state import FenceRow, RingState, read_fence

__all__ = [
    "MAX_REROUTES",
    "REFRESH_SECONDS",
    "STICKY_SECONDS",
    "FenceRow",
    "MovingRead",
    "RingRouter",
    "describe_route",
    "read_fence",
]


class RingRouter:
    """Deprecated alias of ``manager.placement`` (every manager routes by the stored ring itself).

    ``RingRouter(manager, refresh_seconds=...)`` sets the manager's refresh interval and reads the
    stored ring now; every attribute is the placement's.
    """

    def __init__(
        self, manager: ShardManager, state: RingState | None = None, *, refresh_seconds: float | None = None
    ) -> None:
        warnings.warn(
            "RingRouter is deprecated: every ShardManager follows the stored ring by itself "
            "(manager.placement; manager.transaction(key) for fenced Core writes)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.manager = manager
        placement = manager.placement
        if refresh_seconds is not None:
            placement.refresh_seconds = refresh_seconds
        placement.refresh()
        if state is not None:
            placement._adopt(state)

    @property
    def placement(self) -> Placement:
        return self.manager.placement

    def __getattr__(self, name: str) -> Any:
        return getattr(self.manager.placement, name)

    def detach(self) -> None:
        """Does nothing: the manager always routes by the stored ring."""


def describe_route(router: RingRouter | Placement, key: ShardKey) -> dict[str, Any]:
    """Where ``key`` lives now, for logs and the CLI."""
    placement = router.placement if isinstance(router, RingRouter) else router
    return placement.describe(key)
