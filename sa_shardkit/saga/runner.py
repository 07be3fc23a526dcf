"""Drives one saga to a final state: forward steps, then (if one fails) compensations in reverse.

Each step runs in ONE transaction on its own shard: the step's receipt, its effect and, when the step
lives on the saga's home shard, the log update commit together. A step on another shard commits its
receipt with its effect; the log is updated right after, and a crash in between is harmless because
the retried step finds its receipt and does nothing.
"""

from __future__ import annotations

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
    SagaPendingError,
    SagaStepFailed,
    ShardUnavailableError,
)
from ..manager import ShardManager
from . import log as saga_log
from . import receipts
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


class _Stuck(Exception):
    """This runner cannot make progress now (a shard is unreachable); recovery will continue."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def is_transient(error: BaseException) -> bool:
    """A shard unreachable, a connection lost, a deadlock or serialization failure: worth a retry."""
    if isinstance(error, (ShardUnavailableError, OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def describe(error: BaseException) -> str:
    """One line for the log's ``error`` column (the driver's message, never a URL password)."""
    reason = getattr(error, "orig", None) or error
    text = str(reason).strip()
    return f"{type(reason).__name__}: {text.splitlines()[0] if text else ''}"[:1000]


def new_owner(role: str = "runner") -> str:
    """A lease owner id unique to one run: host, process, role and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}:{uuid.uuid4().hex[:12]}"


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
        self.wait_seconds = options.wait_seconds if wait_seconds is None else wait_seconds
        self.status = record.status
        self.step = record.step
        self.compensating = record.compensating
        self.failure = record.failure
        self.error = record.error
        # Steps whose forward attempt may have committed without us knowing. The first runner knows
        # its own attempts; a runner taking over from a dead one must assume the worst.
        self.doubt: set[int] = set() if origin else {record.step}

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
                    self.after_forward(0, first_step, local=True)
                self._drive()
            except (LeaseLost, _Fenced):
                return wait_final(self.manager, self.saga_id, self.home, self.wait_seconds)
            except _Stuck as stuck:
                self._release(describe(stuck.cause))
                raise SagaPendingError(
                    f"saga {self.saga_id!r} ({self.saga.name}) stopped at status {self.status!r}: "
                    f"{describe(stuck.cause)}; recovery will finish it",
                    saga_id=self.saga_id,
                    status=self.status,
                ) from stuck.cause
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
            except _StepError as error:
                if error.transient and i in self.doubt:
                    raise _Stuck(error.cause) from error
                # Unreachable and never committed by us: step i did not happen, undo from i - 1.
                # Any other error: the shard answered, so compensating step i itself (fence-or-undo)
                # settles whether it happened.
                start = i - 1 if error.transient else i
                self._start_compensation(i, start, f"{steps[i].name}_error", describe(error.cause))
        while self.compensating and self.step >= 0:
            self._backward(self.step)

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

    def _after_do(self, i: int, receipt: receipts.Receipt) -> dict[str, Any]:
        step = self.saga.steps[i]
        if receipt.outcome == receipts.APPLIED:
            if i + 1 == len(self.saga.steps):
                return {"status": FINAL_COMPLETE, "step": i + 1, "error": None, "finished": True}
            return {"status": f"{step.name}_complete", "step": i + 1, "error": None}
        # The action refused: its effect rolled back, so only the steps before it are undone.
        return self._compensating_values(i - 1, receipt.reason or f"{step.name}_refused")

    def _after_undo(self, j: int) -> dict[str, Any]:
        if j - 1 < 0:
            return {"status": f"{FAILED_PREFIX}{self.failure}", "step": -1, "finished": True}
        return {"step": j - 1}

    def _apply(self, values: Mapping[str, Any]) -> None:
        for name in ("status", "step", "compensating", "failure", "error"):
            if name in values:
                setattr(self, name, values[name])

    # -- one step --------------------------------------------------------------------------------

    def shard_of(self, i: int) -> str:
        """The shard step ``i`` runs on (asked of the manager: the one place that routes)."""
        return self.manager.shard_for(self.saga.steps[i].key(self.payload))

    def forward_work(self, i: int) -> Callable[[Connection], dict[str, Any]]:
        """Step ``i``'s transaction body: receipt, action and (on the home shard) the log update.

        A refusal (:class:`SagaStepFailed`) propagates as :class:`_Refused` so the caller rolls the
        transaction back and records the refusal in a new one (no savepoint on the happy path).
        """
        step = self.saga.steps[i]
        local = self.shard_of(i) == self.home

        def work(conn: Connection) -> dict[str, Any]:
            prior = receipts.begin_do(conn, self.saga_id, step.name)
            if prior is None:
                try:
                    step.action(conn, self.payload)
                except SagaStepFailed as refusal:
                    raise _Refused(refusal.reason) from refusal
                receipt = receipts.Receipt(receipts.APPLIED)
            else:
                receipt = prior  # an earlier attempt already decided this step
            return self._record_do(conn, i, receipt, local)

        return work

    def _refusal_work(self, i: int, reason: str) -> Callable[[Connection], dict[str, Any]]:
        step = self.saga.steps[i]
        local = self.shard_of(i) == self.home

        def work(conn: Connection) -> dict[str, Any]:
            return self._record_do(conn, i, receipts.refuse(conn, self.saga_id, step.name, reason), local)

        return work

    def _record_do(self, conn: Connection, i: int, receipt: receipts.Receipt, local: bool) -> dict[str, Any]:
        if receipt.outcome == receipts.FENCED:
            raise _Fenced(self.saga_id)
        values = self._after_do(i, receipt)
        if local:
            saga_log.write(conn, self.saga_id, self.owner, self.options.lease_seconds, values)
        return values

    def _forward(self, i: int) -> None:
        shard = self.shard_of(i)
        try:
            values = self._in_shard(shard, self.forward_work(i), doubt_step=i)
        except _Refused as refusal:
            values = self._in_shard(shard, self._refusal_work(i, refusal.reason), doubt_step=i)
        self.after_forward(i, values, local=shard == self.home)

    def after_forward(self, i: int, values: Mapping[str, Any], *, local: bool) -> None:
        """Step ``i`` committed: record it in the log (if not done in the same transaction)."""
        name = self.saga.steps[i].name
        self.checkpoint(f"do:{name}")
        if not local:
            self._write_home(values)
        self._apply(values)
        self.checkpoint(f"log:{name}")

    def _backward(self, j: int) -> None:
        step = self.saga.steps[j]
        shard = self.manager.shard_for(step.key(self.payload))
        local = shard == self.home

        def attempt(conn: Connection) -> dict[str, Any]:
            if receipts.begin_undo(conn, self.saga_id, step.name) and step.compensation is not None:
                step.compensation(conn, self.payload)
            values = self._after_undo(j)
            if local:
                saga_log.write(conn, self.saga_id, self.owner, self.options.lease_seconds, values)
            return values

        try:
            values = self._in_shard(shard, attempt, doubt_step=None)
        except _StepError as error:  # compensations must succeed eventually: retry later
            raise _Stuck(error.cause) from error
        self.checkpoint(f"undo:{step.name}")
        if not local:
            self._write_home(values)
        self._apply(values)
        self.checkpoint(f"log-undo:{step.name}")

    # -- transactions ----------------------------------------------------------------------------

    def _in_shard(
        self, shard: str, work: Callable[[Connection], dict[str, Any]], *, doubt_step: int | None
    ) -> dict[str, Any]:
        """Run ``work`` in one transaction on ``shard``, retrying transient errors with back-off."""
        attempts = max(1, self.options.step_attempts)
        for number in range(attempts):
            commit_sent = False
            try:
                with self.manager.connect(shard) as conn:
                    transaction = conn.begin()
                    values = work(conn)
                    commit_sent = True
                    transaction.commit()
                    return values
            except (LeaseLost, _Fenced, _Refused):
                raise  # rolled back by leaving the block
            except Exception as error:  # noqa: BLE001 - classified below
                if commit_sent and doubt_step is not None:
                    self.doubt.add(doubt_step)  # the commit may have happened
                transient = is_transient(error)
                if not transient or number + 1 == attempts:
                    raise _StepError(error, transient=transient) from error
                time.sleep(self.options.retry_delay * 2**number)
        raise AssertionError("unreachable")

    def _write_home(self, values: Mapping[str, Any]) -> None:
        """Record progress in the log on the home shard (fenced by our lease)."""

        def write(conn: Connection) -> dict[str, Any]:
            saga_log.write(conn, self.saga_id, self.owner, self.options.lease_seconds, values)
            return dict(values)

        try:
            self._in_shard(self.home, write, doubt_step=None)
        except _StepError as error:
            raise _Stuck(error.cause) from error
        self._apply(values)

    def _release(self, error: str) -> None:
        try:
            with self.manager.connect(self.home) as conn, conn.begin():
                saga_log.release(conn, self.saga_id, self.owner, error)
        except Exception:  # noqa: BLE001 - best effort: the lease runs out by itself anyway
            pass

    def checkpoint(self, name: str) -> None:
        if self.options.on_checkpoint is not None:
            self.options.on_checkpoint(self.saga_id, name)


