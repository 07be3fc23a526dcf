"""``python -m tests.rebalance_kill '{"argv": [...], "stop": {...}}'``: the real CLI mover, stopped
at one exact point so the test can SIGKILL it there.

``argv`` are ``shardkit rebalance`` arguments. ``stop`` names the point: the ``nth`` statement whose
SQL contains ``sql`` (on the shard whose URL port is ``port``, if given). When that statement is
about to run, this process prints ``stopped`` and freezes every thread at its next statement, so
nothing after that point reaches any server before the kill. With ``delay`` (seconds), that
statement and everything the mover sends in the next ``delay`` seconds run; then it stops (a kill
while the mover sleeps, e.g. in the start wait). ``hold`` (``{"sql", "nth"}``) names an earlier
statement where the mover prints ``held`` and waits for a line on its stdin before it sends it:
:func:`kill_mover_at` runs its ``on_hold`` there (e.g. a reader reads the ring just before the
mover's start bump).

:func:`kill_mover_at` is the test side: it runs this module and kills it at the stop point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.ring_state import STATE_TABLE

if TYPE_CHECKING:
    from sa_shardkit import HashRing, ShardManager

ROOT = Path(__file__).resolve().parent.parent


def url_args(manager: ShardManager, shard_ids: Iterable[str]) -> list[str]:
    """``--url`` options (passwords included: the mover must connect) for ``shard_ids``."""
    return [a for s in shard_ids for a in ("--url", manager.config(s).primary_url.render_as_string(False))]


def start_mover(argv: list[str], stop: dict[str, Any]) -> subprocess.Popen[str]:
    """The CLI mover (``argv``) in a subprocess that freezes at ``stop`` and prints 'held' at
    ``stop["hold"]`` (waiting for 'go' on stdin), 'stopped' once frozen."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rebalance_kill", json.dumps({"argv": argv, "stop": stop})],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_held(mover: subprocess.Popen[str], where: str) -> list[str]:
    """Read the mover's output until it prints 'held' (it waits at its hold point); fails naming
    ``where`` if it exits first. Returns the lines it printed before."""
    assert mover.stdout is not None
    output = []
    while (line := mover.stdout.readline()) and line.strip() != "held":
        output.append(line)
    assert line.strip() == "held", f"the mover never reached {where}:\n" + "".join(output)
    return output


@contextmanager
def frozen_mover(argv: list[str], stop: dict[str, Any], where: str) -> Iterator[subprocess.Popen[str]]:
    """The CLI mover held at ``stop["hold"]`` (:func:`wait_held` ``where``) and SIGSTOPped there;
    on leaving, continued and killed unless :func:`finish_frozen` let it complete."""
    mover = start_mover(argv, stop)
    try:
        wait_held(mover, where)
        os.kill(mover.pid, signal.SIGSTOP)
        yield mover
    finally:
        if mover.poll() is None:
            os.kill(mover.pid, signal.SIGCONT)
            os.kill(mover.pid, signal.SIGKILL)
            mover.wait(timeout=60)


def finish_frozen(mover: subprocess.Popen[str]) -> None:
    """SIGCONT a :func:`frozen_mover` and let its held statement go: the move must complete."""
    assert mover.stdout is not None and mover.stdin is not None
    os.kill(mover.pid, signal.SIGCONT)
    mover.stdin.write("go\n")
    mover.stdin.flush()
    rest = mover.stdout.read()
    assert mover.wait(timeout=180) == 0, rest
    assert "done" in rest, rest


def state_row_held(url: str, lock: str) -> bool:
    """Whether a transaction holds ``url``'s ring state row against ``lock`` ('FOR SHARE': a
    fence, held by a cut-over; 'FOR KEY SHARE': every writer, held by a version bump)."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        try:
            conn.execute(f"SELECT 1 FROM {STATE_TABLE} {lock} NOWAIT")
        except psycopg.errors.LockNotAvailable:
            return True
        return False


def add_shard_argv(
    manager: ShardManager, ring: HashRing, shard_id: str, url: str
) -> tuple[dict[str, str], list[str]]:
    """(every shard's URL, passwords included, joining one too; the CLI's argv adding it to ``ring``)."""
    urls = {s: manager.config(s).primary_url.render_as_string(False) for s in ring.shard_ids}
    urls[shard_id] = url
    return urls, [*url_args(manager, ring.shard_ids), "--add", shard_id, url]


def kill_mover_at(argv: list[str], stop: dict[str, Any], on_hold: Callable[[], None] | None = None) -> None:
    """Run the CLI mover in a subprocess until it reaches ``stop`` (frozen there), then SIGKILL it
    (``on_hold``: run at ``stop["hold"]``, the mover waiting)."""
    mover = start_mover(argv, stop)
    assert mover.stdout is not None and mover.stdin is not None
    try:
        lines = []
        while True:
            line = mover.stdout.readline()
            if line.strip() == "held":
                if on_hold is not None:
                    on_hold()
                mover.stdin.write("go\n")
                mover.stdin.flush()
                continue
            if not line or line.strip() == "stopped":
                break
            lines.append(line)
        assert line.strip() == "stopped", f"the mover did not reach {stop!r}:\n" + "".join(lines)
    finally:
        os.kill(mover.pid, signal.SIGKILL)
        mover.wait(timeout=60)


def install_stop(stop: dict[str, Any]) -> None:
    """Freeze at the stop point: hooked on psycopg's cursors, so statements the mover sends on the
    raw driver connection (pipelines, COPY) count and freeze like the ones SQLAlchemy sends."""
    seen = [0]
    frozen = threading.Event()
    lock = threading.Lock()
    hold = stop.get("hold")
    held = [0]

    def hook(cursor: Any, statement: Any) -> None:
        if frozen.is_set():
            time.sleep(3600)
        sql = statement if isinstance(statement, str) else str(statement)
        if hold is not None and hold["sql"] in sql:
            with lock:
                held[0] += 1
                if held[0] == hold.get("nth", 1):
                    print("held", flush=True)
                    sys.stdin.readline()
        if stop["sql"] not in sql or ("port" in stop and int(cursor.connection.info.port) != stop["port"]):
            return
        with lock:
            seen[0] += 1
            if seen[0] != stop.get("nth", 1):
                return
            if "delay" in stop:
                threading.Timer(stop["delay"], stopped).start()
                return
            frozen.set()
        print("stopped", flush=True)
        time.sleep(3600)

    def stopped() -> None:
        frozen.set()
        print("stopped", flush=True)

    for name in ("execute", "executemany", "copy"):
        original = getattr(psycopg.Cursor, name)

        def hooked(self: Any, query: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            hook(self, query)
            return _original(self, query, *args, **kwargs)

        setattr(psycopg.Cursor, name, hooked)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if spec.get("stop"):
        install_stop(spec["stop"])
    rebalance_command.main(spec["argv"], standalone_mode=False)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
