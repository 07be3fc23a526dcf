"""The fenced ```python and ```bash blocks of README.md and docs/**/*.md, and how to run them.

Conventions (documented in docs/development.md#snippets):

- every ``python`` block of a page runs, in page order, in one namespace per page (so a block may use
  what an earlier block of the same page defined); the namespace starts with ``manager``, a
  ``ShardManager.from_env()`` over the test fleet (four shards, migrated to ``head``, no rows);
- every ``bash`` block runs with ``bash -e -o pipefail`` in a fresh copy of the project
  (``alembic.ini``, ``migrations/``, ``examples/``), with ``SHARD_1_URL`` .. ``SHARD_4_URL`` set;
- ``<!-- snippet: skip (reason) -->`` on the line before a block marks it not runnable (a
  placeholder, an installer, a command that never returns); the reason is required.
"""

from __future__ import annotations

import ast
import asyncio
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z0-9_+-]*)[ \t]*$")
SKIP = re.compile(r"^\s*<!--\s*snippet:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")
MARKER = re.compile(r"<!--\s*snippet:")


@dataclass(frozen=True)
class Snippet:
    """One fenced block: where it is, its language, its code, and why it is skipped (if it is)."""

    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every docs page, found anew each run (new pages are picked up by themselves)."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def snippets(page: Path) -> list[Snippet]:
    """The runnable-language blocks of ``page`` (``python`` and ``bash``), in page order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    name = str(page.relative_to(REPO))
    found: list[Snippet] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        lang = opening.group("lang")
        if lang in ("python", "bash"):
            code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            found.append(Snippet(name, i + 1, lang, code, _skip_reason(lines, i, name)))
        i = end + 1
    return found


def _skip_reason(lines: list[str], fence: int, page: str) -> str | None:
    previous = next((line for line in reversed(lines[:fence]) if line.strip()), "")
    if not MARKER.search(previous):
        return None
    marker = SKIP.match(previous)
    if marker is None or not (marker.group("reason") or "").strip():
        raise ValueError(f"{page}:{fence + 1}: write the marker as <!-- snippet: skip (reason) -->")
    return marker.group("reason").strip()


def run_python(snippet: Snippet, namespace: dict[str, Any]) -> None:
    """Run one block in the page's namespace; a block with top-level ``await`` runs on an event loop."""
    code = compile(snippet.code, snippet.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # noqa: S307 - the documentation's own code, on test servers
    if asyncio.iscoroutine(result):
        asyncio.run(result)
