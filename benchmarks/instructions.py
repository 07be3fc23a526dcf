"""Client instructions per operation under callgrind: the load-independent form of the speed targets.

Run: python benchmarks/instructions.py [--n 60]      (needs valgrind; starts throwaway local servers)

On a shared 2-core machine wall-clock ratios move by +-0.05 between runs. The client's executed
instructions do not: each workload runs in a child process under ``valgrind --tool=callgrind``
with counting switched on (``callgrind_control -i on``) only around ``--n`` operations, after a
warm-up. The servers run outside valgrind, so what is counted is this process's own work: the
routing, SQLAlchemy, the driver and the hub, not the database's.

* ``session_overhead.py``'s operations (insert, get, select), a plain ``Session`` against a
  ``ShardedSession`` with 4 shards configured and every key on ``shard-1``, as that script runs them;
* ``scatter.py``'s ``ORDER BY created_at, event_id LIMIT 50`` on 4 shards of 25k rows each against the
  same statement on one shard (``set_shard_id``), on one held session.

Not counted: the stored-ring check a process makes every ``refresh_seconds`` (set to an hour here).
At full speed it comes once per ~15,000 operations; under callgrind's ~50x slowdown it would come
every few hundred and weigh 50x its share. The wall-clock scripts include it at its real rate.

A ratio here is plain / sharded (session) or scatter / one shard: the share of the client's work,
not of the wall time; the database's and the network's time come on top of both sides alike.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
UNCOUNTED_REFRESH = 3600
"""refresh_seconds (and the recheck cap) of the counted processes: no stored-ring check while counting."""
WORKLOADS = {
    "plain insert": ("session", "plain", "insert"),
    "sharded insert": ("session", "sharded", "insert"),
    "plain get": ("session", "plain", "get"),
    "sharded get": ("session", "sharded", "get"),
    "plain select": ("session", "plain", "select"),
    "sharded select": ("session", "sharded", "select"),
    "one shard": ("scatter", "one", ""),
    "scatter, 4 shards": ("scatter", "scatter", ""),
}


def counted(run: Callable[[], Any], n: int) -> None:
    """``n`` calls of ``run`` with callgrind's counting on (nothing else of the child is counted)."""
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, check=False)
    time.sleep(0.3)  # the command is picked up asynchronously
    for _ in range(n):
        run()
    subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, check=False)
    time.sleep(0.3)  # picked up asynchronously too: idle until then, not tearing down


def child_session(kind: str, phase: str, n: int) -> None:
    import session_overhead as workload
    from sqlalchemy import insert
    from sqlalchemy.orm import Session, sessionmaker

    from sa_shardkit import ShardManager
    from sa_shardkit.demo.models import Base, Customer
    from sa_shardkit.testing import PostgresFleet

    with PostgresFleet(1) as fleet:
        manager = ShardManager.from_urls(
            {f"shard-{i}": fleet.urls[0] for i in range(1, 5)}, refresh_seconds=UNCOUNTED_REFRESH
        )
        engine = manager.engine("shard-1")
        Base.metadata.create_all(engine)
        keys = [k for k in range(1, 100_000) if manager.shard_for(k) == "shard-1"][: n + 40]
        with engine.begin() as conn:
            conn.execute(insert(Customer), [{"customer_id": k, "name": f"c{k}"} for k in keys])
        factory: Callable[[], Session] = sessionmaker(engine) if kind == "plain" else manager.sessionmaker()
        operation = workload.OPERATIONS[phase]
        work = [(k, uuid.UUID(int=k)) for k in keys]  # the same ids every run
        if phase != "insert":  # the rows the reads find
            for key, order_id in work:
                workload.insert_one(factory, key, order_id)
        for key, order_id in work[:40]:
            operation(factory, key, order_id)
        measured = iter(work[40:])
        probes = manager.placement.probes
        counted(lambda: operation(factory, *next(measured)), n)
        assert manager.placement.probes == probes, "a stored-ring check ran while counting"
        manager.dispose()


