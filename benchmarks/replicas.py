"""What replica routing and query metrics cost per session read, same process, same servers.

One local PostgreSQL primary and its streaming replica (``pg_basebackup -R``); each round runs
``session.get(Customer, key)`` in a fresh session (one request) for N keys:

* primary: ``ShardedSession(replica_reads=False)``, the baseline;
* replica: the default session, reads routed to the replica (lag check at most once a second);
* replica + metrics: the same with a ``QueryMetrics`` listener on the manager.

Run: python benchmarks/replicas.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sa_shardkit import QueryMetrics, ShardConfig, ShardedSession, ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.testing import PostgresFleet, wait_until_accepting

N = 1000
ROUNDS = 7


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    with PostgresFleet(1) as fleet:
        replica = fleet.servers[0].make_replica("bench-replica")
        try:
            wait_until_accepting(replica.url)
            config = ShardConfig(id="shard-1", url=fleet.urls[0], replica_url=replica.url)
            with ShardManager([config]) as manager:
                Base.metadata.create_all(manager.engine("shard-1"))
                with ShardedSession(manager=manager) as session, session.begin():
                    session.add_all(Customer(customer_id=i, name=f"c{i}") for i in range(N))
                time.sleep(1)  # let the replica replay the rows

                def reads(replica_reads: bool) -> Callable[[], None]:
                    def run() -> None:
                        for key in range(N):
                            with ShardedSession(manager=manager, replica_reads=replica_reads) as session:
                                assert session.get(Customer, key) is not None

                    return run

                metrics = QueryMetrics()
                best = {"primary": float("inf"), "replica": float("inf"), "metrics": float("inf")}
                for _ in range(ROUNDS):  # interleaved, so a busy machine slows every variant alike
                    best["primary"] = min(best["primary"], timed(reads(False)))
                    best["replica"] = min(best["replica"], timed(reads(True)))
                    manager.events.add(metrics)
                    best["metrics"] = min(best["metrics"], timed(reads(True)))
                    manager.events.remove(metrics)
                assert manager.replicas.status("shard-1").usable
                counted = metrics.snapshot()[("shard-1", "replica")].count
                primary, routed, measured = (N / best[k] for k in ("primary", "replica", "metrics"))
        finally:
            replica.stop("immediate")
    print(f"session.get, primary (replica_reads=False): {primary:10,.0f} reads/s")
    print(f"session.get, routed to the replica:         {routed:10,.0f} reads/s")
    print(f"session.get, replica + QueryMetrics:        {measured:10,.0f} reads/s  ({counted:,} events)")
    print(f"ratio replica routing / primary:            {routed / primary:10.2f}x")
    print(f"ratio with metrics / without:               {measured / routed:10.2f}x")


if __name__ == "__main__":
    main()
