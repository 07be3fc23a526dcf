"""Routing overhead: ShardedSession (routed by the ring) vs a plain Session on the same database.

The same workload runs through each in one process: insert N orders (one transaction each), get
each by primary key, select each customer's orders by shard key. Each sharded session has
``--shards`` shards configured (default: one with 4 and one with 64, to show the cost per keyed
statement does not grow with the fleet); every key used routes to ``shard-1``, whose engine is
the plain Session's bind, so the only difference is the routing work.

The sessions take turns in small chunks (who goes first rotates), each on its own customers, and
the time of every chunk is summed per session: all see the same machine load, which matters on a
shared machine where a best-of-N of whole passes is mostly noise. The process's CPU time per chunk
is summed too (``time.process_time``): on a loaded machine the wall clock mostly measures waiting
for a core, the CPU ratio what each session costs the client.

It also prints the median over turns of each turn's own ratio (the two sessions of a turn ran back
to back): a burst of machine noise moves one turn, not the median, while it moves the sums.

``--baseline stock`` gives the plain Session an engine of its own, ``create_engine(url,
pool_pre_ping=True)`` (what an application has without this library), instead of the manager's
shard-1 engine: the ratio then includes the engine's fault guard (watchdog, named errors) too.

Run: python benchmarks/session_overhead.py [--n 1000] [--rounds 3] [--chunk 25] [--shards 4,64]
[--baseline manager|stock]
(uses SHARD_1_URL when set, else starts one throwaway local PostgreSQL server)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal

from sqlalchemy import create_engine, event, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.replicas import INTERNAL

PHASES = ("insert", "get", "select")
PLAIN = "plain Session"


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if os.environ.get("SHARD_1_URL"):
        yield os.environ["SHARD_1_URL"]
        return
    from sa_shardkit.testing import PostgresFleet

    with PostgresFleet(1) as fleet:
        yield fleet.urls[0]


def insert_one(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session, session.begin():
        session.add(Order(customer_id=key, order_id=order_id, status="pending", total=Decimal(5)))


def get_one(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session:
        assert session.get(Order, (key, order_id)) is not None


def select_one(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session:
        assert len(session.scalars(select(Order).where(Order.customer_id == key)).all()) == 1


OPERATIONS = {"insert": insert_one, "get": get_one, "select": select_one}


def run_round(
    factories: dict[str, Callable[[], Session]],
    work: dict[str, list[tuple[int, uuid.UUID]]],
    chunk: int,
    totals: dict[str, dict[str, float]] | None,
    cpu: dict[str, dict[str, float]] | None = None,
    chunks: dict[str, list[dict[str, float]]] | None = None,
) -> None:
    """One pass of every phase, the sessions alternating chunk by chunk (``chunks``: each turn's
    seconds per session, for the paired ratios)."""
    n = len(next(iter(work.values())))
    kinds = list(factories)
    for phase in PHASES:
        operation = OPERATIONS[phase]
        for number, start in enumerate(range(0, n, chunk)):
            turn = number % len(kinds)
            pair: dict[str, float] = {}
            for kind in kinds[turn:] + kinds[:turn]:
                factory = factories[kind]
                started, started_cpu = time.perf_counter(), time.process_time()
                for key, order_id in work[kind][start : start + chunk]:
                    operation(factory, key, order_id)
                pair[kind] = time.perf_counter() - started
                if totals is not None:
                    totals[kind][phase] += pair[kind]
                if cpu is not None:
                    cpu[kind][phase] += time.process_time() - started_cpu
            if chunks is not None:
                chunks[phase].append(pair)


def sharded_name(shards: int) -> str:
    return f"ShardedSession, {shards} shards"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="orders per session kind and round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    parser.add_argument("--chunk", type=int, default=25, help="operations per turn")
    parser.add_argument(
        "--shards", default="4,64", help="configured shard counts to compare, comma-separated (default 4,64)"
    )
    parser.add_argument(
        "--baseline",
        choices=("manager", "stock"),
        default="manager",
        help="the plain Session's engine: the manager's shard-1 engine (default) or create_engine(url)",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",") if c.strip()]
    with database_url() as url, contextlib.ExitStack() as stack:
        # every configured shard points at the one database; all keys used route to shard-1
        managers = {
            count: stack.enter_context(
                ShardManager.from_urls({f"shard-{i}": url for i in range(1, count + 1)})
            )
            for count in counts
        }
        engine = managers[counts[0]].engine("shard-1")
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        kinds = [PLAIN, *(sharded_name(c) for c in counts)]
        keys = [
            k for k in range(1, 400 * args.n) if all(m.shard_for(k) == "shard-1" for m in managers.values())
        ][: len(kinds) * args.n]
        with engine.begin() as conn:
            conn.execute(insert(Customer), [{"customer_id": k, "name": f"c{k}"} for k in keys])
        checks = count_ring_checks(managers)
        plain_engine = engine
        if args.baseline == "stock":
            plain_engine = create_engine(url, pool_pre_ping=True)
            stack.callback(plain_engine.dispose)
        factories: dict[str, Callable[[], Session]] = {PLAIN: sessionmaker(plain_engine)}
        for count, manager in managers.items():
            factories[sharded_name(count)] = manager.sessionmaker()
        totals: dict[str, dict[str, float]] = {kind: dict.fromkeys(PHASES, 0.0) for kind in kinds}
        cpu: dict[str, dict[str, float]] = {kind: dict.fromkeys(PHASES, 0.0) for kind in kinds}
        chunks: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
        for round_no in range(args.rounds + 1):  # round 0 warms pools and caches
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE order_items, orders"))
            work = {kind: [(k, uuid.uuid4()) for k in keys[i :: len(kinds)]] for i, kind in enumerate(kinds)}
            measured = bool(round_no)
            run_round(
                factories,
                work,
                args.chunk,
                totals if measured else None,
                cpu if measured else None,
                chunks if measured else None,
            )
        report(totals, args.n * args.rounds)
        paired(chunks)
        print("\nthe same, by the process's CPU time (ops per CPU second)")
        report(cpu, args.n * args.rounds)
        calls_per_operation(factories, keys[: args.chunk], engine)
        ring_checks(managers, checks)


def calls_per_operation(factories: dict[str, Callable[[], Session]], keys: list[int], engine: Engine) -> None:
    """Python function calls per operation (cProfile): a count, so machine load does not move it."""
    print("\nPython function calls per operation (deterministic; O(1) in N when equal across shard counts)")
    print(f"{'phase':<8}" + "".join(f"{kind:>28}" for kind in factories))
    work = [(k, uuid.uuid4()) for k in keys]
    counts: dict[str, dict[str, float]] = {kind: {} for kind in factories}
    for phase in PHASES:
        for kind, factory in factories.items():
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE order_items, orders"))
            for key, order_id in work:  # the rows the get/select phases read
                insert_one(factories[PLAIN], key, order_id)
            if phase == "insert":
                with engine.begin() as conn:
                    conn.execute(text("TRUNCATE order_items, orders"))
            profile = cProfile.Profile()
            profile.enable()
            for key, order_id in work:
                OPERATIONS[phase](factory, key, order_id)
            profile.disable()
            counts[kind][phase] = pstats.Stats(profile).total_calls / len(work)
        print(f"{phase:<8}" + "".join(f"{counts[kind][phase]:>28,.0f}" for kind in factories))


def count_ring_checks(managers: dict[int, ShardManager]) -> dict[int, Counter[str]]:
    """Statements each manager's routing sends to read the stored ring, per shard, from now on.

    One listener on every Engine (created ones and later ones alike): asking each manager for all
    its engines would create an engine per configured shard, and a process holding 64 engines is
    slower for it (a bigger heap to collect) though no statement does per-shard work.
    """
    seen: dict[int, Counter[str]] = {count: Counter() for count in managers}

    def count(conn: Connection, cursor: object, statement: str, *args: object) -> None:
        if conn.get_execution_options().get(INTERNAL):  # routing's own reads, not a write's fence
            for shards, manager in managers.items():
                for shard_id, engine in manager.created_engines().items():
                    if engine is conn.engine:
                        seen[shards][shard_id] += 1

    event.listen(Engine, "before_cursor_execute", count)
    return seen


def ring_checks(managers: dict[int, ShardManager], checks: dict[int, Counter[str]]) -> None:
    """The stored-ring checks each manager made in the background while the workload ran."""
    print("\nStored-ring checks during the run (every refresh_seconds; O(1) in N: one shard each)")
    for count, manager in managers.items():
        placement, seen = manager.placement, checks[count]
        print(
            f"{sharded_name(count):<28} checks {placement.probes:>4}  fleet reads {placement.fleet_reads:>3}"
            f"  ring-state statements {sum(seen.values()):>5} on {len(seen)} of {count} shards"
        )


def phase_seconds(times: dict[str, float], phase: str) -> float:
    return sum(times.values()) if phase == "all" else times[phase]


def paired(chunks: dict[str, list[dict[str, float]]]) -> None:
    """The median over turns of each turn's own ratio: the sessions of one turn ran back to back,
    so a burst of machine noise moves that turn's ratio, not the median (sums of times carry it)."""
    kinds = [kind for kind in next(iter(chunks.values()))[0] if kind != PLAIN]
    print(f"\nmedian of the {len(chunks[PHASES[0]])} turns' own ratios (ShardedSession / plain Session)")
    print(f"{'phase':<8}" + "".join(f"{kind:>28}" for kind in kinds))
    for phase in PHASES:
        line = f"{phase:<8}"
        for kind in kinds:
            line += f"{statistics.median(t[PLAIN] / t[kind] for t in chunks[phase]):>27.3f}x"
        print(line)


def report(totals: dict[str, dict[str, float]], ops: int) -> None:
    plain = totals[PLAIN]
    sharded = [kind for kind in totals if kind != PLAIN]
    print(f"ops/s over {ops} ops each; ratio = ShardedSession / plain Session")
    print(f"{'phase':<8}{PLAIN:>16}" + "".join(f"{kind:>28}{'ratio':>8}" for kind in sharded))
    ratios: dict[str, float] = {}
    for phase in (*PHASES, "all"):
        count = ops * (len(PHASES) if phase == "all" else 1)
        p = count / phase_seconds(plain, phase)
        line = f"{phase:<8}{p:>16,.0f}"
        for kind in sharded:
            s = count / phase_seconds(totals[kind], phase)
            line += f"{s:>28,.0f}{s / p:>7.2f}x"
            ratios[kind] = s / p
        print(line)
    if len(sharded) > 1:
        spread = max(ratios.values()) - min(ratios.values())
        print(f"all-phase ratio spread across shard counts: {spread:.3f} (O(1) in N when within 0.02)")


if __name__ == "__main__":
    main()
