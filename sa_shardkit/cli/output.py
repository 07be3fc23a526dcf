"""The console the commands print through: never truncates data when stdout is not a terminal.

rich lays a table out for an 80-column terminal when it cannot ask for the width (a pipe, a file,
``| grep``), and shortens cells to fit ("prima…"). Output that is read by a program or kept in a
file must carry the whole value: there, each table gets the width it needs and text lines are not
wrapped. On a terminal nothing changes.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.protocol import is_renderable

UNBOUNDED = 100_000
"""Columns a table may be measured in off a terminal (its real width is what its cells need)."""


class UntruncatedConsole(Console):
    """A :class:`rich.console.Console` that, off a terminal, prints every renderable at full width."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self.is_terminal:
            super().print(*objects, **kwargs)
            return
        unbounded = self.options.update_width(UNBOUNDED)
        wanted = [
            Measurement.get(self, unbounded, o).maximum
            for o in objects
            if is_renderable(o) and not isinstance(o, str)
        ]
        kwargs.setdefault("soft_wrap", True)  # text lines: one line each, however long
        width = self.width
        self.width = max([width, *wanted])  # rich clamps a print's width to the console's
        try:
            super().print(*objects, **kwargs)
        finally:
            self.width = width


def output_console() -> UntruncatedConsole:
    """The console for a command's report on stdout."""
    return UntruncatedConsole()
