"""A flag a feature raises once it is in use in this process, and the work that waits for it.

A session event listener costs every flush or commit one call even when it has nothing to do. A
feature that most processes never use (lookups) raises its :class:`Armed` flag when the first model
declares one; :func:`sa_shardkit.session.add_session_hook` registers the session's listener for it
only then (:meth:`Armed.when_armed`), so a process without the feature makes no such call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Armed(list[bool]):
    """Empty (false) until :meth:`arm`; then ``[True]`` for good. A list, so that the check on
    every flush (``if armed:``) stays a C-level truth test, not a Python call."""

    __slots__ = ("_lock", "_waiting")

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._waiting: list[Callable[[], None]] = []

    def arm(self) -> None:
        """The feature is in use: run the work waiting for it (once; later calls do nothing)."""
        with self._lock:
            if self:
                return
            self.append(True)
            waiting, self._waiting = self._waiting, []
        for callback in waiting:
            callback()

    def when_armed(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the flag is raised (now, if it is already)."""
        with self._lock:
            if not self:
                self._waiting.append(callback)
                return
        callback()


__all__ = ["Armed"]
