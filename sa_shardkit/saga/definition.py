"""What a saga is: named steps, each an action and a compensation that run on one shard.

A step's functions are plain callables (typed Protocols, as in SQLAlchemy's horizontal_shard hooks):
they receive the open shard connection and the saga's payload, and must only touch rows of the shard
the step's key routes to. ORM code is wrapped with :func:`session_step` to receive a Session instead. The runner commits the step's effect with its receipt in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..errors import SagaError
from ..ring import ShardKey

Payload = Mapping[str, Any]
"""A saga's arguments: JSON-serialisable, stored in the saga log so recovery can replay steps."""

FINAL_COMPLETE = "complete"
FAILED_PREFIX = "failed_"


class StepFunction(Protocol):
    """An action or compensation: does its work on ``conn`` (inside the step's transaction)."""

    def __call__(self, conn: Connection, payload: Payload, /) -> None: ...


class SessionStepFunction(Protocol):
    """An ORM action or compensation: works through ``session``, bound to the step's shard connection."""

    def __call__(self, session: Session, payload: Payload, /) -> None: ...


def session_step(function: SessionStepFunction) -> StepFunction:
    """Let a step be ORM code: ``function(session, payload)`` receives a :class:`~sqlalchemy.orm.Session`
    bound to the step's shard connection, inside the step's one transaction.

    The session is flushed when ``function`` returns and then closed; the runner commits (with the
    step's receipt) or rolls back. ``session.commit()`` inside the step does not commit early (the
    session joins the runner's transaction, SQLAlchemy's ``rollback_only`` join mode).
    """

    def run(conn: Connection, payload: Payload) -> None:
        with Session(bind=conn, join_transaction_mode="rollback_only") as session:
            function(session, payload)
            session.flush()

    run.__name__ = getattr(function, "__name__", "session_step")
    run.__doc__ = function.__doc__
    return run


RECEIPT_RESERVED = "{receipt_reserved}"
"""Where a :class:`FusedAction`'s SQL says "only if this step's receipt was just reserved"."""


class FusedAction(Protocol):
    """A step's action as ONE data-modifying SQL statement, so the receipt and the effect (and, for a
    first step on the home shard, the log row) travel in a single round trip.

    Returns ``(sql, params)``: an ``UPDATE``/``INSERT``/``DELETE`` with ``RETURNING`` that returns at
    least one row when it applied and none when the action would refuse, with the literal
    ``{receipt_reserved}`` in its ``WHERE`` clause (the runner puts its receipt condition there).
    Parameter names must not start with ``sk_``. It must have exactly the effect of the step's
    ``action``: the runner uses it on the happy path only and runs ``action`` whenever it returns no
    row (a refusal, a replay), so refusals keep their reasons.
    """

    def __call__(self, payload: Payload, /) -> tuple[str, Mapping[str, Any]]: ...


class KeyFunction(Protocol):
    """Returns the shard key a step works on; the manager turns it into a shard."""

    def __call__(self, payload: Payload, /) -> ShardKey: ...


@dataclass(frozen=True)
class Step:
    """One saga step: ``action`` (forward) and ``compensation`` (undo), both on ``key``'s shard.

    Raise :class:`~sa_shardkit.errors.SagaStepFailed` from ``action`` to refuse for a business reason
    (the step's writes roll back and the saga compensates). A step without a compensation is not undone.
    """

    name: str
    key: KeyFunction
    action: StepFunction
    compensation: StepFunction | None = None
    fused: FusedAction | None = None
    """Optional single-statement form of ``action`` (see :class:`FusedAction`): one round trip less."""


@dataclass(frozen=True)
class Saga:
    """A named sequence of steps.

    Its log lives on the shard its saga *id* hashes to. ``home_key`` (default: the first step's key)
    only steers ids that the runner makes up itself (``saga_id=None``) onto that key's shard, where
    the first step then commits together with the log row.
    """

    name: str
    steps: Sequence[Step]
    home_key: KeyFunction | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.name or len(self.name) > 100:
            raise SagaError(f"saga name must be 1-100 characters, got {self.name!r}")
        if not self.steps:
            raise SagaError(f"saga {self.name!r} has no steps")
        names = [s.name for s in self.steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SagaError(f"saga {self.name!r}: step names must be unique, repeated: {duplicates}")
        _DEFINED[self.name] = self

    def home(self, payload: Payload) -> ShardKey:
        """The shard key a generated saga id is placed next to."""
        return (self.home_key or self.steps[0].key)(payload)


_DEFINED: dict[str, Saga] = {}


def defined_sagas() -> dict[str, Saga]:
    """Every saga type defined in this process, by name (the latest definition of a name): what
    a rebalance reads old receipts' step keys from (:mod:`sa_shardkit.rebalance.receipt_keys`)."""
    return dict(_DEFINED)


@dataclass(frozen=True)
class SagaOutcome:
    """Where a saga stands, as recorded in its log."""

    saga_id: str
    saga_type: str
    status: str
    failure: str | None = None
    error: str | None = None
    home_shard: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status == FINAL_COMPLETE or self.status.startswith(FAILED_PREFIX)

    @property
    def succeeded(self) -> bool:
        return self.status == FINAL_COMPLETE


class CheckpointHook(Protocol):
    """Called after each durable commit of a saga (fault injection and tracing).

    ``checkpoint`` is ``created``, ``do:<step>``, ``log:<step>``, ``undo:<step>`` or ``log-undo:<step>``.
    """

    def __call__(self, saga_id: str, checkpoint: str, /) -> None: ...


@dataclass(frozen=True)
class SagaOptions:
    """How a runner or recovery worker behaves; the defaults suit production."""

    lease_seconds: float = 5.0
    """A saga is "live" while its runner renews this lease (every third of it, from a background
    thread); when a runner dies, a retry of the same id or recovery takes the saga over this long
    after its last renewal. Longer leases tolerate longer stalls (a frozen process, a GC pause)
    without a takeover; shorter ones finish a dead runner's saga sooner. Takeover is always safe."""
    step_attempts: int = 3
    """Tries per step when its shard is unreachable or the transaction hits a transient error."""
    retry_delay: float = 0.2
    """Seconds before the first retry; doubles on each further one."""
    wait_seconds: float = 10.0
    """How long a duplicate submission waits for the live runner of the same saga id to finish; it
    takes the saga over as soon as that runner's lease has run out (keep it above ``lease_seconds``)."""
    on_checkpoint: CheckpointHook | None = field(default=None, compare=False)
    """Called as ``on_checkpoint(saga_id, checkpoint)`` right after each durable commit (see
    :class:`CheckpointHook`): tracing, and fault injection -- raising a ``BaseException`` from it
    stops the runner exactly there, as a crash would."""


def normalized_payload(payload: Payload) -> dict[str, Any]:
    """The payload as the log stores it (a JSON round trip), so duplicates compare equal."""
    try:
        value: dict[str, Any] = json.loads(json.dumps(dict(payload), sort_keys=True))
    except (TypeError, ValueError) as error:
        raise SagaError(f"saga payload must be JSON-serialisable: {error}") from None
    return value
