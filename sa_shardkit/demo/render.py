"""How the demo looks: one titled panel per step, figures in a line, bar charts of a distribution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

BAR = "█"


def figures_line(figures: Mapping[str, Any]) -> Text:
    """``name value · name value`` for the scalar figures a step reports (the ones tests check)."""
    line = Text()
    for name, value in figures.items():
        if isinstance(value, (dict, list, tuple)):
            continue
        if line:
            line.append("  ·  ", style="dim")
        line.append(f"{name.replace('_', ' ')} ", style="dim")
        line.append(_fmt(value, share=name.endswith("share")), style="bold")
    return line


def step_panel(
    number: int, title: str, where: str, body: Sequence[RenderableType], figures: Mapping[str, Any]
) -> Panel:
    parts: list[RenderableType] = [*body]
    if figures:
        parts.append(figures_line(figures))
    return Panel(
        Group(*parts),
        title=f"[bold]{number} · {title}[/]",
        title_align="left",
        subtitle=f"[dim]{where}[/]",
        subtitle_align="right",
        border_style="cyan",
    )


def skipped_panel(number: int, title: str, reason: str) -> Panel:
    return Panel(
        Text(reason),
        title=f"[bold]{number} · {title}[/] [yellow](skipped)[/]",
        title_align="left",
        border_style="yellow",
    )


def bar_chart(title: str, columns: Mapping[str, Mapping[str, int]], *, width: int = 20) -> RenderableType:
    """One row per shard, one bar column per series (e.g. ``before`` / ``after``), scaled together."""
    shards = sorted({s for series in columns.values() for s in series})
    widest = max([n for series in columns.values() for n in series.values()] + [1])
    table = Table(box=None, pad_edge=False)
    table.add_column("shard")
    for name in columns:
        table.add_column(name, justify="right")
        table.add_column("", no_wrap=True)
    for shard in shards:
        cells: list[str] = [shard]
        for series in columns.values():
            n = series.get(shard, 0)
            cells += [f"{n:,}", BAR * round(width * n / widest)]
        table.add_row(*cells)
    return Group(Text(title, style="italic"), table)


def simple_table(title: str | None, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> RenderableType:
    """A borderless table; its title is a line of its own (a narrow table would wrap it)."""
    table = Table(box=None, pad_edge=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    return table if title is None else Group(Text(title, style="italic"), table)


def _fmt(value: Any, *, share: bool = False) -> str:
    """Figures named ``*share`` are fractions (shown as %); booleans are checks (yes / NO)."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1%}" if share else f"{value:,.2f}"
    return str(value)
