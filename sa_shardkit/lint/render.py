"""Render a revision's ``upgrade()`` to SQL the way ``alembic upgrade --sql`` does, recording its operations.

The revision runs against an offline (``as_sql``) PostgreSQL :class:`MigrationContext`, so no database
is needed and the SQL is what Alembic's offline mode prints, wrapped in the ``BEGIN;``/``COMMIT;`` of a
per-revision transaction. Every Alembic operation object (``AddColumnOp``, ``DropColumnOp``, ...) is
recorded with the lines of SQL it produced: the sharding rules read the operations (exact table and
column names), squawk reads the SQL, and line numbers tie squawk's findings back to an operation.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from alembic import op as alembic_op
from alembic.operations import BatchOperations, MigrateOperation, Operations
from alembic.runtime.migration import MigrationContext

from ..alembic.timeouts import set_statement


@dataclass(frozen=True)
class RecordedOperation:
    """One Alembic operation and the 1-based line span of the SQL it rendered (inclusive)."""

    operation: MigrateOperation
    first_line: int
    last_line: int


@dataclass(frozen=True)
class RenderedRevision:
    """A revision's offline SQL and the operations that produced it."""

    sql: str
    operations: tuple[RecordedOperation, ...]
    error: str | None = None
    """Why ``upgrade()`` could not run offline (then ``sql``/``operations`` hold what ran before)."""


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


class _Recorder:
    """Wraps ``Operations.invoke`` of one offline context to note each operation and its SQL span."""

    def __init__(self, operations: Operations, buffer: io.StringIO) -> None:
        self.buffer = buffer
        self.spans: list[tuple[MigrateOperation, int, int]] = []
        self._invoke = operations.invoke
        self._batch = operations.batch_alter_table
        operations.invoke = self._record  # type: ignore[method-assign]
        operations.batch_alter_table = self._record_batch  # type: ignore[method-assign]

    def _record(self, operation: MigrateOperation) -> Any:
        start = self.buffer.tell()
        result = self._invoke(operation)
        self.spans.append((operation, start, self.buffer.tell()))
        return result

    @contextmanager
    def _record_batch(self, *args: Any, **kw: Any) -> Iterator[BatchOperations]:
        # Batch operations render when the block ends: each gets the span of the whole block.
        start = self.buffer.tell()
        batch_ops: list[MigrateOperation] = []
        with self._batch(*args, **kw) as batch:
            invoke = batch.invoke

            def record(operation: MigrateOperation) -> Any:
                batch_ops.append(operation)
                return invoke(operation)

            batch.invoke = record  # type: ignore[method-assign]
            yield batch
        end = self.buffer.tell()
        # Without a table recreate, each batch operation renders one statement, in order.
        text = self.buffer.getvalue()[start:end]
        ends = [start + i + 3 for i in range(len(text)) if text.startswith(";\n\n", i)]
        if len(ends) == len(batch_ops):
            starts = [start, *ends[:-1]]
            self.spans.extend(zip(batch_ops, starts, ends, strict=True))
        else:
            self.spans.extend((operation, start, end) for operation in batch_ops)

    def recorded(self, sql: str) -> tuple[RecordedOperation, ...]:
        out = []
        for operation, start, end in self.spans:
            first = _line_of(sql, start)
            last = max(first, _line_of(sql, max(start, end - 1)))
            out.append(RecordedOperation(operation, first, last))
        return tuple(out)


@contextmanager
def _op_proxy(operations: Operations) -> Iterator[None]:
    """Point ``alembic.op`` at ``operations`` for the call, restoring whatever was there before."""
    previous = getattr(alembic_op, "_proxy", None)
    operations._install_proxy()
    try:
        yield
    finally:
        operations._remove_proxy()
        if previous is not None:
            previous._install_proxy()


def render_upgrade(
    module: ModuleType, *, lock_timeout: str | None = None, statement_timeout: str | None = None
) -> RenderedRevision:
    """Run ``module.upgrade()`` offline against PostgreSQL and return its SQL and operations.

    ``lock_timeout`` / ``statement_timeout``: the values the sharded env sets on each shard before
    its migrations (``shardkit_lock_timeout`` / ``-x lock_timeout=``, see
    :mod:`sa_shardkit.alembic.timeouts`); rendered as ``SET LOCAL`` so squawk sees what really runs.
    """
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buffer, "literal_binds": True},
    )
    operations = Operations(context)
    recorder = _Recorder(operations, buffer)
    upgrade: Callable[[], None] | None = getattr(module, "upgrade", None)
    error: str | None = None
    context.impl.emit_begin()
    for name, value in (("lock_timeout", lock_timeout), ("statement_timeout", statement_timeout)):
        if value:
            context.impl.static_output(
                set_statement(name, value, local=True) + context.impl.command_terminator
            )
    try:
        if upgrade is None:
            error = "the revision has no upgrade() function"
        else:
            with _op_proxy(operations):
                upgrade()
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported, not raised
        error = f"{type(exc).__name__}: {exc}"
    context.impl.emit_commit()
    sql = buffer.getvalue()
    return RenderedRevision(sql=sql, operations=recorder.recorded(sql), error=error)
