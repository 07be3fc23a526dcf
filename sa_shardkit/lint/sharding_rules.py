"""sa_shardkit's own migration rules: what is unsafe on a sharded fleet, read from Alembic operations.

A fleet migrates shard by shard, so for the length of a rollout some shards run the new schema and
some the old, while every application server talks to all of them. Hence: add before use, drop only
after no code uses it (a *contract step*), never rename; and every sharded table keeps its shard key
in its primary key, unique constraints and foreign keys, because PostgreSQL enforces each of those on
one shard only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from alembic.operations import MigrateOperation, ops
from sqlalchemy import ForeignKeyConstraint, Table, UniqueConstraint

from ..library_tables import LIBRARY_TABLE_PREFIX
from .findings import Finding, Severity
from .models import ShardSchema
from .operations import describe, written_table
from .render import RecordedOperation
from .revisions import CONTRACT_MARKER

CONTRACT_FIX = f"set `{CONTRACT_MARKER} = True` in a separate revision applied after that code is deployed"


@dataclass(frozen=True)
class Problem:
    """A finding before it is tied to a revision and an operation."""

    rule: str
    severity: Severity
    why: str
    fix: str


@dataclass(frozen=True)
class RuleContext:
    revision: str
    contract: bool
    schema: ShardSchema | None
    """The models of the code being deployed; ``None``: the shard-key rules are skipped."""


def check_operations(recorded: Sequence[RecordedOperation], context: RuleContext) -> list[Finding]:
    """Every sharding-rule finding for one revision's operations, in operation order."""
    findings = []
    for item in recorded:
        for problem in problems(item.operation, context):
            findings.append(
                Finding(
                    revision=context.revision,
                    operation=describe(item.operation),
                    rule=problem.rule,
                    severity=problem.severity,
                    why=problem.why,
                    fix=problem.fix,
                    line=item.first_line,
                )
            )
    return findings


def problems(operation: MigrateOperation, context: RuleContext) -> Iterator[Problem]:
    """The problems of one operation."""
    yield from _contract_rules(operation, context)
    schema = context.schema
    if schema is None:
        return
    if isinstance(operation, ops.CreateTableOp):
        yield from _new_table_rules(operation, schema)
    elif isinstance(operation, ops.CreatePrimaryKeyOp):
        yield from _key_in_columns("primary key", operation.table_name, list(operation.columns), schema)
    elif isinstance(operation, ops.CreateUniqueConstraintOp):
        yield from _key_in_columns("unique constraint", operation.table_name, list(operation.columns), schema)
    elif isinstance(operation, ops.CreateIndexOp) and operation.unique:
        names = [c if isinstance(c, str) else str(getattr(c, "name", c)) for c in operation.columns]
        yield from _key_in_columns("unique index", operation.table_name, names, schema)
    elif isinstance(operation, ops.CreateForeignKeyOp):
        yield from _foreign_key_rule(
            operation.source_table,
            list(operation.local_cols),
            operation.referent_table,
            list(operation.remote_cols),
            schema,
        )
    elif isinstance(operation, ops.AddColumnOp):
        yield from _added_column_rules(operation, schema)
    elif isinstance(operation, ops.AlterColumnOp):
        key = schema.shard_key(operation.table_name)
        if key == operation.column_name and operation.modify_nullable is True:
            yield _nullable_key(operation.table_name, key)
    table = written_table(operation)
    if table and schema.is_reference(table):
        yield Problem(
            "reference-table-write",
            Severity.NOTE,
            f"{table} is a reference table: this write runs on every shard (the env migrates each one), "
            "so each shard's copy changes the same way only if the statement is deterministic",
            "keep it deterministic (literal values; no now(), random() or sequences) so the copies stay equal",
        )


# -- expand / contract ---------------------------------------------------------------------------


def _contract_rules(operation: MigrateOperation, context: RuleContext) -> Iterator[Problem]:
    dropped: tuple[str, str | None] | None = None  # (table, column or None for the table)
    renamed: tuple[str, str | None, str] | None = None  # (table, column or None, new name)
    if isinstance(operation, ops.DropColumnOp):
        dropped = (operation.table_name, operation.column_name)
    elif isinstance(operation, ops.DropTableOp):
        dropped = (operation.table_name, None)
    elif isinstance(operation, ops.RenameTableOp):
        renamed = (operation.table_name, None, operation.new_table_name)
    elif isinstance(operation, ops.AlterColumnOp) and operation.modify_name:
        renamed = (operation.table_name, operation.column_name, operation.modify_name)
    if dropped is not None:
        table, column = dropped
    elif renamed is not None:
        table, column = renamed[0], renamed[1]
    else:
        return
    what = f"column {table}.{column}" if column else f"table {table}"
    if not context.contract:
        if dropped:
            yield Problem(
                "drop-outside-contract",
                Severity.ERROR,
                f"dropping {what} breaks every application server that still uses it, shard by shard as "
                "the rollout reaches each one",
                f"stop using it in the code and deploy that first; then drop it in a contract step: {CONTRACT_FIX}",
            )
        else:
            assert renamed is not None
            yield Problem(
                "rename-outside-contract",
                Severity.ERROR,
                f"renaming {what} to {renamed[2]} breaks running code at once, and mid-rollout some shards "
                "have the old name and some the new, so no version of the code works on all of them",
                f"never rename: add {renamed[2]} and backfill it (expand), switch the code, then drop the "
                f"old one in a contract step ({CONTRACT_MARKER} = True)",
            )
        return
    if context.schema is None:
        return
    declared = context.schema.maps_column(table, column) if column else context.schema.tables.get(table)
    if declared is not None:
        verb = "drops" if dropped else "renames"
        yield Problem(
            "contract-drops-mapped",
            Severity.ERROR,
            f"this contract step {verb} {what}, but the current models still map it "
            f"(model {declared.model}): the code being deployed still reads it",
            f"remove it from {declared.model} and deploy that code before applying this contract step",
        )


