"""Short, readable names for Alembic operations, as shown in a finding's ``operation`` column."""

from __future__ import annotations

import re

from alembic.operations import MigrateOperation, ops
from sqlalchemy import Table
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause


def sql_text(operation: ops.ExecuteSQLOp) -> str:
    """The SQL of an ``op.execute(...)`` as text (a string, ``text()`` or a compiled construct)."""
    sql = operation.sqltext
    if isinstance(sql, str):
        return sql
    if isinstance(sql, TextClause):
        return sql.text
    return str(sql)


def _snake(name: str) -> str:
    """``DropColumnOp`` -> ``drop_column`` (the ``op.`` function's name); ``ExecuteSQLOp`` -> ``execute``."""
    if name == "ExecuteSQLOp":
        return "execute"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.removesuffix("Op")).lower()


def describe(operation: MigrateOperation) -> str:
    """``drop_column customers.email``, ``create_index ix_orders_status on orders``, ``execute UPDATE ...``."""
    name = _snake(type(operation).__name__)
    if isinstance(operation, ops.AddColumnOp):
        return f"{name} {operation.table_name}.{operation.column.name}"
    if isinstance(operation, ops.DropColumnOp):
        return f"{name} {operation.table_name}.{operation.column_name}"
    if isinstance(operation, ops.AlterColumnOp):
        rename = f" -> {operation.modify_name}" if operation.modify_name else ""
        return f"{name} {operation.table_name}.{operation.column_name}{rename}"
    if isinstance(operation, ops.RenameTableOp):
        return f"{name} {operation.table_name} -> {operation.new_table_name}"
    if isinstance(operation, ops.CreateIndexOp):
        return f"{name} {operation.index_name or '(unnamed)'} on {operation.table_name}"
    if isinstance(operation, ops.CreateForeignKeyOp):
        return f"{name} {operation.source_table} -> {operation.referent_table}"
    if isinstance(operation, ops.ExecuteSQLOp):
        text = " ".join(sql_text(operation).split())
        return f"{name} {text[:60]}{'...' if len(text) > 60 else ''}"
    if isinstance(operation, ops.BulkInsertOp):
        return f"{name} {operation.table.name}"
    table = getattr(operation, "table_name", None)
    return f"{name} {table}" if table else name


_DML_TARGET = re.compile(
    r"^\s*(?:WITH\b.*?\)\s*)?(?:INSERT\s+INTO|UPDATE(?:\s+ONLY)?|DELETE\s+FROM(?:\s+ONLY)?|"
    r"TRUNCATE(?:\s+TABLE)?(?:\s+ONLY)?|MERGE\s+INTO|COPY)\s+((?:\"[^\"]+\"|[\w$]+)(?:\.(?:\"[^\"]+\"|[\w$]+))?)",
    re.IGNORECASE | re.DOTALL,
)


def written_table(operation: MigrateOperation) -> str | None:
    """The table a data-changing operation writes (``op.execute`` of DML, ``op.bulk_insert``)."""
    if isinstance(operation, ops.BulkInsertOp):
        return str(operation.table.name)
    if not isinstance(operation, ops.ExecuteSQLOp):
        return None
    sql = operation.sqltext
    if isinstance(sql, UpdateBase):
        table = sql.table
        return str(table.name) if isinstance(table, Table) or hasattr(table, "name") else None
    match = _DML_TARGET.match(sql_text(operation))
    if not match:
        return None
    return match.group(1).split(".")[-1].strip('"')
