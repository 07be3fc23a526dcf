"""What the linter reports: findings (one per problem), grouped per revision, summed up in a report.

A finding names the revision, the operation, the rule, why it hurts on a sharded fleet and how to fix
it, so one line is enough to act on. Only errors fail a lint run; warnings and notes are advice.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class Severity(str, enum.Enum):
    """How bad a finding is; only ``ERROR`` makes the lint fail (or ``WARNING`` with ``strict``)."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


class Source(str, enum.Enum):
    """Which rule set produced a finding."""

    SHARDKIT = "shardkit"
    """sa_shardkit's own sharding rules (models + migration operations)."""
    SQUAWK = "squawk"
    """squawk's general PostgreSQL migration-safety rules, passed through."""


@dataclass(frozen=True)
class Finding:
    """One problem in one revision."""

    revision: str
    operation: str
    """The Alembic operation (``drop_column customers.email``) or, failing that, the SQL statement."""
    rule: str
    severity: Severity
    why: str
    fix: str
    source: Source = Source.SHARDKIT
    line: int | None = None
    """1-based line of the statement in the revision's rendered SQL (``RevisionReport.sql``)."""

    @property
    def rule_id(self) -> str:
        """``source:rule``, e.g. ``shardkit:drop-outside-contract`` or ``squawk:renaming-column``."""
        return f"{self.source.value}:{self.rule}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "operation": self.operation,
            "rule": self.rule_id,
            "severity": self.severity.value,
            "why": self.why,
            "fix": self.fix,
            "line": self.line,
        }


@dataclass(frozen=True)
class RevisionReport:
    """The findings of one revision, with the SQL they were found in."""

    revision: str
    path: str
    message: str
    contract: bool
    """The revision marks itself as a contract step (``shardkit_contract = True``)."""
    sql: str
    findings: tuple[Finding, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "path": self.path,
            "message": self.message,
            "contract": self.contract,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class SquawkStatus:
    """Whether squawk ran, and if not, what to do about it."""

    available: bool
    version: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class LintReport:
    """The outcome of one lint run over a sequence of revisions (oldest first)."""

    revisions: Sequence[RevisionReport]
    squawk: SquawkStatus
    notes: Sequence[str] = field(default_factory=tuple)
    """Run-level remarks: squawk missing, no models given (shard-key rules skipped), ..."""
    strict: bool = False

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.revisions for f in r.findings]

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity is severity)

    @property
    def errors(self) -> int:
        return self.count(Severity.ERROR)

    @property
    def warnings(self) -> int:
        return self.count(Severity.WARNING)

    @property
    def ok(self) -> bool:
        """No errors (and, when ``strict``, no warnings): the revisions may be applied."""
        return self.errors == 0 and not (self.strict and self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "notes": self.count(Severity.NOTE),
            "squawk": {
                "available": self.squawk.available,
                "version": self.squawk.version,
                "message": self.squawk.message,
            },
            "run_notes": list(self.notes),
            "revisions": [r.to_dict() for r in self.revisions],
        }
