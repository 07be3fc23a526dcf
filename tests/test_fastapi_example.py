"""examples/fastapi_orders.py: a FastAPI service with a request-scoped ShardedSession, on the test fleet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
from sqlalchemy import text

from sa_shardkit import ShardManager
from tests.fleet import TestFleet

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from examples.fastapi_orders import create_app, create_schema  # noqa: E402


@pytest.fixture
def client(manager: ShardManager) -> Iterator[TestClient]:
    create_schema(manager)
    with TestClient(create_app(manager)) as c:
        yield c


def two_customers_on_different_shards(manager: ShardManager) -> tuple[int, int]:
    a = 1
    b = next(c for c in range(2, 1000) if manager.shard_for(c) != manager.shard_for(a))
    return a, b


def add_customers(client: TestClient, *ids: int, balance: str = "100") -> None:
    for c in ids:
        response = client.post("/customers", json={"customer_id": c, "name": f"c{c}", "balance": balance})
        assert response.status_code == 201, response.text


def rows_on(manager: ShardManager, shard_id: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    with manager.connect(shard_id) as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def test_an_order_is_written_on_its_customers_shard_and_read_back(
    client: TestClient, manager: ShardManager
) -> None:
    a, b = two_customers_on_different_shards(manager)
    add_customers(client, a, b)
    items = [
        {"sku": "A", "quantity": 2, "unit_price": "5.00"},
        {"sku": "B", "quantity": 1, "unit_price": "7.50"},
    ]
    created = client.post(f"/customers/{a}/orders", json={"items": items})
    assert created.status_code == 201, created.text
    order = created.json()
    assert order["shard"] == manager.shard_for(a) and Decimal(order["total"]) == Decimal("17.50")

    for shard_id in manager.shard_ids:  # physically: on a's shard only, with both items
        found = rows_on(
            manager, shard_id, "SELECT count(*) FROM order_items WHERE order_id = :o", o=order["order_id"]
        )
        assert found == [(2 if shard_id == manager.shard_for(a) else 0,)]

    got = client.get(f"/customers/{a}/orders/{order['order_id']}")
    assert got.status_code == 200 and got.json() == order
    client.post(f"/customers/{a}/orders", json={"items": items[:1]})
    listed = client.get(f"/customers/{a}/orders").json()
    assert [o["order_id"] for o in listed][0] == order["order_id"] and len(listed) == 2
    assert client.get(f"/customers/{b}/orders").json() == []
    assert client.get(f"/customers/{b}/orders/{order['order_id']}").status_code == 404
    assert client.post("/customers/999999/orders", json={"items": items}).status_code == 404

    # request-scoped sessions: every connection is back in its shard's pool after the requests
    assert all(manager.engine(s).pool.checkedout() == 0 for s in manager.shard_ids)  # type: ignore[attr-defined]


def test_transfer_across_shards_is_applied_once_per_transfer_id(
    client: TestClient, manager: ShardManager
) -> None:
    a, b = two_customers_on_different_shards(manager)
    add_customers(client, a, b)
    body = {"transfer_id": "t-1", "from_customer": a, "to_customer": b, "amount": "30.00"}
    first = client.post("/transfers", json=body)
    again = client.post("/transfers", json=body)
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == again.json()["status"] == "complete"
    refused = client.post("/transfers", json={**body, "transfer_id": "t-2", "amount": "1000"})
    assert refused.status_code == 422 and refused.json()["status"] == "failed_insufficient_funds"
    balance = "SELECT balance FROM customers WHERE customer_id = :c"
    assert rows_on(manager, manager.shard_for(a), balance, c=a) == [(Decimal("70.00"),)]
    assert rows_on(manager, manager.shard_for(b), balance, c=b) == [(Decimal("130.00"),)]


def test_a_shard_that_is_down_is_a_503_naming_it(
    client: TestClient, manager: ShardManager, pg_fleet: TestFleet
) -> None:
    a, b = two_customers_on_different_shards(manager)
    add_customers(client, a, b)
    down = manager.shard_for(b)
    pg_fleet.server(manager.shard_ids.index(down)).stop()
    response = client.get(f"/customers/{b}/orders")
    assert response.status_code == 503 and response.json()["shard"] == down
    assert client.get(f"/customers/{a}/orders").status_code == 200  # the other shards keep serving


def test_admin_endpoint_shows_an_online_shard_add_to_the_end(
    client: TestClient, manager: ShardManager, shard5_url: str
) -> None:
    customers = list(range(1, 121))
    add_customers(client, *customers)
    for c in customers:
        client.post(
            f"/customers/{c}/orders", json={"items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}
        )
    started = client.post(
        "/admin/rebalance", json={"shard_id": "shard-5", "url": shard5_url, "batch_size": 10}
    )
    assert started.status_code == 202, started.text
    assert client.post("/admin/rebalance", json={"shard_id": "shard-5", "url": shard5_url}).status_code in (
        202,
        409,
    )
    phases = set()
    deadline = time.monotonic() + 120
    while True:
        progress = client.get("/admin/rebalance").json()
        phases.add(progress["this_process"]["phase"])
        if not progress["this_process"]["running"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    mine = progress["this_process"]
    assert mine["error"] is None and mine["result"]["rows_moved"] > 0, mine
    assert mine["phase"] == "done"
    stored = progress["stored_ring"]
    assert set(stored) == {"shard-1", "shard-2", "shard-3", "shard-4", "shard-5"}
    assert all(s["ring"] == ["shard-1", "shard-2", "shard-3", "shard-4", "shard-5"] for s in stored.values())
    assert all(s["moving_to"] is None for s in stored.values())

    moved = [c for c in customers if manager.shard_for(c) == "shard-5"]
    assert moved
    for c in moved:  # served from the new shard after the move, with every order
        orders = client.get(f"/customers/{c}/orders").json()
        assert len(orders) == 1 and orders[0]["shard"] == "shard-5"
