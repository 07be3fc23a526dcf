"""Structured progress of a rebalance, for callbacks and the CLI's progress bar."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .record import SourceCounts


@dataclass(frozen=True)
class BatchReport:
    """One key batch cut over from ``source`` (rows per table moved to each target)."""

    source: str
    keys_scanned: int
    keys_moved: int
    rows_moved: int
    rows_by_table: dict[str, int]
    fence_seconds: float
    """How long writers of the moving keys on ``source`` were fenced (the cut-over transaction)."""
    copy_seconds: float = 0.0
    """Phase 1 of the batch (key scan and staging copy, no fence)."""
    steps: dict[str, float] = field(default_factory=dict)
    """Seconds per step of the two phases (``copy: stream``, ``cut-over: delete + watermark``, ...),
    summed into :attr:`RebalanceProgress.phase_seconds` under those names."""


@dataclass(frozen=True)
class RebalanceProgress:
    """The whole move so far (what a progress callback receives after every batch)."""

    phase: str
    """``prepare``, ``move``, ``finish`` or ``done``."""
    rows_moved: int
    keys_moved: int
    batches: int
    rows_expected: int | None
    elapsed: float
    last_batch: BatchReport | None = None
    max_fence_seconds: float = 0.0
    paused: bool = False
    phase_seconds: dict[str, float] = field(default_factory=dict)
    rows_before: int = 0
    """Rows earlier (killed or cancelled) runs of the same move cut over (from the move record)."""
    """Wall time per step so far: ``prepare``, ``start``, ``move`` (split further into ``copy`` and
    ``cut-over``, summed over the sources' batches, which run in parallel), ``finish``."""

    @property
    def rows_per_second(self) -> float:
        return self.rows_moved / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def rows_moved_total(self) -> int:
        """Rows of the whole move cut over so far, earlier runs included."""
        return self.rows_before + self.rows_moved

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current rate (None when the total is unknown or nothing moved yet)."""
        if self.rows_expected is None or self.rows_moved == 0:
            return None
        left = max(0, self.rows_expected - self.rows_moved_total)
        return left / self.rows_per_second


class ProgressCallback(Protocol):
    """Called after each batch and at every phase change; must be quick and must not raise."""

    def __call__(self, progress: RebalanceProgress, /) -> None: ...


@dataclass
class ProgressTracker:
    """Sums batch reports from the per-source movers (threads) into :class:`RebalanceProgress`."""

    callback: ProgressCallback | None = None
    rows_expected: int | None = None
    started: float = field(default_factory=time.perf_counter)
    paused: bool = False
    rows_moved: int = 0
    keys_moved: int = 0
    batches: int = 0
    max_fence_seconds: float = 0.0
    rows_by_table: dict[str, int] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    rows_before: int = 0
    current: str = "prepare"
    _phase_started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def phase(self, phase: str) -> None:
        with self._lock:
            self._close_phase()
            self.current = phase
        self._emit(phase, None)

    def resumed_from(self, counts: Iterable[SourceCounts], rows_expected: int | None) -> None:
        """Count what earlier runs of the move did (their stored counters) and its planned rows."""
        with self._lock:
            self.rows_before = sum(c.rows_moved for c in counts)
            if self.rows_expected is None:
                self.rows_expected = rows_expected

    def _close_phase(self) -> None:
        now = time.perf_counter()
        if self.current != "done":
            seconds = self.phase_seconds.get(self.current, 0.0) + now - self._phase_started
            self.phase_seconds[self.current] = seconds
        self._phase_started = now

    def batch(self, report: BatchReport) -> None:
        with self._lock:
            self.rows_moved += report.rows_moved
            self.keys_moved += report.keys_moved
            self.batches += 1
            self.max_fence_seconds = max(self.max_fence_seconds, report.fence_seconds)
            steps = (("copy", report.copy_seconds), ("cut-over", report.fence_seconds), *report.steps.items())
            for name, seconds in steps:
                self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds
            for table, n in report.rows_by_table.items():
                self.rows_by_table[table] = self.rows_by_table.get(table, 0) + n
        self._emit(self.current, report)

    def snapshot(self, phase: str | None = None, last: BatchReport | None = None) -> RebalanceProgress:
        with self._lock:
            seconds = dict(self.phase_seconds)
            if self.current != "done":
                now = time.perf_counter()
                seconds[self.current] = seconds.get(self.current, 0.0) + now - self._phase_started
            return RebalanceProgress(
                phase or self.current,
                self.rows_moved,
                self.keys_moved,
                self.batches,
                self.rows_expected,
                time.perf_counter() - self.started,
                last,
                self.max_fence_seconds,
                self.paused,
                seconds,
                self.rows_before,
            )

    def _emit(self, phase: str, last: BatchReport | None) -> None:
        if self.callback is not None:
            self.callback(self.snapshot(phase, last))
