"""Lease renewal: one background thread per manager keeps the leases of the sagas this process runs.

A saga is "live" exactly while its lease is unexpired. A runner that is slow (a long lock wait, a
retry back-off) keeps its lease through this heartbeat, so recovery leaves it alone; a process that
dies stops renewing, and after ``lease_seconds`` recovery may take the saga over.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from ..manager import ShardManager
from . import log as saga_log

logger = logging.getLogger("sa_shardkit.saga")


class LeaseKeeper:
    """Renews, every third of its lease, the lease of each saga held through :meth:`hold`."""

    def __init__(self, manager: ShardManager) -> None:
        self._manager = weakref.ref(manager)
        self._held: dict[tuple[str, str], tuple[str, float]] = {}  # (saga_id, owner) -> (home, lease)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, saga_id: str, owner: str, home: str, lease: float) -> Iterator[None]:
        with self._lock:
            shortest = min((held for _, held in self._held.values()), default=None)
            self._held[(saga_id, owner)] = (home, lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shardkit-saga-lease", daemon=True)
                self._thread.start()
            elif shortest is not None and lease < shortest:
                self._wake.notify()  # renew on the shorter schedule from now on
        try:
            yield
        finally:
            with self._lock:
                self._held.pop((saga_id, owner), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                interval = min(lease for _, lease in self._held.values()) / 3
                self._wake.wait(interval)
                held = dict(self._held)
            manager = self._manager()
            if manager is None:
                return
            by_shard: dict[tuple[str, float], list[tuple[str, str]]] = {}
            for key, (home, lease) in held.items():
                by_shard.setdefault((home, lease), []).append(key)
            for (home, lease), keys in by_shard.items():
                try:
                    with manager.engine(home).begin() as conn:
                        saga_log.renew(conn, keys, lease)
                except Exception as error:  # noqa: BLE001 - the runner itself will hit and report it
                    logger.warning("could not renew saga leases on shard %s: %s", home, error)


_keepers: weakref.WeakKeyDictionary[ShardManager, LeaseKeeper] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


def lease_keeper(manager: ShardManager) -> LeaseKeeper:
    """The manager's lease keeper (created on first use)."""
    with _keepers_lock:
        keeper = _keepers.get(manager)
        if keeper is None:
            keeper = _keepers[manager] = LeaseKeeper(manager)
        return keeper
