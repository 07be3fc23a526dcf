"""Pausing and cancelling a running move, between batches (never inside one).

A batch is all-or-nothing (its source commit is the cut-over), so the only safe points to stop are
between batches: :meth:`MoveControl.checkpoint` is called there by every source mover. Cancelling
leaves the move in flight and consistent (every key is read and written where the stored state
says); :func:`~sa_shardkit.rebalance.resume` finishes it later.
"""

from __future__ import annotations

import threading

from ..errors import RebalanceCancelled


class MoveControl:
    """Pause/resume/cancel flags shared by a move's source movers (thread-safe)."""

    def __init__(self) -> None:
        self._running = threading.Event()
        self._running.set()
        self._cancelled = threading.Event()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def cancel(self) -> None:
        self._cancelled.set()
        self._running.set()  # a paused mover wakes up to stop

    def checkpoint(self) -> None:
        """Between batches: wait while paused; raise :class:`RebalanceCancelled` once cancelled."""
        while not self._running.wait(0.5):
            pass
        if self._cancelled.is_set():
            raise RebalanceCancelled("the move was cancelled between batches; resume() finishes it")


__all__ = ["MoveControl"]
