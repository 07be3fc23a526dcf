"""Cross-shard operations as durable sagas: steps with compensations, idempotency and recovery.

Use a saga when one business operation writes to rows on different shards (a transfer between two
customers). It gives eventual all-or-nothing (every step applied exactly once, or the applied ones
compensated), not isolation: other transactions can see the state between steps.
"""

from __future__ import annotations

from .definition import (
    CheckpointHook,
    FusedAction,
    KeyFunction,
    Payload,
    Saga,
    SagaOptions,
    SagaOutcome,
    SessionStepFunction,
    Step,
    StepFunction,
    session_step,
)
from .heartbeat import flush_completion_marks
from .inspect import PurgeReport, SagaInfo, SagaListing, list_sagas, purge_sagas
from .recovery import RecoveryReport, recover, recovery_worker
from .runner import home_of, new_saga_id, run_saga
from .tables import create_saga_tables, receipts_table, saga_metadata, sagas_table
from .transfer import CREDIT_TRANSFER, credit_transfer_saga, transfer, transfer_payload
from .twophase import (
    InDoubtReport,
    commit_across_keys,
    commit_across_shards,
    decisions_table,
    resolve_in_doubt,
)

__all__ = [
    "CREDIT_TRANSFER",
    "CheckpointHook",
    "FusedAction",
    "InDoubtReport",
    "KeyFunction",
    "Payload",
    "PurgeReport",
    "RecoveryReport",
    "Saga",
    "SagaInfo",
    "SagaListing",
    "SagaOptions",
    "SagaOutcome",
    "SessionStepFunction",
    "Step",
    "StepFunction",
    "commit_across_keys",
    "commit_across_shards",
    "create_saga_tables",
    "credit_transfer_saga",
    "decisions_table",
    "flush_completion_marks",
    "home_of",
    "list_sagas",
    "new_saga_id",
    "purge_sagas",
    "receipts_table",
    "recover",
    "recovery_worker",
    "resolve_in_doubt",
    "run_saga",
    "saga_metadata",
    "session_step",
    "sagas_table",
    "transfer",
    "transfer_payload",
]
