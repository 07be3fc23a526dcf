"""``python -m tests.saga_rebalance_worker URLS_JSON WORKER STOP_FILE CUSTOMERS``: transfers in a loop.

Prints ``start <id> <from> <to> <amount>`` before each transfer and ``done <id> <status>`` after it
(``pending``/``notstarted`` when it raised so); every 5th round it also re-submits an id that
completed earlier with another payload (another sender, another amount) and prints ``conflict <id> <unix time>``
when that raised :class:`SagaConflictError` (as it must), ``BAD <id> ...`` otherwise. Runs until
``STOP_FILE`` exists.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from sa_shardkit import ShardManager
from sa_shardkit.errors import SagaConflictError, SagaNotStartedError, SagaPendingError
from sa_shardkit.placement import unstored_recheck_seconds
from sa_shardkit.saga import transfer


def main(argv: list[str]) -> None:
    urls, worker, stop, customers = json.loads(argv[0]), int(argv[1]), argv[2], int(argv[3])
    rnd = random.Random(worker)
    completed: list[tuple[str, int, int, int]] = []
    with ShardManager.from_urls(urls) as manager:
        # at most every second, never past the recheck horizon (a longer interval is capped, with a warning)
        manager.placement.refresh_seconds = min(1.0, unstored_recheck_seconds())
        n = 0
        while not os.path.exists(stop):
            n += 1
            if n % 5 == 0 and completed:
                saga_id, sender, receiver, amount = rnd.choice(completed)
                other = rnd.choice([c for c in range(1, customers + 1) if c not in (sender, receiver)])
                try:
                    transfer(manager, other, receiver, amount + 1, transfer_id=saga_id)
                    print(f"BAD {saga_id} reuse with another payload was accepted", flush=True)
                except SagaConflictError:
                    print(f"conflict {saga_id} {time.time():.3f}", flush=True)
                except Exception as error:  # noqa: BLE001 - reported to the test
                    print(f"BAD {saga_id} {type(error).__name__}: {error}", flush=True)
                continue
            saga_id = f"w{worker}-{n}"
            sender, receiver = rnd.sample(range(1, customers + 1), 2)
            amount = rnd.randint(1, 5)
            print(f"start {saga_id} {sender} {receiver} {amount}", flush=True)
            try:
                outcome = transfer(manager, sender, receiver, amount, transfer_id=saga_id)
            except SagaPendingError:
                print(f"done {saga_id} pending", flush=True)
                continue
            except SagaNotStartedError:
                print(f"done {saga_id} notstarted", flush=True)
                continue
            print(f"done {saga_id} {outcome.status}", flush=True)
            if outcome.status == "complete":
                completed.append((saga_id, sender, receiver, amount))


if __name__ == "__main__":
    main(sys.argv[1:])
