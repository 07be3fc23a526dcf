"""``python -m tests.lookup_frozen_writer URLS ORDER_ID CUSTOMER_ID GO_FILE WARM``: one lookup write
whose entry's shard the test freezes (SIGSTOP) first.

With WARM = ``kept`` it first writes a warm-up order through the same lookup shard (so a kept lookup
connection to it exists; ``fresh``: none, the write must connect to the frozen server). It prints ``ready``, waits for GO_FILE (the test froze the server meanwhile), then flushes
``LkOrder(order_id=ORDER_ID, customer_id=CUSTOMER_ID)`` and prints one line: ``unavailable
<shard_id> <message>`` for a ShardUnavailableError, ``committed`` or ``error <type> <message>``.
Then it returns from main and the interpreter exits on its own: a worker thread stuck on the
frozen server would keep it from exiting, which the test sees.
"""

from __future__ import annotations

import os
import sys
import time

from sa_shardkit import ShardManager, ShardUnavailableError
from tests.lookup_models import LkOrder

QUERY_TIMEOUT = 3.0


def main(urls: str, order_id: str, customer_id: str, go: str, warm: str) -> None:
    with ShardManager.from_urls(urls.split(","), connect_timeout=2, query_timeout=QUERY_TIMEOUT) as manager:
        maker = manager.sessionmaker()
        if warm == "kept":
            with maker() as session:  # warm-up: the same lookup shard, another customer's shard
                session.add(LkOrder(order_id=int(order_id) + 1_000_000, customer_id=int(customer_id)))
                session.commit()
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
        try:
            with maker() as session:
                session.add(LkOrder(order_id=int(order_id), customer_id=int(customer_id)))
                session.commit()
            print("committed", flush=True)
        except ShardUnavailableError as error:
            print("unavailable", error.shard_id, str(error).replace("\n", " "), flush=True)
        except Exception as error:  # noqa: BLE001 - reported to the test
            print("error", type(error).__name__, str(error).replace("\n", " "), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
