"""Safe migrations for a sharded fleet: lint Alembic revisions before they reach the shards.

Two rule sets over each revision's offline SQL and Alembic operations: squawk's general PostgreSQL
migration-safety rules (optional ``lint`` extra) and sa_shardkit's sharding rules (expand/contract
discipline, shard keys in keys and foreign keys, reference-table writes). See
docs/concepts/migration-lint.md.
"""

from __future__ import annotations

from .findings import Finding, LintReport, RevisionReport, Severity, Source, SquawkStatus
from .hook import lint_enabled, lint_hook
from .models import DeclaredTable, ShardSchema
from .output import render_json, render_text, summary_line
from .revisions import (
    CONTRACT_MARKER,
    LintTarget,
    script_directory,
    targets_for_fleet,
    targets_from_files,
    targets_from_script_directory,
)
from .runner import lint_files, lint_script_directory, lint_targets

__all__ = [
    "CONTRACT_MARKER",
    "DeclaredTable",
    "Finding",
    "LintReport",
    "LintTarget",
    "RevisionReport",
    "Severity",
    "ShardSchema",
    "Source",
    "SquawkStatus",
    "lint_enabled",
    "lint_files",
    "lint_hook",
    "lint_script_directory",
    "lint_targets",
    "render_json",
    "render_text",
    "script_directory",
    "summary_line",
    "targets_for_fleet",
    "targets_from_files",
    "targets_from_script_directory",
]