def child_scatter(kind: str, n: int) -> None:
    import scatter as data
    from sqlalchemy import select
    from sqlalchemy.ext.horizontal_shard import set_shard_id

    from sa_shardkit import ShardManager
    from sa_shardkit.testing import PostgresFleet

    with PostgresFleet(4) as fleet:
        manager = ShardManager.from_urls(fleet.urls, refresh_seconds=UNCOUNTED_REFRESH)
        data.load(manager, 25_000)
        top = select(data.Event).order_by(data.Event.created_at, data.Event.event_id).limit(50)
        one = top.options(set_shard_id(manager.shard_ids[0]))
        session = manager.sessionmaker()()
        statement = one if kind == "one" else top
        for _ in range(10):
            session.scalars(statement).all()
        counted(lambda: session.scalars(statement).all(), n)
        session.close()
        manager.dispose()


def instructions(name: str, n: int, layout: int = 0) -> float:
    """Instructions per operation of workload ``name`` (a child process under callgrind).

    ``layout`` pads the child's environment by that many 64-byte blocks: it moves where the
    process's objects sit in memory, and with them the collisions of every dict and set keyed by
    object identity (classes, mappers, states). One layout's count differs from another's by up to
    +-1.5%, each repeatable exactly; :func:`main` averages several."""
    out = Path(f"/tmp/shardkit-callgrind.{os.getpid()}.out")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--child",
        name,
        "--n",
        str(n),
    ]
    # the stored-ring check every few seconds (refresh_seconds): one per ~15,000 operations at full
    # speed, but one per few hundred under callgrind's 50x slowdown; the wall-clock scripts count it
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "SHARDKIT_RING_RECHECK_SECONDS": str(UNCOUNTED_REFRESH),
        "SHARDKIT_LAYOUT_PAD": "x" * (64 * layout),
    }
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    out.unlink(missing_ok=True)
    match = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"{name}: valgrind failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return int(match.group(1)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="counted operations per workload")
    parser.add_argument("--layouts", type=int, default=3, help="memory layouts averaged per workload")
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(HERE))
        group, kind, phase = WORKLOADS[args.child]
        if group == "session":
            child_session(kind, phase, args.n)
        else:
            child_scatter(kind, args.n)
        return
    names = [n for n in WORKLOADS if not args.only or args.only in n]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for layout in range(args.layouts):  # every workload in one layout, then the next
        for name in names:
            samples[name].append(instructions(name, args.n, layout))
    counts = {name: sum(values) / len(values) for name, values in samples.items()}
    print(
        f"client instructions per operation (callgrind, {args.n} operations each after a warm-up,"
        f" mean of {args.layouts} memory layouts)"
    )
    if len(counts) < len(WORKLOADS):
        for name, count in counts.items():
            print(f"  {name:<24}{count / 1e6:8.3f} M")
    print(
        f"{'phase':<8}{'plain Session':>16}{'ShardedSession, 4 shards':>28}{'plain / sharded':>18}"
        f"{'per layout':>18}"
    )
    for phase in ("insert", "get", "select"):
        if f"plain {phase}" not in counts or f"sharded {phase}" not in counts:
            continue
        plain, sharded = counts[f"plain {phase}"], counts[f"sharded {phase}"]
        each = [p / s for p, s in zip(samples[f"plain {phase}"], samples[f"sharded {phase}"], strict=True)]
        print(
            f"{phase:<8}{plain / 1e6:>14.3f} M{sharded / 1e6:>26.3f} M{plain / sharded:>17.3f}x"
            f"{min(each):>11.3f}-{max(each):.3f}"
        )
    if "one shard" not in counts or "scatter, 4 shards" not in counts:
        return
    one, scatter = counts["one shard"], counts["scatter, 4 shards"]
    print("\nORDER BY created_at, event_id LIMIT 50 over 100k rows, 4 shards")
    print(f"  one shard (set_shard_id):   {one / 1e6:7.3f} M")
    print(f"  scatter, 4 shards:          {scatter / 1e6:7.3f} M   {scatter / one:5.2f}x one shard")


if __name__ == "__main__":
    main()
