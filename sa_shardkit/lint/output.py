"""The lint report as text (one line per finding, grouped by revision) or JSON (for tools)."""

from __future__ import annotations

import json
import os

from .findings import LintReport, Severity


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(report: LintReport) -> str:
    """``clean: ...`` / ``ok: ...`` / ``FAILED: ...``, the line a hook prints as its decision."""
    checked = _plural(len(report.revisions), "revision")
    rules = "sharding rules" + (f" + squawk {report.squawk.version}" if report.squawk.available else "")
    if not report.errors and not report.warnings:
        notes = report.count(Severity.NOTE)
        extra = f" ({_plural(notes, 'note')})" if notes else ""
        return f"clean: {checked} checked, no errors or warnings{extra} [{rules}]"
    counts = f"{_plural(report.errors, 'error')}, {_plural(report.warnings, 'warning')}"
    if report.ok:
        return f"ok: {checked} checked, {counts} [{rules}]"
    return f"FAILED: {checked} checked, {counts}{' (strict)' if report.strict else ''} [{rules}]"


def render_text(report: LintReport) -> str:
    """Revision headers, then one line per finding: severity, revision, operation, rule, why, fix."""
    lines: list[str] = []
    for note in report.notes:
        lines.append(f"note: {note}")
    for revision in report.revisions:
        if not revision.findings:
            continue
        marker = " [contract step]" if revision.contract else ""
        lines.append(f"{revision.revision}{marker}  {revision.message}  ({_short(revision.path)})")
        for f in revision.findings:
            lines.append(
                f"  {f.severity.value:<7} {f.revision}  {f.operation}  [{f.rule_id}]  {_sentence(f.why)} "
                f"fix: {f.fix}"
            )
    lines.append(summary_line(report))
    return "\n".join(lines)


def render_json(report: LintReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def _short(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return relative if not relative.startswith("..") else path


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."
