"""Lint revisions: render each one offline, apply the sharding rules, run squawk, collect a report."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

from alembic.operations import ops
from alembic.script import ScriptDirectory
from sqlalchemy.orm import registry

from .defaults import DEFAULT_CONFIG, project_on_sys_path, with_ini_defaults
from .findings import Finding, LintReport, RevisionReport, Severity, Source, SquawkStatus
from .models import ShardSchema
from .operations import describe
from .render import RecordedOperation, RenderedRevision, render_upgrade
from .revisions import (
    CONTRACT_MARKER,
    LintTarget,
    script_directory,
    targets_from_files,
    targets_from_script_directory,
)
from .sharding_rules import RuleContext, check_operations
from .squawk import CONTRACT_RULES, ERROR_RULES, SquawkIssue, run_squawk, squawk_status

ModelsSpec = ShardSchema | str | ModuleType | type[Any] | registry | None
"""``"pkg.module:Base"``, a module, a declarative base, a registry, a :class:`ShardSchema`, or None."""

NO_MODELS_NOTE = (
    "no models given: the shard-key rules and the contract-vs-models check were skipped "
    "(pass --models pkg.module:Base, or set lint_models = pkg.module:Base in [shardkit])"
)


def lint_targets(
    targets: Sequence[LintTarget],
    *,
    models: ModelsSpec = None,
    squawk: bool = True,
    squawk_path: str | None = None,
    pg_version: str | None = None,
    squawk_config: str | None = None,
    strict: bool = False,
    lock_timeout: str | None = None,
    statement_timeout: str | None = None,
) -> LintReport:
    """Lint revisions (oldest first) against the models of the code being deployed.

    ``lock_timeout`` / ``statement_timeout``: what the sharded env sets on each shard
    (``shardkit_lock_timeout`` / ``shardkit_statement_timeout``), so squawk does not ask for them in
    every revision.
    """
    schema = models if isinstance(models, ShardSchema) or models is None else ShardSchema.load(models)
    notes = [] if schema is not None else [NO_MODELS_NOTE]
    binary, status = squawk_status(squawk_path) if squawk else (None, _disabled())
    if binary is None and status.message:
        notes.append(status.message)
    timeouts = {"lock_timeout": lock_timeout, "statement_timeout": statement_timeout}
    rendered = {t.revision: render_upgrade(t.module, **timeouts) for t in targets}
    issues = (
        run_squawk(
            binary,
            {r: x.sql for r, x in rendered.items()},
            pg_version=pg_version,
            config=squawk_config,
        )
        if binary
        else {}
    )
    reports = []
    for target in targets:
        result = rendered[target.revision]
        context = RuleContext(target.revision, target.contract, schema)
        findings = _render_failure(target, result) + check_operations(result.operations, context)
        findings += [
            f
            for issue in issues.get(target.revision, [])
            if (f := _squawk_finding(issue, result.operations, context)) is not None
        ]
        findings.sort(key=lambda f: (f.line or 0, f.source is Source.SQUAWK))
        reports.append(
            RevisionReport(
                revision=target.revision,
                path=target.path,
                message=target.message,
                contract=target.contract,
                sql=result.sql,
                findings=tuple(findings),
            )
        )
    return LintReport(revisions=tuple(reports), squawk=status, notes=tuple(notes), strict=strict)


def lint_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    config: str | os.PathLike[str] | None = DEFAULT_CONFIG,
    **options: Any,
) -> LintReport:
    """Lint revision files, in the order given (see :func:`lint_targets` for ``options``).

    ``config`` (default ``./alembic.ini`` when present; None: ignore it) supplies the models and the
    env's timeouts that are not passed, exactly as ``shardkit migrations lint`` reads them.
    """
    project_on_sys_path(config)
    return lint_targets(targets_from_files(paths), **with_ini_defaults(options, config))


def lint_script_directory(
    location: str | os.PathLike[str] | ScriptDirectory,
    *,
    lower: str | None = None,
    upper: str = "heads",
    config: str | os.PathLike[str] | None = DEFAULT_CONFIG,
    **options: Any,
) -> LintReport:
    """Lint what ``alembic upgrade lower:upper`` would apply (``lower`` None: from the base).

    ``config``: as for :func:`lint_files` (the same defaults as the CLI, so the same answer).
    """
    project_on_sys_path(config)
    script = location if isinstance(location, ScriptDirectory) else script_directory(location)
    targets = targets_from_script_directory(script, lower=lower, upper=upper)
    return lint_targets(targets, **with_ini_defaults(options, config))


def _disabled() -> SquawkStatus:
    return SquawkStatus(available=False, message="squawk disabled: only the sharding rules ran")


def _render_failure(target: LintTarget, result: RenderedRevision) -> list[Finding]:
    if result.error is None:
        return []
    return [
        Finding(
            revision=target.revision,
            operation="upgrade()",
            rule="offline-render",
            severity=Severity.ERROR,
            why=f"upgrade() failed in offline (--sql) mode ({result.error}), so nothing after that point "
            "could be checked",
            fix="use op.* operations and op.execute(SQL) only (no op.get_bind() reads), so the revision "
            "renders offline like `alembic upgrade --sql`",
        )
    ]


_STRUCTURED_CONTRACT_OPS = (ops.DropColumnOp, ops.DropTableOp, ops.RenameTableOp, ops.AlterColumnOp)


def _operation_at(line: int, recorded: Sequence[RecordedOperation]) -> RecordedOperation | None:
    """The narrowest recorded operation whose SQL spans ``line``."""
    spanning = [r for r in recorded if r.first_line <= line <= r.last_line]
    return min(spanning, key=lambda r: r.last_line - r.first_line) if spanning else None


def _squawk_finding(
    issue: SquawkIssue, recorded: Sequence[RecordedOperation], context: RuleContext
) -> Finding | None:
    at = _operation_at(issue.line, recorded)
    severity = Severity.ERROR if issue.rule in ERROR_RULES or issue.level == "Error" else Severity.WARNING
    fix = issue.help or f"see https://squawkhq.com/docs/{issue.rule}"
    if issue.rule in CONTRACT_RULES:
        if at is not None and isinstance(at.operation, _STRUCTURED_CONTRACT_OPS):
            return None  # the sharding rules judged this drop/rename with the contract marker in mind
        severity = Severity.WARNING if context.contract else Severity.ERROR
        if not context.contract:
            fix = f"do it in a contract step ({CONTRACT_MARKER} = True) once no deployed code uses it"
    return Finding(
        revision=context.revision,
        operation=describe(at.operation) if at else f"line {issue.line}",
        rule=issue.rule,
        severity=severity,
        why=issue.message,
        fix=fix,
        source=Source.SQUAWK,
        line=issue.line,
    )
