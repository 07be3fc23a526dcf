"""Cross-shard (scatter-gather) execution of one statement.

Placeholder with the stock behaviour (shards one after another, results concatenated); the
scatter-gather issue replaces it with parallel fan-out and a globally correct merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState


def execute_scatter(orm_context: ORMExecuteState, shard_ids: Sequence[str]) -> Result[Any]:
    """Run ``orm_context``'s statement on every shard in ``shard_ids`` and merge the results."""
    partial = []
    for shard_id in shard_ids:
        bind_arguments = dict(orm_context.bind_arguments)
        bind_arguments["shard_id"] = shard_id
        orm_context.update_execution_options(identity_token=shard_id)
        partial.append(orm_context.invoke_statement(bind_arguments=bind_arguments))
    return partial[0].merge(*partial[1:])
