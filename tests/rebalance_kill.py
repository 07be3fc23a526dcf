"""``python -m tests.rebalance_kill '{"argv": [...], "stop": {...}}'``: the real CLI mover, stopped
at one exact point so the test can SIGKILL it there.

``argv`` are ``shardkit rebalance`` arguments. ``stop`` names the point: the ``nth`` statement whose
SQL contains ``sql`` (on the shard whose URL port is ``port``, if given). When that statement is
about to run, this process prints ``stopped`` and freezes every thread at its next statement, so
nothing after that point reaches any server before the kill.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import psycopg

from sa_shardkit.cli.rebalance import rebalance_command


def install_stop(stop: dict[str, Any]) -> None:
    """Freeze at the stop point: hooked on psycopg's cursors, so statements the mover sends on the
    raw driver connection (pipelines, COPY) count and freeze like the ones SQLAlchemy sends."""
    seen = [0]
    frozen = threading.Event()
    lock = threading.Lock()

    def hook(cursor: Any, statement: Any) -> None:
        if frozen.is_set():
            time.sleep(3600)
        sql = statement if isinstance(statement, str) else str(statement)
        if stop["sql"] not in sql or ("port" in stop and int(cursor.connection.info.port) != stop["port"]):
            return
        with lock:
            seen[0] += 1
            if seen[0] != stop.get("nth", 1):
                return
            frozen.set()
        print("stopped", flush=True)
        time.sleep(3600)

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
