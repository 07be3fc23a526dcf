"""Drives one saga to a final state: forward steps, then (if one fails) compensations in reverse.

Where the log lives: the saga's *id* alone decides it (the id's shard on the ring, :func:`home_of`),
so one id means one operation fleet-wide: a second submission with another payload finds the first
one's row and raises :class:`SagaConflictError` before anything moves.

Each step runs in ONE transaction on its own shard, committing its receipt with its effect. The log
row is written only when it must be: at creation (in the same transaction as the first step when
that step lives on the home shard, already showing that step's outcome), when the saga turns to
compensating, and when it is final. Forward progress in between is not logged: the receipts are the
record, and a runner taking over replays from the last logged step (each replayed step finds its
receipt and does nothing). The completion mark of a successful saga is written in the background
(:mod:`.heartbeat`), off the caller's critical path, unless the last step lives on the home shard.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..errors import (
    SagaConflictError,
    SagaInputError,
    SagaNotStartedError,
    SagaPendingError,
    SagaStepFailed,
    ShardUnavailableError,
    StaleRingError,
)
from ..manager import ShardManager
from ..placement import MAX_REROUTES
from ..ring import ShardKey
from ..ring_state import value_text
from . import fast, receipts
from . import log as saga_log
from .definition import (
    FAILED_PREFIX,
    FINAL_COMPLETE,
    Payload,
    Saga,
    SagaOptions,
    SagaOutcome,
    normalized_payload,
)
from .heartbeat import lease_keeper
from .log import LeaseLost, SagaRecord
from .tables import sagas_table

SAGA_LOG = sagas_table.name
"""The log's rows are positioned by saga id (:mod:`sa_shardkit.rebalance.positioned`)."""

ID_CONFLICT = "id_conflict"
"""The failure of a saga stopped because a step's receipt was written for another operation."""


class _Fenced(Exception):
    """A compensation fenced this step before our forward attempt: the saga has moved on."""


class _Refused(Exception):
    """The step's action refused (a business rule); its transaction must be rolled back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StepError(Exception):
    """A step could not run after its retries."""

    def __init__(self, cause: BaseException, *, transient: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.transient = transient


class _Unfused(Exception):
    """A step's fused statement applied nothing (refused, or already done): roll back, use the action."""


class _Stuck(Exception):
    """This runner cannot make progress now (a shard is unreachable); recovery will continue."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Forgotten(Exception):
    """The first step's shard was unreachable and the saga's log row was deleted: nothing happened."""

    def __init__(self, cause: BaseException, shard_id: str) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.shard_id = shard_id


def is_transient(error: BaseException) -> bool:
    """A shard unreachable, a connection lost, a deadlock or serialization failure: worth a retry."""
    if isinstance(
        error, (ShardUnavailableError, StaleRingError, OperationalError, InterfaceError, PoolTimeoutError)
    ):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def describe(error: BaseException) -> str:
    """One line for the log's ``error`` column (the driver's message, never a URL password)."""
    reason = getattr(error, "orig", None) or error
    text = str(reason).strip()
    return f"{type(reason).__name__}: {text.splitlines()[0] if text else ''}"[:1000]


_process: tuple[int, str] = (0, "")
_runs = itertools.count()


def new_owner(role: str = "runner") -> str:
    """A lease owner id unique to one run: host, process, role, a random per-process token and a
    counter (one random draw per process, not per saga)."""
    global _process
    pid = os.getpid()
    if _process[0] != pid:  # first call, or a forked child
        _process = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")
    return f"{_process[1]}:{role}:{next(_runs)}"


def home_of(manager: ShardManager, saga_id: str) -> str:
    """The shard holding saga ``saga_id``'s log row: the id's own shard on the ring (the one place
    that decides it, so every process and every payload agree). While a move changes the id's
    shard, the row stays on the old one until the mover carried it over (then it is the new one)."""
    return manager.placement.shard_for_value(SAGA_LOG, saga_id)


def fence_home(manager: ShardManager, conn: Connection, shard_id: str, saga_id: str) -> None:
    """Hold the rebalance fence for saga ``saga_id``'s log row on ``shard_id`` in ``conn``'s
    transaction (:class:`StaleRingError` when the row lives elsewhere now)."""
    manager.placement.fence_value(conn, shard_id, SAGA_LOG, saga_id)


def new_saga_id(manager: ShardManager, near: ShardKey | None = None) -> str:
    """A fresh saga id (a UUID); with ``near``, one whose log lives on ``near``'s shard, so a saga
    whose first step works on ``near`` records itself in that step's transaction (one commit less)."""
    if near is None:
        return str(uuid.uuid4())
    wanted = manager.shard_for(near)
    # One random UUID, then its last 16 bits (part of the random node field) counted up: still a
    # valid version-4 UUID with 106 random bits, and one random draw instead of one per try.
    base = uuid.uuid4().int & ~0xFFFF
    for low in range(0x10000):
        candidate = str(uuid.UUID(int=base | low))
        if home_of(manager, candidate) == wanted:
            return candidate
    return str(uuid.UUID(int=base))  # ``near``'s shard is not on the ring: any shard will do