def wait_final(manager: ShardManager, saga_id: str, home: str, timeout: float) -> SagaOutcome:
    """Poll the log until another runner finishes the saga; :class:`SagaPendingError` on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    status: str | None = None
    while True:
        try:
            with manager.connect(home) as conn:
                record = saga_log.load(conn, saga_id)
        except Exception as error:  # noqa: BLE001 - reported as pending below
            if not is_transient(error):
                raise
            record = None
        if record is not None:
            status = record.status
            if record.finished_at is not None:
                return record.outcome(home)
        if time.monotonic() >= deadline:
            raise SagaPendingError(
                f"saga {saga_id!r} is still being run by another worker (status {status!r})",
                saga_id=saga_id,
                status=status,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def run_saga(
    manager: ShardManager,
    saga: Saga,
    payload: Payload,
    *,
    saga_id: str | None = None,
    options: SagaOptions | None = None,
) -> SagaOutcome:
    """Run ``saga`` once per ``saga_id`` and return its final outcome.

    Submitting the same id again returns the first run's outcome (waiting for it if another process
    is running it, taking it over if that process died). Raises :class:`SagaConflictError` if the id
    was used with another payload, :class:`SagaPendingError` if a shard outage stops the saga half-way
    (recovery finishes it; resubmitting the same id is safe).
    """
    options = options or SagaOptions()
    saga_id = str(uuid.uuid4()) if saga_id is None else saga_id
    if not isinstance(saga_id, str) or not 0 < len(saga_id) <= 100:
        raise SagaInputError(f"saga id must be a string of 1-100 characters, got {saga_id!r}")
    data = normalized_payload(payload)
    home = manager.shard_for(saga.home(data))
    owner = new_owner()
    fresh = SagaRecord(saga_id, saga.name, data, "pending", 0, False, None, None, owner, 0, None, None)
    driver = SagaDriver(manager, saga, fresh, home, owner, options, origin=True)
    try:
        existing, first = _begin(manager, driver, data)
    except ShardUnavailableError:
        raise
    except Exception as error:
        if is_transient(error):
            raise SagaPendingError(
                f"saga {saga_id!r}: home shard {home!r} failed while recording it ({describe(error)}); "
                "it may or may not have been recorded: submit the same id again",
                saga_id=saga_id,
            ) from error
        raise
    if existing is None:
        return driver.run(created=True, first_step=first)
    assert existing is not None
    if existing.saga_type != saga.name or existing.payload != data:
        raise SagaConflictError(
            f"saga id {saga_id!r} was already used for {existing.saga_type} with payload "
            f"{existing.payload!r}; got {saga.name} with {data!r}"
        )
    if existing.finished_at is not None:
        return existing.outcome(home)
    with manager.connect(home) as conn, conn.begin():
        taken = saga_log.take_over(conn, saga_id, owner, options.lease_seconds)
    if taken is None:
        return wait_final(manager, saga_id, home, options.wait_seconds)
    return SagaDriver(manager, saga, taken, home, owner, options, origin=False).run()


def _begin(
    manager: ShardManager, driver: SagaDriver, data: dict[str, Any]
) -> tuple[SagaRecord | None, dict[str, Any] | None]:
    """Record a new saga; when its first step lives on the home shard, run that step in the same
    transaction (one commit instead of two). Returns (the existing record if the id was taken,
    the first step's log values if it ran)."""
    saga, saga_id, owner, lease = driver.saga, driver.saga_id, driver.owner, driver.options.lease_seconds
    with manager.connect(driver.home) as conn:
        if driver.shard_of(0) == driver.home:
            transaction = conn.begin()
            try:
                if not saga_log.create(conn, saga_id, saga.name, data, owner, lease):
                    existing = saga_log.load(conn, saga_id)
                    transaction.commit()
                    return existing, None
                values = driver.forward_work(0)(conn)
            except Exception as error:  # noqa: BLE001 - a refusal or error: let the driver record it
                transaction.rollback()
                if is_transient(error):
                    raise
            else:
                transaction.commit()
                return None, values
        with conn.begin():
            if saga_log.create(conn, saga_id, saga.name, data, owner, lease):
                return None, None
            return saga_log.load(conn, saga_id), None
