"""A writer process for the lookup crash and race tests: ``python -m tests.lookup_writer URLS SCENARIO POINT ARGS``.

POINT is where it SIGKILLs itself: ``mid_flush`` (as the owning row's statement is sent, new
rows' entries being written beside the flush), ``after_entries`` (entries committed, owning rows not),
``before_removals`` (owning transaction committed, old entries not yet removed), ``before_unlock``
(everything done but the value locks), or ``none``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from sa_shardkit import DuplicateKeyError, ShardedSession, ShardManager
from tests.lookup_models import LkCustomer, LkOrder


def _die(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_on_owner_write(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
    if statement.startswith(("INSERT INTO lk_", "UPDATE lk_", "DELETE FROM lk_")):
        _die()


def arm(point: str) -> None:
    if point == "mid_flush":  # the owning row's statement is about to run; a new row's entry may be in flight
        event.listen(Engine, "before_cursor_execute", _die_on_owner_write)
    elif point == "after_entries":
        event.listen(ShardedSession, "after_flush", _die)  # after the lookup hook's own after_flush
    elif point == "before_removals":
        event.listen(ShardedSession, "after_commit", _die, insert=True)
    elif point == "before_unlock":
        event.listen(ShardedSession, "after_commit", _die)
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


def main(urls: str, scenario: str, point: str, *args: str) -> None:
    with ShardManager.from_urls(urls.split(",")) as manager:
        maker = manager.sessionmaker()
        if scenario == "race":  # args: key, go-file, emails...
            key, go, emails = int(args[0]), args[1], args[2:]
            while not os.path.exists(go):
                time.sleep(0.005)
            for email in emails:
                with maker() as session:
                    session.add(LkCustomer(customer_id=key, email=email))
                    try:
                        session.commit()
                        print("ok", email, flush=True)
                    except DuplicateKeyError as error:
                        assert error.value == email
                        print("dup", email, flush=True)
                key += 1000
            return
        arm(point)
        with maker() as session:
            if scenario == "insert":  # args: order_id, customer_id
                session.add(LkOrder(order_id=int(args[0]), customer_id=int(args[1])))
            elif scenario == "delete":  # args: order_id
                session.delete(session.scalars(select(LkOrder).where(LkOrder.order_id == int(args[0]))).one())
            elif scenario == "change":  # args: order_id, new order_id
                order = session.scalars(select(LkOrder).where(LkOrder.order_id == int(args[0]))).one()
                order.order_id = int(args[1])
            elif scenario == "email":  # args: customer_id, email
                session.add(LkCustomer(customer_id=int(args[0]), email=args[1]))
            session.commit()


if __name__ == "__main__":
    main(*sys.argv[1:])