def _canonical(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


class SagaDriver:
    """Moves one claimed saga forward (or backward) until it is final, stuck, or taken by another."""

    def __init__(
        self,
        manager: ShardManager,
        saga: Saga,
        record: SagaRecord,
        home: str,
        owner: str,
        options: SagaOptions,
        *,
        origin: bool,
        wait_seconds: float | None = None,
    ) -> None:
        self.manager = manager
        self.saga = saga
        self.saga_id = record.saga_id
        self.payload: Mapping[str, Any] = record.payload
        self.home = home
        self.owner = owner
        self.options = options
        self.origin = origin
        self.wait_seconds = options.wait_seconds if wait_seconds is None else wait_seconds
        self.status = record.status
        self.step = record.step
        self.compensating = record.compensating
        self.failure = record.failure
        self.error = record.error
        canonical = _canonical(record.payload)
        self.keys = [s.key(self.payload) for s in saga.steps]
        self.inputs = [
            receipts.StepInput(
                self.saga_id, s.name, receipts.digest(saga.name, s.name, canonical), value_text(key)
            )
            for s, key in zip(saga.steps, self.keys, strict=True)
        ]
        self.shards = [manager.shard_for(key) for key in self.keys]
        self.local = False
        """Whether the transaction running now is on the home shard (it then writes the log too)."""
        # Steps whose forward attempt may have committed without us knowing. The first runner knows
        # its own attempts; a runner taking over from a dead one must assume the worst of every step
        # from the last logged one on (forward progress is not logged).
        self.doubt: set[int] = set() if origin else set(range(record.step, len(saga.steps)))
        self.applied_by_us: set[int] = set()
        self.unfused: set[int] = set()  # steps whose fused statement applied nothing: use the action

    # -- public --------------------------------------------------------------------------------

    def run(self, *, created: bool = False, first_step: Mapping[str, Any] | None = None) -> SagaOutcome:
        """Drive to a final state; :class:`SagaPendingError` if that is impossible right now.

        ``created``/``first_step``: the saga was just recorded, with its first step's log values when
        that step committed in the same transaction.
        """
        with lease_keeper(self.manager).hold(self.saga_id, self.owner, self.home, self.options.lease_seconds):
            try:
                if created:
                    self.checkpoint("created")
                if first_step is not None:
                    self.applied_by_us.add(0)
                    self.after_forward(0, first_step, local=True)
                self._drive()
            except (LeaseLost, _Fenced):
                return join(self.manager, self.saga, self.saga_id, self.home, self.options, self.wait_seconds)
            except _Stuck as stuck:
                self._release(describe(stuck.cause))
                raise SagaPendingError(
                    f"saga {self.saga_id!r} ({self.saga.name}) stopped at status {self.status!r}: "
                    f"{describe(stuck.cause)}; recovery will finish it",
                    saga_id=self.saga_id,
                    status=self.status,
                ) from stuck.cause
        if self.failure == ID_CONFLICT and self.origin:
            raise SagaConflictError(
                f"saga id {self.saga_id!r}: a step found a receipt written for another operation under "
                f"this id ({self.error}); the steps already applied were compensated, nothing moved"
            )
        return self.outcome()

    def outcome(self) -> SagaOutcome:
        return SagaOutcome(self.saga_id, self.saga.name, self.status, self.failure, self.error, self.home)

    # -- the state machine ----------------------------------------------------------------------

    def _drive(self) -> None:
        steps = self.saga.steps
        while not self.compensating and self.step < len(steps):
            i = self.step
            try:
                self._forward(i)
            except SagaConflictError as conflict:
                if self.origin and not self.applied_by_us and self._forget(conflict):
                    raise
                self._start_compensation(i, i - 1, ID_CONFLICT, str(conflict))
            except _StepError as error:
                if error.transient and i in self.doubt:
                    raise _Stuck(error.cause) from error
                if error.transient and not self.applied_by_us and self.origin and self._forget(error.cause):
                    raise _Forgotten(error.cause, self.shards[i]) from error
                # Unreachable and never committed by us: step i did not happen, undo from i - 1.
                # Any other error: the shard answered, so compensating step i itself (fence-or-undo)
                # settles whether it happened.
                start = i - 1 if error.transient else i
                self._start_compensation(i, start, f"{steps[i].name}_error", describe(error.cause))
        while self.compensating and self.step >= 0:
            self._backward(self.step)

    def _forget(self, error: BaseException) -> bool:
        """Nothing was applied: delete our log row so the id is free again (True if done)."""
        try:
            done = self._in_shard(
                None,
                lambda conn: {"done": saga_log.forget(conn, self.saga_id, self.owner)},
                doubt_step=None,
                attempts=1,
            )
            return bool(done["done"])
        except Exception:  # noqa: BLE001 - the row stays: the saga compensates (or recovery does)
            return False

    def _start_compensation(self, failed: int, start: int, reason: str, error: str) -> None:
        values = self._compensating_values(start, reason) | {"error": error}
        self._write_home(values)
        self.checkpoint(f"log:{self.saga.steps[failed].name}")

    def _compensating_values(self, start: int, reason: str) -> dict[str, Any]:
        if start < 0:
            return {
                "status": f"{FAILED_PREFIX}{reason}",
                "compensating": True,
                "step": -1,
                "failure": reason,
                "finished": True,
            }
        return {"status": "compensating", "compensating": True, "step": start, "failure": reason}

    def after_do(self, i: int, outcome: str, reason: str | None) -> dict[str, Any]:
        """The log values once step ``i`` has the receipt ``outcome``."""
        step = self.saga.steps[i]
        if outcome == receipts.APPLIED:
            if i + 1 == len(self.saga.steps):
                return {"status": FINAL_COMPLETE, "step": i + 1, "error": None, "finished": True}
            return {"status": f"{step.name}_complete", "step": i + 1, "error": None}
        # The action refused: its effect rolled back, so only the steps before it are undone.
        return self._compensating_values(i - 1, reason or f"{step.name}_refused")

    def _after_undo(self, j: int) -> dict[str, Any]:
        if j - 1 < 0:
            return {"status": f"{FAILED_PREFIX}{self.failure}", "step": -1, "finished": True}
        return {"step": j - 1}

    def _apply(self, values: Mapping[str, Any]) -> None:
        for name in ("status", "step", "compensating", "failure", "error"):
            if name in values:
                setattr(self, name, values[name])

    # -- one step --------------------------------------------------------------------------------

    def forward_work(self, i: int, *, reserved: bool = False) -> Callable[[Connection], dict[str, Any]]:
        """Step ``i``'s transaction body: receipt, action and (on the home shard) the log update.

        ``reserved``: the receipt is already inserted in this transaction (the fast start). A refusal
        (:class:`SagaStepFailed`) propagates as :class:`_Refused` so the caller rolls the transaction
        back and records the refusal in a new one (no savepoint on the happy path).
        """
        step = self.saga.steps[i]

        if not reserved and step.fused is not None and i not in self.unfused:
            fused = step.fused

            def fused_work(conn: Connection) -> dict[str, Any]:
                if not receipts.do_fused(conn, self.inputs[i], fused(self.payload)):
                    raise _Unfused(i)  # a refusal or a replay: the ordinary path tells which
                return self.record_fused(conn, i)

            return fused_work

        def work(conn: Connection) -> dict[str, Any]:
            prior = None if reserved else receipts.begin_do(conn, self.inputs[i])
            if prior is None:
                try:
                    step.action(conn, self.payload)
                except SagaStepFailed as refusal:
                    raise _Refused(refusal.reason) from refusal
                receipt = receipts.Receipt(receipts.APPLIED)
            else:
                receipt = prior  # an earlier attempt already decided this step
            # The fast start inserted the log row already showing this step's outcome.
            return self._record_do(conn, i, receipt, self.local, logged=reserved)

        return work

    def record_fused(self, conn: Connection, i: int, *, logged: bool = False) -> dict[str, Any]:
        """Step ``i``'s fused statement applied it: its log values (written here on the home shard
        unless ``logged``: the fast start's row already shows them)."""
        return self._record_do(conn, i, receipts.Receipt(receipts.APPLIED), self.local, logged=logged)

    def _refusal_work(self, i: int, reason: str) -> Callable[[Connection], dict[str, Any]]:
        def work(conn: Connection) -> dict[str, Any]:
            return self._record_do(conn, i, receipts.refuse(conn, self.inputs[i], reason), self.local)

        return work

    def _record_do(
        self, conn: Connection, i: int, receipt: receipts.Receipt, local: bool, *, logged: bool = False
    ) -> dict[str, Any]:
        if receipt.outcome == receipts.FENCED:
            raise _Fenced(self.saga_id)
        values = self.after_do(i, receipt.outcome, receipt.reason)
        if local and (not logged or values.get("finished")):
            saga_log.write(conn, self.saga_id, self.owner, self.options.lease_seconds, values)
        return values

    def _forward(self, i: int) -> None:
        if self._fast_forward(i):
            return
        try:
            try:
                values = self._in_shard(i, self.forward_work(i), doubt_step=i)
            except _Unfused:
                self.unfused.add(i)
                values = self._in_shard(i, self.forward_work(i), doubt_step=i)
        except _Refused as refusal:
            values = self._in_shard(i, self._refusal_work(i, refusal.reason), doubt_step=i)
        if values.get("status") != "compensating" and not values.get("compensating"):
            self.applied_by_us.add(i)
        self.after_forward(i, values, local=self.local)

    def _fast_forward(self, i: int) -> bool:
        """Step ``i`` as one autocommitted guarded statement (:mod:`.fast`); False: use the ordinary
        path (the step is not fused, a move is in flight, or the statement did not apply as a whole
        and was rolled back). On the home shard too: the step then does not write the log in its
        own transaction, exactly as a step on another shard (forward progress is not logged; the
        completion mark follows in the background)."""
        step = self.saga.steps[i]
        shard = self.shards[i]
        if step.fused is None or i in self.unfused or i in self.doubt:
            return False
        version = fast.fast_version(self.manager, shard, [self.keys[i]])
        if version is False:
            return False
        try:
            fast.step(self.manager, shard, self.inputs[i], step.fused(self.payload), version)
        except (fast.FastMiss, fast.NotSent):
            return False
        except Exception:  # noqa: BLE001 - the ordinary path retries and classifies it
            self.doubt.add(i)  # sent: the statement may have committed
            return False
        self.local = False
        self.applied_by_us.add(i)
        self.after_forward(i, self.after_do(i, receipts.APPLIED, None), local=False)
        return True

    def after_forward(self, i: int, values: Mapping[str, Any], *, local: bool) -> None:
        """Step ``i`` committed: log it if it must be (compensation starts now, or the saga is done).

        Plain forward progress is not logged (the receipt is the record); a successful end is marked
        in the background, with the lease kept until the mark is written.
        """
        name = self.saga.steps[i].name
        self.checkpoint(f"do:{name}")
        if local:
            self._apply(values)
            self.checkpoint(f"log:{name}")
        elif values.get("finished") and self.origin and not values.get("compensating"):
            # The caller's critical path: the outcome is decided, the mark can follow.
            lease_keeper(self.manager).finish_later(
                self.saga_id,
                self.owner,
                self.home,
                self.options.lease_seconds,
                values,
                on_checkpoint=self.options.on_checkpoint,
                checkpoint=f"log:{name}",
            )
            self._apply(values)
        elif values.get("compensating") or values.get("finished"):
            self._write_home(values)
            self.checkpoint(f"log:{name}")
        else:
            self._apply(values)
            self.checkpoint(f"log:{name}")

    def _backward(self, j: int) -> None:
        step = self.saga.steps[j]

        def attempt(conn: Connection) -> dict[str, Any]:
            if receipts.begin_undo(conn, self.inputs[j]) and step.compensation is not None:
                step.compensation(conn, self.payload)
            values = self._after_undo(j)
            if self.local:
                saga_log.write(conn, self.saga_id, self.owner, self.options.lease_seconds, values)
            return values

        try:
            values = self._in_shard(j, attempt, doubt_step=None)
        except _StepError as error:  # compensations must succeed eventually: retry later
            raise _Stuck(error.cause) from error
        self.checkpoint(f"undo:{step.name}")
        if not self.local:
            self._write_home(values)
        self._apply(values)
        self.checkpoint(f"log-undo:{step.name}")

    # -- transactions ----------------------------------------------------------------------------

    def _in_shard(
        self,
        step: int | None,
        work: Callable[[Connection], dict[str, Any]],
        *,
        doubt_step: int | None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """Run ``work`` in one transaction on step ``step``'s shard (None: the home shard) with the
        rebalance fence held for the step's key (and for the log row when that shard is home, where
        ``work`` writes it too: :attr:`local`); retries transient errors with back-off."""
        attempts = max(1, self.options.step_attempts if attempts is None else attempts)
        number = reroutes = 0
        while True:
            commit_sent = False
            try:
                with self.manager.connect(self._route(step)) as conn:
                    transaction = conn.begin()
                    if not self._fenced(conn, step):
                        transaction.rollback()
                        reroutes += 1
                        if reroutes > MAX_REROUTES:
                            raise StaleRingError(f"saga {self.saga_id!r}: the ring kept changing; retry")
                        continue
                    values = work(conn)
                    commit_sent = True
                    transaction.commit()
                    return values
            except (LeaseLost, _Fenced, _Refused, _Unfused, SagaConflictError):
                raise  # rolled back by leaving the block
            except Exception as error:  # noqa: BLE001 - classified below
                if commit_sent and doubt_step is not None:
                    self.doubt.add(doubt_step)  # the commit may have happened
                transient = is_transient(error)
                number += 1
                if not transient or number == attempts:
                    raise _StepError(error, transient=transient) from error
                time.sleep(self.options.retry_delay * 2 ** (number - 1))

    def _route(self, step: int | None) -> str:
        """Where step ``step`` (None: the log row) runs now; :attr:`local` says whether that is home."""
        shard = self.home if step is None else self.shards[step]
        self.local = shard == self.home
        return shard

    def _fenced(self, conn: Connection, step: int | None) -> bool:
        """Take the fence for the transaction :meth:`_route` chose; False (routes updated) when the
        step's key or the log row lives elsewhere now: run it again there."""
        shard = self.home if step is None else self.shards[step]
        keys = [] if step is None else [self.keys[step]]
        values = [(SAGA_LOG, self.saga_id)] if self.local else []
        for _ in range(MAX_REROUTES):
            try:
                self.manager.placement.fence(conn, shard, keys, values)
                return True
            except StaleRingError:
                self.home = home_of(self.manager, self.saga_id)
                if step is not None:
                    self.shards[step] = self.manager.shard_for(self.keys[step])
                if (self.home if step is None else self.shards[step]) != shard:
                    return False  # another shard: a new transaction there
                self.local = shard == self.home
                values = [(SAGA_LOG, self.saga_id)] if self.local else []
        raise StaleRingError(f"saga {self.saga_id!r}: the ring kept changing while fencing a step; retry")

    def _write_home(self, values: Mapping[str, Any]) -> None:
        """Record progress in the log on the home shard (fenced by our lease)."""

        def write(conn: Connection) -> dict[str, Any]:
            saga_log.write(conn, self.saga_id, self.owner, self.options.lease_seconds, values)
            return dict(values)

        try:
            self._in_shard(None, write, doubt_step=None)
        except _StepError as error:
            raise _Stuck(error.cause) from error
        self._apply(values)

    def _release(self, error: str) -> None:
        def release(conn: Connection) -> dict[str, Any]:
            saga_log.release(conn, self.saga_id, self.owner, error)
            return {}

        try:
            self._in_shard(None, release, doubt_step=None, attempts=1)
        except Exception:  # noqa: BLE001 - best effort: the lease runs out by itself anyway
            pass

    def checkpoint(self, name: str) -> None:
        if self.options.on_checkpoint is not None:
            self.options.on_checkpoint(self.saga_id, name)


def join(
    manager: ShardManager, saga: Saga | None, saga_id: str, home: str, options: SagaOptions, timeout: float
) -> SagaOutcome:
    """Wait for the saga's live runner to finish it, taking it over the moment its lease runs out.

    ``saga`` None: only wait (the caller cannot drive it). :class:`SagaPendingError` on timeout;
    :class:`_Gone` when the row disappeared (its runner found nothing applied and freed the id).
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    status: str | None = None
    owner = new_owner("retry")
    while True:
        try:
            home = home_of(manager, saga_id)  # a move may carry the row to another shard meanwhile
            with manager.connect(home) as conn, conn.begin():
                fence_home(manager, conn, home, saga_id)
                taken = saga_log.take_over(conn, saga_id, owner, options.lease_seconds) if saga else None
                record = taken or saga_log.load(conn, saga_id)
            answered = True
        except StaleRingError:
            record = taken = None  # the row moved meanwhile: read it where it is now
            answered = False
        except Exception as error:  # noqa: BLE001 - reported as pending below
            if not is_transient(error):
                raise
            record = taken = None
            answered = False
        if taken is not None and saga is not None:
            return SagaDriver(manager, saga, taken, home, owner, options, origin=False).run()
        if record is not None:
            status = record.status
            if record.finished_at is not None:
                return record.outcome(home)
        elif answered:
            raise _Gone(saga_id)  # never recorded, or freed by its runner: the caller may start it
        if time.monotonic() >= deadline:
            raise SagaPendingError(
                f"saga {saga_id!r} is still being run by another worker (status {status!r}); "
                "submit the same id again later, or let recovery finish it",
                saga_id=saga_id,
                status=status,
            )
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)


class _Gone(Exception):
    """The saga's row vanished while we waited: its runner freed the id (nothing was applied)."""


def wait_final(manager: ShardManager, saga_id: str, home: str, timeout: float) -> SagaOutcome:
    """Poll the log until another runner finishes the saga; :class:`SagaPendingError` on timeout."""
    return join(manager, None, saga_id, home, SagaOptions(), timeout)


def run_saga(
    manager: ShardManager,
    saga: Saga,
    payload: Payload,
    *,
    saga_id: str | None = None,
    options: SagaOptions | None = None,
) -> SagaOutcome:
    """Run ``saga`` once per ``saga_id`` (fleet-wide) and return its final outcome.

    Submitting the same id again returns the first run's outcome (waiting for it while another
    process runs it, taking it over as soon as that process's lease ran out). Raises
    :class:`SagaConflictError` if the id was used with another saga type or payload (nothing moves),
    :class:`SagaNotStartedError` (``recorded=False``) if a shard it starts on is unreachable (nothing
    was written: retry with the same id), and :class:`SagaPendingError` if an outage stops it
    half-way (recovery finishes it; resubmitting the same id is safe). Without ``saga_id`` a new id
    is made whose log lives on the saga's home key's shard (see :func:`new_saga_id`).
    """
    options = options or SagaOptions()
    data = normalized_payload(payload)
    if saga_id is None:
        saga_id = new_saga_id(manager, saga.home(data))
    if not isinstance(saga_id, str) or not 0 < len(saga_id) <= 100:
        raise SagaInputError(f"saga id must be a string of 1-100 characters, got {saga_id!r}")
    for _ in range(3):  # a saga freed by its runner (nothing applied) is started again
        try:
            return _run_once(manager, saga, saga_id, data, options)
        except _Gone:
            continue
    raise SagaPendingError(
        f"saga {saga_id!r} keeps being started and abandoned by other workers; submit it again later",
        saga_id=saga_id,
        recorded=None,
    )


def _run_once(
    manager: ShardManager, saga: Saga, saga_id: str, data: dict[str, Any], options: SagaOptions
) -> SagaOutcome:
    home = home_of(manager, saga_id)
    owner = new_owner()
    fresh = SagaRecord(saga_id, saga.name, data, "pending", 0, False, None, None, owner, 0, None, None)
    driver = SagaDriver(manager, saga, fresh, home, owner, options, origin=True)
    try:
        existing, first = _begin(manager, driver, data)
    except _NotRecorded as failure:
        raise SagaNotStartedError(
            f"saga {saga_id!r} was not recorded: its home shard {home!r} is unreachable "
            f"({describe(failure.cause)}); nothing was written, safe to retry with the same id",
            saga_id=saga_id,
            shard_id=home,
        ) from failure.cause
    except Exception as error:
        if is_transient(error):
            raise SagaPendingError(
                f"saga {saga_id!r}: home shard {home!r} failed while recording it ({describe(error)}); "
                "it may or may not have been recorded: submit the same id again",
                saga_id=saga_id,
                recorded=None,
            ) from error
        raise
    if existing is None:
        try:
            return driver.run(created=True, first_step=first)
        except _Forgotten as forgotten:
            raise SagaNotStartedError(
                f"saga {saga_id!r} did not start: shard {forgotten.shard_id!r} of its first step is "
                f"unreachable ({describe(forgotten.cause)}); nothing was moved or recorded, safe to "
                "retry with the same id",
                saga_id=saga_id,
                shard_id=forgotten.shard_id,
            ) from forgotten.cause
    if existing.saga_type != saga.name or existing.payload != data:
        raise SagaConflictError(
            f"saga id {saga_id!r} was already used for {existing.saga_type} with payload "
            f"{existing.payload!r}; got {saga.name} with {data!r} (nothing was moved)"
        )
    if existing.finished_at is not None:
        return existing.outcome(home)
    return join(manager, saga, saga_id, home, options, options.wait_seconds)


class _NotRecorded(Exception):
    """The home shard failed before the commit that records the saga was sent."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _begin(
    manager: ShardManager, driver: SagaDriver, data: dict[str, Any]
) -> tuple[SagaRecord | None, dict[str, Any] | None]:
    """Record a new saga; when its first step lives on the home shard, run that step in the same
    transaction, with the log row and the receipt inserted by one statement (one commit instead of
    two). Returns (the existing record if the id was taken, the first step's log values if it ran).

    The transaction holds the rebalance fence for the log row (and the first step's key): one read
    of the home shard's state row when no move is in flight."""
    for _ in range(MAX_REROUTES):
        try:
            return _begin_at_home(manager, driver, data)
        except StaleRingError:
            driver.home = home_of(manager, driver.saga_id)
            driver.shards[0] = manager.shard_for(driver.keys[0])
    raise _NotRecorded(StaleRingError(f"saga {driver.saga_id!r}: the ring kept changing; retry"))


def _fast_start(
    manager: ShardManager, driver: SagaDriver, data: dict[str, Any], shards: list[str]
) -> dict[str, Any] | None:
    """The fast start as one autocommitted guarded statement (:mod:`.fast`): the first step's log
    values, or None (nothing was written) to take the ordinary path."""
    saga, saga_id = driver.saga, driver.saga_id
    version = fast.fast_version(manager, driver.home, [driver.keys[0], saga_id])
    if version is False:
        return None
    fused = saga.steps[0].fused
    assert fused is not None
    values = driver.after_do(0, receipts.APPLIED, None)
    first = {**values, "step_name": saga.steps[0].name, "digest": driver.inputs[0].digest}
    action = fused(driver.payload)
    params = saga_log.start_params(
        saga_id,
        saga.name,
        _canonical(data),
        driver.owner,
        driver.options.lease_seconds,
        json.dumps(shards),
        first,
        action,
        driver.inputs[0].shard_key,
    )
    try:
        fast.start(manager, driver.home, params, action[0], version)
    except fast.NotSent as failure:
        raise _NotRecorded(failure.cause) from failure.cause
    except fast.FastMiss:
        return None  # rolled back: the id is taken, a refusal, a stale receipt or ring
    except Exception as error:
        if is_transient(error):
            raise  # sent: it may have committed (the caller reports "recorded: unknown")
        return None  # it failed as a whole: the ordinary path reports it
    driver.local = True
    return values


def _fast_create(manager: ShardManager, driver: SagaDriver, data: dict[str, Any], shards: list[str]) -> bool:
    """Record the saga (its first step lives elsewhere) in one autocommitted guarded statement;
    False (nothing was written) to take the ordinary path (the id is taken, the ring changed...)."""
    version = fast.fast_version(manager, driver.home, [driver.saga_id])
    if version is False:
        return False
    first = {"status": "pending", "step": 0, "step_name": "", "digest": ""}
    params = saga_log.start_params(
        driver.saga_id,
        driver.saga.name,
        _canonical(data),
        driver.owner,
        driver.options.lease_seconds,
        json.dumps(shards),
        first,
    )
    try:
        fast.create(manager, driver.home, params, version)
    except fast.NotSent as failure:
        raise _NotRecorded(failure.cause) from failure.cause
    except fast.FastMiss:
        return False
    except Exception as error:
        if is_transient(error):
            raise  # sent: it may have committed (the caller reports "recorded: unknown")
        return False
    return True


def _begin_at_home(
    manager: ShardManager, driver: SagaDriver, data: dict[str, Any]
) -> tuple[SagaRecord | None, dict[str, Any] | None]:
    saga, saga_id, owner, lease = driver.saga, driver.saga_id, driver.owner, driver.options.lease_seconds
    shards = list(dict.fromkeys(driver.shards))
    commit_sent = False
    local = driver.shards[0] == driver.home
    if local and saga.steps[0].fused is not None and len(saga.steps) > 1:
        done = _fast_start(manager, driver, data, shards)
        if done is not None:
            return None, done
    elif not local and _fast_create(manager, driver, data, shards):
        return None, None
    fences = ([driver.keys[0]] if local else [], [(SAGA_LOG, saga_id)])
    try:
        with manager.connect(driver.home) as conn:
            if local:
                driver.local = True
                values = driver.after_do(0, receipts.APPLIED, None)
                first = {**values, "step_name": saga.steps[0].name, "digest": driver.inputs[0].digest}
                step = saga.steps[0]
                fused = step.fused(driver.payload) if step.fused is not None else None
                transaction = conn.begin()
                existing: SagaRecord | None = None
                try:
                    manager.placement.fence(conn, driver.home, *fences)
                    created, reserved, applied = saga_log.create_with_receipt(
                        conn,
                        saga_id,
                        saga.name,
                        _canonical(data),
                        owner,
                        lease,
                        json.dumps(shards),
                        first,
                        fused,
                        driver.inputs[0].shard_key,
                    )
                    if created and reserved and (applied or fused is None):
                        if fused is None:
                            done = driver.forward_work(0, reserved=True)(conn)
                        else:  # the statement applied the step too
                            done = driver.record_fused(conn, 0, logged=True)
                        commit_sent = True
                        transaction.commit()
                        return None, done
                    if not created:
                        existing = saga_log.load(conn, saga_id)
                except StaleRingError:
                    transaction.rollback()
                    raise
                except Exception as error:  # noqa: BLE001 - a refusal or error: let the driver record it
                    transaction.rollback()
                    if is_transient(error) or isinstance(error, (LeaseLost, _Fenced)):
                        raise
                else:
                    # The id is taken, a refusal (the fused action applied nothing), or a stale
                    # receipt: undo this attempt; the ordinary path below decides.
                    transaction.rollback()
                    if existing is not None:
                        return existing, None
            with conn.begin():
                manager.placement.fence(conn, driver.home, (), fences[1])
                created = saga_log.create(conn, saga_id, saga.name, data, owner, lease, shards)
                commit_sent = True
                if created:
                    return None, None
                return saga_log.load(conn, saga_id), None
    except StaleRingError:
        raise
    except Exception as error:
        if is_transient(error) and not commit_sent:
            raise _NotRecorded(error) from error
        raise
