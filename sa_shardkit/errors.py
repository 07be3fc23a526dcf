"""Every exception sa_shardkit raises, in one place.

Each derives from SQLAlchemy's exception family that means the same thing, so code that already
catches ``sqlalchemy.exc.InvalidRequestError`` or ``OperationalError``-like failures keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import exc as sa_exc


class ShardKitError(sa_exc.SQLAlchemyError):
    """Base class of every sa_shardkit error."""


class ConfigError(ShardKitError, ValueError):
    """The shard configuration (code, env vars or config file) is missing or malformed."""


class RingError(ShardKitError, ValueError):
    """A hash ring was asked to do something impossible."""


class EmptyRingError(RingError):
    """A ring needs at least one shard."""


class DuplicateShardError(RingError):
    """A shard id appears twice in one ring or configuration."""


class InvalidWeightError(RingError):
    """A shard weight must be a finite number greater than zero."""


class InvalidShardKeyError(RingError, TypeError):
    """A shard key must be a str, int, uuid.UUID or bytes (never None or bool)."""


class UnknownShardError(ShardKitError, sa_exc.InvalidRequestError, KeyError):
    """A shard id that the ring or manager does not know (``shard_id`` names it when known).

    Raised too when the stored ring places a key on a shard this process's configuration lacks.
    """

    def __init__(self, message: str, *, shard_id: str | None = None) -> None:
        super().__init__(message)
        self.shard_id = shard_id

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShardUnavailableError(ShardKitError):
    """A shard could not be reached (connect failure, timeout, server down)."""

    def __init__(self, message: str, *, shard_id: str | None = None) -> None:
        super().__init__(message)
        self.shard_id = shard_id


class ConnectionBudgetError(ShardKitError):
    """The process's connection budget (``max_connections``) stayed spent for ``pool_timeout``."""

    def __init__(self, message: str, *, shard_id: str | None = None) -> None:
        super().__init__(message)
        self.shard_id = shard_id


class ShardKeyMissingError(ShardKitError, sa_exc.InvalidRequestError):
    """A sharded object or statement has no value for its shard key."""


class NotShardedError(ShardKitError, sa_exc.InvalidRequestError):
    """A model declares neither a shard key nor that it is a reference table."""


class CrossShardTransactionError(ShardKitError, sa_exc.InvalidRequestError):
    """One session transaction tried to write to two shards without opting in."""


class ShardKeyChangeError(CrossShardTransactionError):
    """A stored row's shard key was changed to a key that lives on another shard."""


class SequenceError(ShardKitError):
    """A fleet-wide id sequence could not hand out an id (missing table, misuse)."""


class DuplicateKeyError(ShardKitError, sa_exc.InvalidRequestError):
    """A value of a fleet-wide unique column (a unique lookup) is already taken by another row."""

    def __init__(
        self,
        message: str,
        *,
        column: str,
        value: object,
        holders: Sequence[tuple[object, Sequence[tuple[object, str]]]] = (),
    ) -> None:
        super().__init__(message)
        self.column = column
        self.value = value
        self.holders = tuple(holders)
        """For a build over existing rows: every duplicated value with the ``(shard key, shard)``
        of each row holding it."""


class LookupIndexError(ShardKitError):
    """A lookup index (value -> shard key) could not be maintained, built or repaired."""


class UnsupportedScatterError(ShardKitError, sa_exc.InvalidRequestError):
    """A cross-shard query whose merged result could not be made globally correct."""


class UnfilteredScatterError(UnsupportedScatterError):
    """A read in SQL text on several shards while a move is in flight: the filter that hides each
    shard's not-yet-cut-over copies cannot rewrite text, so it could see a moving key's rows twice.
    Nothing was run. Write it with ``select()``, run it on one shard at a time, or after the move."""


class ScatterForbiddenError(ShardKitError, sa_exc.InvalidRequestError):
    """A statement would run on several shards in a session that refuses scatters (strict mode)."""


class ScatterWarning(UserWarning):
    """A statement runs on several shards in a session created with ``scatter="warn"``."""


class MigrationError(ShardKitError):
    """A migration failed on a shard, or shards disagree about their revision."""


class SagaError(ShardKitError):
    """A saga could not be started, run or recovered."""


class SagaInputError(SagaError, ValueError):
    """A saga was called with arguments it cannot accept (nothing was written)."""


class SagaConflictError(SagaError):
    """A saga id was submitted again with a different saga type or payload."""


class SagaStepFailed(SagaError):
    """Raised by a step's action to refuse for a business reason; the saga compensates."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


class TwoPhaseAbortedError(SagaError):
    """The in-doubt resolver rolled a two-phase transaction back before its coordinator committed it."""


class SagaPendingError(SagaError):
    """A saga could not be brought to a final state now; recovery will finish it (same id is safe).

    ``recorded`` is True when the saga is in its log (recovery will finish it), None when the commit
    that records it may or may not have happened (submitting the same id again settles it).
    """

    def __init__(
        self, message: str, *, saga_id: str, status: str | None = None, recorded: bool | None = True
    ) -> None:
        super().__init__(message)
        self.saga_id = saga_id
        self.status = status
        self.recorded = recorded


class SagaNotStartedError(ShardUnavailableError, SagaError):
    """A shard the saga starts on was unreachable: nothing was recorded or moved (``recorded`` is
    False), so it is safe to retry with the same id."""

    recorded = False

    def __init__(self, message: str, *, saga_id: str, shard_id: str | None = None) -> None:
        super().__init__(message, shard_id=shard_id)
        self.saga_id = saga_id


class RebalanceError(ShardKitError):
    """A shard addition/removal could not be planned or carried out."""


class RebalanceCancelled(RebalanceError):
    """A move was cancelled between batches; it stays in flight (consistent) until resumed."""


class FenceTimeoutError(ShardUnavailableError, RebalanceError):
    """A fence waited longer than the shard's ``fence_timeout`` for a rebalance step holding the
    shard's state row (a frozen or stuck mover): ``FOR SHARE`` of a move source's row behind a
    cut-over, or the ``FOR KEY SHARE`` of any write transaction behind a ring version bump; nothing
    was written (roll back). ``shard_id`` names the shard, ``seconds`` the bound."""

    def __init__(self, message: str, *, shard_id: str | None = None, seconds: float | None = None) -> None:
        super().__init__(message, shard_id=shard_id)
        self.seconds = seconds


class StaleRingError(RebalanceError):
    """A key's range moved (or the ring changed) under a transaction; retry it on the new shard."""

    def __init__(self, message: str, *, shard_id: str | None = None) -> None:
        super().__init__(message)
        self.shard_id = shard_id
