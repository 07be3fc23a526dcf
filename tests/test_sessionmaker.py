"""``manager.sessionmaker()``: its plain call builds the session ``ShardedSession.__init__`` would.

The plain call (no keywords, nothing configured past the manager and Session's own defaults) skips
the constructor's keyword matching (``ShardedSession._of_manager``); everything else takes the stock
``sessionmaker`` path. These tests hold the two paths to the same session, and check that anything
configured or passed per call still reaches the session.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from sa_shardkit import ShardedSession, ShardedSessionmaker, ShardManager
from sa_shardkit.demo.models import Customer
from tests.session_support import (  # noqa: F401 - fixtures
    schema_fixture,
    shards_holding,
)

# per-session values that differ between any two sessions, whichever way they were made
_OWN = {"hash_key", "identity_map", "_new", "_deleted"}


def _state(session: Session) -> dict[str, Any]:
    return {k: v for k, v in vars(session).items() if k not in _OWN}


def _offline_manager() -> ShardManager:
    # engines are created when first used, so nothing here connects
    url = "postgresql+psycopg://app:secret@127.0.0.1:1/app"
    return ShardManager.from_urls({f"shard-{i}": url for i in range(1, 5)})


@pytest.mark.parametrize("settings", [{}, {"autoflush": False}, {"expire_on_commit": False}])
def test_the_plain_call_builds_what_the_constructor_builds(settings: dict[str, Any]) -> None:
    manager = _offline_manager()
    maker = manager.sessionmaker(**settings)
    assert isinstance(maker, sessionmaker) and isinstance(maker, ShardedSessionmaker)
    fast = maker()
    stock = sessionmaker(class_=ShardedSession, manager=manager, **settings)()
    direct = ShardedSession(manager=manager, **settings)
    assert type(fast) is maker.class_ and issubclass(maker.class_, ShardedSession)
    assert _state(fast) == _state(stock) == _state(direct)
    assert list(vars(fast)) == list(vars(direct))  # the same attributes, set in the same order
    for name, value in settings.items():
        assert getattr(fast, name) is value
    for session in (fast, stock, direct):
        session.close()


def test_anything_configured_or_passed_per_call_reaches_the_session() -> None:
    manager = _offline_manager()
    maker = manager.sessionmaker(info={"app": "shop"})
    assert maker().info == {"app": "shop"}
    assert maker(info={"call": 1}).info == {"app": "shop", "call": 1}
    maker = manager.sessionmaker()
    assert maker(shard_id="shard-2").pinned_shard_id == "shard-2"
    assert maker(autoflush=False).autoflush is False
    maker.configure(replica_reads=False)
    assert maker().replica_reads is False
    maker = manager.sessionmaker()
    maker.kw["scatter"] = "forbid"  # set past configure(): still seen
    assert maker().scatter == "forbid"


def test_plain_sessions_route_and_fire_the_makers_listeners(schema: ShardManager) -> None:
    maker = schema.sessionmaker()
    flushed: list[Session] = []
    event.listen(maker, "before_flush", lambda session, *_: flushed.append(session))
    with maker() as session, session.begin():
        session.add(Customer(customer_id=77, name="seventy-seven"))
    assert flushed == [session]
    assert shards_holding(schema, "SELECT 1 FROM customers WHERE customer_id = 77") == {schema.shard_for(77)}
    with maker() as session:
        assert session.scalars(select(Customer.name).where(Customer.customer_id == 77)).all() == [
            "seventy-seven"
        ]