# -- shard keys -----------------------------------------------------------------------------------


def _new_table_rules(operation: ops.CreateTableOp, schema: ShardSchema) -> Iterator[Problem]:
    name = operation.table_name
    if name.startswith(LIBRARY_TABLE_PREFIX):
        return
    table = operation.to_table()
    key = schema.shard_key(name)
    if key is None and not schema.is_reference(name):
        yield Problem(
            "undeclared-table",
            Severity.WARNING,
            f"no model maps {name}, so the lint cannot tell whether it is sharded or a reference table "
            "and checked none of its shard-key rules",
            "map it with __shard_key__ (sharded) or __shard_reference__ = True (reference) before it ships",
        )
    if key is not None:
        column = table.columns.get(key)
        if column is None:
            yield Problem(
                "shard-key-not-null",
                Severity.ERROR,
                f"{name} is sharded by {key} (models) but the new table has no {key} column",
                f"add sa.Column({key!r}, ..., nullable=False) and include it in the primary key",
            )
        elif column.nullable:
            yield _nullable_key(name, key)
        pk = [c.name for c in table.primary_key.columns]
        yield from _key_in_columns("primary key", name, pk, schema)
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint):
                yield from _key_in_columns(
                    "unique constraint", name, [c.name for c in constraint.columns], schema
                )
        for index in table.indexes:
            if index.unique:
                yield from _key_in_columns("unique index", name, [c.name for c in index.columns], schema)
    yield from _table_foreign_keys(table, schema)


def _table_foreign_keys(table: Table, schema: ShardSchema) -> Iterator[Problem]:
    for constraint in table.constraints:
        if isinstance(constraint, ForeignKeyConstraint) and constraint.elements:
            targets = [e.target_fullname.split(".") for e in constraint.elements]
            yield from _foreign_key_rule(
                table.name,
                [e.parent.name for e in constraint.elements],
                targets[0][-2],
                [t[-1] for t in targets],
                schema,
            )


def _added_column_rules(operation: ops.AddColumnOp, schema: ShardSchema) -> Iterator[Problem]:
    column = operation.column
    for fk in column.foreign_keys:
        target = fk.target_fullname.split(".")
        yield from _foreign_key_rule(operation.table_name, [column.name], target[-2], [target[-1]], schema)
    if column.unique:
        yield from _key_in_columns("unique constraint", operation.table_name, [column.name], schema)


def _key_in_columns(kind: str, table: str, columns: list[str], schema: ShardSchema) -> Iterator[Problem]:
    key = schema.shard_key(table)
    if key is None or key in columns:
        return
    rule = "shard-key-in-primary-key" if kind == "primary key" else "shard-key-in-unique"
    shown = ", ".join(columns) or "no columns"
    yield Problem(
        rule,
        Severity.ERROR,
        f"{table} is sharded by {key}, but its {kind} ({shown}) does not include it: PostgreSQL checks "
        "it on one shard only, so the same value can exist once per shard",
        f"make the {kind} ({', '.join([key, *columns])})",
    )


def _foreign_key_rule(
    source: str, local: list[str], target: str, remote: list[str], schema: ShardSchema
) -> Iterator[Problem]:
    source_key, target_key = schema.shard_key(source), schema.shard_key(target)
    shown = f"{source}({', '.join(local)}) -> {target}({', '.join(remote)})"
    if source_key and target_key:
        if dict(zip(local, remote, strict=False)).get(source_key) != target_key:
            yield Problem(
                "shard-key-in-foreign-key",
                Severity.ERROR,
                f"foreign key {shown} does not pair the shard keys ({source}.{source_key} -> "
                f"{target}.{target_key}): the parent row may live on another shard, where PostgreSQL "
                "cannot see it",
                f"reference ({', '.join([source_key, *local])}) -> {target}"
                f"({', '.join([target_key, *remote])}), with {target_key} in the primary key of {target}",
            )
    elif target_key and schema.is_reference(source):
        yield Problem(
            "shard-key-in-foreign-key",
            Severity.ERROR,
            f"foreign key {shown} points from a reference table (the same rows on every shard) to a "
            "sharded table (each row on one shard): it cannot hold on every shard",
            "drop the constraint, or make the child sharded by the same key",
        )


def _nullable_key(table: str, key: str) -> Problem:
    return Problem(
        "shard-key-not-null",
        Severity.ERROR,
        f"{table}.{key} is the shard key but may be NULL: a row without a key has no shard",
        f"declare {key} NOT NULL (nullable=False) and part of the primary key",
    )
