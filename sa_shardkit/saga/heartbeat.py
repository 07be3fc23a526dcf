"""Lease renewal and deferred completion marks: one background thread per manager.

A saga is "live" exactly while its lease is unexpired. A runner that is slow (a long lock wait, a
retry back-off) keeps its lease through this heartbeat, so recovery leaves it alone; a process that
dies stops renewing, and after ``lease_seconds`` recovery (or a retry of the same id) takes it over.

The same thread writes *completion marks* off the caller's critical path: once a saga's last step
has committed (its receipt with it), the outcome is decided, and marking the log row finished can
wait a few milliseconds. Until the mark is written the lease stays renewed, so nobody else drives the
saga; if the process dies first, the saga is taken over after its lease and the replay finds every
step's receipt (nothing is applied twice) and writes the mark.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..errors import StaleRingError
from ..manager import ShardManager
from . import fast
from . import log as saga_log
from .definition import CheckpointHook
from .tables import sagas_table

logger = logging.getLogger("sa_shardkit.saga")

IDLE_SECONDS = 30.0
"""How long the thread lingers without sagas before it exits (a new saga starts it again)."""

MARK_LINGER_SECONDS = 0.02
"""How long the first pending completion mark waits for others to share its transaction."""
MARK_BATCH = 200
"""Marks written at once without waiting further."""

Held = tuple[str, str]
"""(saga_id, owner)"""


class LeaseKeeper:
    """Renews the leases of sagas held through :meth:`hold`; writes marks given to :meth:`finish_later`."""

    def __init__(self, manager: ShardManager) -> None:
        self._manager = weakref.ref(manager)
        self._held: dict[Held, tuple[str, float]] = {}  # -> (home, lease)
        self._holds: dict[Held, int] = {}
        self._marks: dict[Held, tuple[str, float, dict[str, Any], CheckpointHook | None, str]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._first_mark = 0.0
        self._writing = False

    @contextmanager
    def hold(self, saga_id: str, owner: str, home: str, lease: float) -> Iterator[None]:
        key = (saga_id, owner)
        with self._lock:
            shortest = min((held for _, held in self._held.values()), default=None)
            self._held[key] = (home, lease)
            self._holds[key] = self._holds.get(key, 0) + 1
            if not self._start() and (shortest is None or lease < shortest):
                self._wake.notify()  # renew on the shorter schedule from now on
        try:
            yield
        finally:
            with self._lock:
                self._holds[key] -= 1
                if not self._holds[key]:
                    del self._holds[key]
                    if key not in self._marks:
                        self._held.pop(key, None)

    def finish_later(
        self,
        saga_id: str,
        owner: str,
        home: str,
        lease: float,
        values: Mapping[str, Any],
        *,
        on_checkpoint: CheckpointHook | None = None,
        checkpoint: str = "",
    ) -> None:
        """Write ``values`` to the saga's log row soon, fenced by ``owner``; renew its lease until then."""
        key = (saga_id, owner)
        with self._lock:
            self._held[key] = (home, lease)
            if not self._marks:
                self._first_mark = time.monotonic()
            self._marks[key] = (home, lease, dict(values), on_checkpoint, checkpoint)
            self._start()
            self._wake.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every deferred mark is written (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._marks or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _start(self) -> bool:
        """Start the thread if it is not running; True if it was started now."""
        if self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._run, name="shardkit-saga-lease", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        renewed_at = time.monotonic()
        while True:
            with self._lock:
                if not self._held and not self._marks:
                    # Idle: linger a while (starting a thread per saga would cost more than waiting).
                    self._idle.notify_all()
                    self._wake.wait(IDLE_SECONDS)
                    if not self._held and not self._marks:
                        self._thread = None
                        return
                    renewed_at = time.monotonic()
                    continue
                interval = min(lease for _, lease in self._held.values()) / 3
                if not self._marks:
                    self._wake.wait(max(0.0, renewed_at + interval - time.monotonic()))
                # Let marks gather for a moment: one transaction then marks many sagas.
                while self._marks and len(self._marks) < MARK_BATCH:
                    remaining = self._first_mark + MARK_LINGER_SECONDS - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                marks, self._marks = self._marks, {}
                self._writing = bool(marks)  # flush() waits for these too
                due = time.monotonic() >= renewed_at + interval
                held = dict(self._held) if due else {}
            manager = self._manager()
            if manager is None:
                return
            failed = self._write_marks(manager, marks) if marks else {}
            if due:
                renewed_at = time.monotonic()
                self._renew(manager, held)
            with self._lock:
                for key in marks:
                    if key in failed:
                        self._marks.setdefault(key, failed[key])
                    elif key not in self._holds:
                        self._held.pop(key, None)
                self._writing = False
                if not self._marks:
                    self._idle.notify_all()
            if failed:
                time.sleep(min(1.0, interval))  # the home shard is down: retry later, lease still kept

    def _write_marks(
        self,
        manager: ShardManager,
        marks: dict[Held, tuple[str, float, dict[str, Any], CheckpointHook | None, str]],
    ) -> dict[Held, tuple[str, float, dict[str, Any], CheckpointHook | None, str]]:
        """One transaction per home shard; returns the marks to retry (their shard failed)."""
        failed = {}
        stale = list(marks)
        for _ in range(3):  # a move carried some rows to another shard meanwhile: route them again
            by_home, stale = _by_current_home(manager, stale), []
            failed.update(self._write_marks_once(manager, marks, by_home, stale))
            if not stale:
                break
        failed.update({k: marks[k] for k in stale})
        return failed

    def _write_marks_once(
        self,
        manager: ShardManager,
        marks: dict[Held, tuple[str, float, dict[str, Any], CheckpointHook | None, str]],
        by_home: dict[str, list[Held]],
        stale: list[Held],
    ) -> dict[Held, tuple[str, float, dict[str, Any], CheckpointHook | None, str]]:
        failed = {}
        for home, keys in by_home.items():
            items = [(k[0], k[1], marks[k][2]) for k in keys]
            try:
                if not _finish_fast(manager, home, items):
                    with manager.engine(home).begin() as conn:
                        _fence(manager, conn, home, keys)
                        saga_log.finish_many(conn, items)
            except StaleRingError:
                stale.extend(keys)
                continue
            except Exception as error:  # noqa: BLE001 - kept and retried; recovery is the backstop
                logger.warning("could not write saga completion marks on shard %s: %s", home, error)
                failed.update({k: marks[k] for k in keys})
                continue
            for key in keys:
                hook, checkpoint = marks[key][3], marks[key][4]
                if hook is not None and checkpoint:
                    try:
                        hook(key[0], checkpoint)
                    except BaseException:  # noqa: BLE001 - a hook cannot stop the background thread
                        logger.debug("checkpoint hook raised for %s", key[0], exc_info=True)
        return failed

    def _renew(self, manager: ShardManager, held: dict[Held, tuple[str, float]]) -> None:
        by_shard: dict[tuple[str, float], list[Held]] = {}
        for home, keys in _by_current_home(manager, held).items():
            for key in keys:
                by_shard.setdefault((home, held[key][1]), []).append(key)
        for (home, lease), keys in by_shard.items():
            try:
                with manager.engine(home).begin() as conn:
                    _fence(manager, conn, home, keys)
                    saga_log.renew(conn, keys, lease)
            except StaleRingError:
                continue  # a row moved meanwhile: the next round renews it where it is now
            except Exception as error:  # noqa: BLE001 - the runner itself will hit and report it
                logger.warning("could not renew saga leases on shard %s: %s", home, error)


def _by_current_home(manager: ShardManager, items: Iterable[Held]) -> dict[str, list[Held]]:
    """The sagas grouped by the shard holding their log row now (a move may have carried it)."""
    by_home: dict[str, list[Held]] = {}
    for key in items:
        home = manager.placement.shard_for_value(sagas_table.name, key[0])
        by_home.setdefault(home, []).append(key)
    return by_home


def _finish_fast(manager: ShardManager, home: str, items: list[tuple[str, str, dict[str, Any]]]) -> bool:
    """The marks as one guarded autocommitted statement on a kept connection (:func:`.fast.finish`);
    False (nothing written) when a move is in flight or the statement rolled back: use a transaction."""
    version = fast.fast_version(manager, home, [saga_id for saga_id, _, _ in items])
    if version is False:
        return False
    try:
        fast.finish(manager, home, items, version)
    except (fast.FastMiss, fast.NotSent):
        return False
    return True


def _fence(manager: ShardManager, conn: Any, home: str, keys: list[Held]) -> None:
    """The rebalance fence for these log rows (one state-row read when no move is in flight)."""
    manager.placement.fence(conn, home, (), [(sagas_table.name, k[0]) for k in keys])


_keepers: weakref.WeakKeyDictionary[ShardManager, LeaseKeeper] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


def lease_keeper(manager: ShardManager) -> LeaseKeeper:
    """The manager's lease keeper (created on first use)."""
    with _keepers_lock:
        keeper = _keepers.get(manager)
        if keeper is None:
            keeper = _keepers[manager] = LeaseKeeper(manager)
        return keeper


def flush_completion_marks(manager: ShardManager, timeout: float = 10.0) -> bool:
    """Write every deferred completion mark of ``manager``'s sagas now; False if some could not be
    written within ``timeout`` (their sagas are finished by a later retry or recovery)."""
    with _keepers_lock:
        keeper = _keepers.get(manager)
    return keeper.flush(timeout) if keeper is not None else True


@atexit.register
def _flush_at_exit() -> None:
    with _keepers_lock:
        keepers = list(_keepers.values())
    for keeper in keepers:
        keeper.flush(timeout=5.0)
