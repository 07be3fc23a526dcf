"""A FastAPI service over a sharded fleet: one ``ShardedSession`` per request, routed by the shard key.

Endpoints:

* ``POST /customers`` and ``POST /customers/{customer_id}/orders``: writes, each one shard transaction;
* ``GET /customers/{customer_id}/orders/{order_id}`` and ``GET /customers/{customer_id}/orders``:
  keyed reads, one shard;
* ``POST /transfers``: a cross-shard credit transfer (a saga, idempotent by ``transfer_id``);
* ``POST /admin/rebalance`` starts adding a shard online, ``GET /admin/rebalance`` shows the progress
  (this process's move, and the ring state every shard stores, whoever runs the mover).

Errors map to HTTP: a missing row is 404, a shard that is down 503 naming the shard, a refused
cross-shard write 409, a saga still pending 202 (retry with the same ``transfer_id``).

    pip install fastapi uvicorn
    SHARD_1_URL=postgresql+psycopg://app@db1/app SHARD_2_URL=... python examples/fastapi_orders.py
    python examples/fastapi_orders.py      # no SHARD_<N>_URL: four throwaway local servers
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import inspect, select
from sqlalchemy.orm import selectinload

from sa_shardkit import (
    CrossShardTransactionError,
    SagaPendingError,
    ShardConfig,
    ShardedSession,
    ShardManager,
    ShardUnavailableError,
)
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem
from sa_shardkit.rebalance import MoveOptions, RebalanceProgress, add_shard, read_fleet_state
from sa_shardkit.saga import create_saga_tables, transfer

# --- request and response bodies ------------------------------------------------------------


class CustomerIn(BaseModel):
    customer_id: int
    name: str
    balance: Decimal = Decimal(0)


class ItemIn(BaseModel):
    sku: str
    quantity: int = Field(gt=0)
    unit_price: Decimal = Field(ge=0)


class OrderIn(BaseModel):
    items: list[ItemIn] = Field(min_length=1)


class ItemOut(BaseModel):
    item_no: int
    sku: str
    quantity: int
    unit_price: Decimal


class OrderOut(BaseModel):
    customer_id: int
    order_id: uuid.UUID
    status: str
    total: Decimal
    shard: str
    items: list[ItemOut]


class TransferIn(BaseModel):
    transfer_id: str = Field(min_length=1, max_length=80)
    from_customer: int
    to_customer: int
    amount: Decimal = Field(gt=0)


class RebalanceIn(BaseModel):
    shard_id: str
    url: str
    batch_size: int = 500


# --- the request-scoped session -------------------------------------------------------------


def get_session(request: Request) -> Iterator[ShardedSession]:
    """One ShardedSession per request, closed afterwards (its connections go back to each shard's pool)."""
    with request.app.state.Session() as session:
        yield session


SessionDep = Annotated[ShardedSession, Depends(get_session)]


def get_manager(request: Request) -> ShardManager:
    manager: ShardManager = request.app.state.manager
    return manager


ManagerDep = Annotated[ShardManager, Depends(get_manager)]


# --- rebalance progress, as this process sees it --------------------------------------------


class RebalanceMonitor:
    """The move this process started (one at a time), updated from the mover's progress callback."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.progress: RebalanceProgress | None = None
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.shard_id: str | None = None

    def start(self, manager: ShardManager, body: RebalanceIn) -> None:
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                raise HTTPException(409, f"a move is already running (adding {self.shard_id})")
            self.shard_id, self.progress, self.result, self.error = body.shard_id, None, None, None
            config = ShardConfig(id=body.shard_id, url=body.url)
            self.thread = threading.Thread(
                target=self._run, args=(manager, config, body.batch_size), daemon=True
            )
            self.thread.start()

    def _run(self, manager: ShardManager, config: ShardConfig, batch_size: int) -> None:
        def on_progress(p: RebalanceProgress) -> None:
            self.progress = p

        try:
            result = add_shard(
                manager, config, Base, options=MoveOptions(batch_size=batch_size), progress=on_progress
            )
            self.result = {
                "version": result.version,
                "rows_moved": result.rows_moved,
                "seconds": result.seconds,
            }
        except Exception as error:  # noqa: BLE001 - shown by GET /admin/rebalance
            self.error = f"{type(error).__name__}: {error}"

    def describe(self) -> dict[str, Any]:
        p = self.progress
        running = self.thread is not None and self.thread.is_alive()
        return {
            "adding": self.shard_id,
            "running": running,
            "phase": p.phase if p else ("starting" if running else None),
            "rows_moved": p.rows_moved if p else 0,
            "rows_expected": p.rows_expected if p else None,
            "rows_per_second": round(p.rows_per_second, 1) if p else 0.0,
            "eta_seconds": p.eta_seconds if p else None,
            "result": self.result,
            "error": self.error,
        }


# --- the application ------------------------------------------------------------------------


def create_app(manager: ShardManager) -> FastAPI:
    """The service over ``manager``'s shards (the schema must exist: ``alembic upgrade head``)."""
    app = FastAPI(title="sharded orders")
    app.state.manager = manager
    app.state.Session = manager.sessionmaker()
    app.state.monitor = RebalanceMonitor()

    @app.exception_handler(ShardUnavailableError)
    def shard_down(_request: Request, error: ShardUnavailableError) -> JSONResponse:
        return JSONResponse({"detail": str(error), "shard": error.shard_id}, status_code=503)

    @app.exception_handler(CrossShardTransactionError)
    def cross_shard(_request: Request, error: CrossShardTransactionError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.post("/customers", status_code=201)
    def create_customer(body: CustomerIn, session: SessionDep, manager: ManagerDep) -> dict[str, Any]:
        with session.begin():
            session.add(Customer(customer_id=body.customer_id, name=body.name, balance=body.balance))
        return {"customer_id": body.customer_id, "shard": manager.shard_for(body.customer_id)}

    @app.post("/customers/{customer_id}/orders", status_code=201)
    def create_order(customer_id: int, body: OrderIn, session: SessionDep) -> OrderOut:
        with session.begin():  # the order and its items: one transaction on the customer's shard
            if session.get(Customer, customer_id) is None:
                raise HTTPException(404, f"customer {customer_id} not found")
            order = Order(customer_id=customer_id, status="pending")
            order.items = [
                OrderItem(item_no=n, sku=i.sku, quantity=i.quantity, unit_price=i.unit_price)
                for n, i in enumerate(body.items, 1)
            ]
            order.total = sum((i.unit_price * i.quantity for i in body.items), Decimal(0))
            session.add(order)
        return order_out(session, order)

    @app.get("/customers/{customer_id}/orders/{order_id}")
    def get_order(customer_id: int, order_id: uuid.UUID, session: SessionDep) -> OrderOut:
        order = session.get(Order, (customer_id, order_id), options=[selectinload(Order.items)])
        if order is None:
            raise HTTPException(404, f"order {order_id} of customer {customer_id} not found")
        return order_out(session, order)

    @app.get("/customers/{customer_id}/orders")
    def customer_orders(customer_id: int, session: SessionDep) -> list[OrderOut]:
        query = (
            select(Order)
            .where(Order.customer_id == customer_id)  # the shard key: one shard answers
            .options(selectinload(Order.items))
            .order_by(Order.created_at, Order.order_id)
        )
        return [order_out(session, o) for o in session.scalars(query)]

    @app.post("/transfers")
    def create_transfer(body: TransferIn, manager: ManagerDep) -> JSONResponse:
        try:
            outcome = transfer(
                manager, body.from_customer, body.to_customer, body.amount, transfer_id=body.transfer_id
            )
        except SagaPendingError as pending:
            return JSONResponse({"transfer_id": body.transfer_id, "status": pending.status}, status_code=202)
        code = 200 if outcome.status == "complete" else 422
        return JSONResponse({"transfer_id": body.transfer_id, "status": outcome.status}, status_code=code)

    @app.post("/admin/rebalance", status_code=202)
    def start_rebalance(body: RebalanceIn, request: Request, manager: ManagerDep) -> dict[str, Any]:
        monitor: RebalanceMonitor = request.app.state.monitor
        monitor.start(manager, body)
        return monitor.describe()

    @app.get("/admin/rebalance")
    def rebalance_progress(request: Request, manager: ManagerDep) -> dict[str, Any]:
        monitor: RebalanceMonitor = request.app.state.monitor
        shards = {
            shard_id: {
                "version": row.state.version,
                "ring": list(row.state.ring.shard_ids),
                "moving_to": list(row.state.target.shard_ids) if row.state.target else None,
                "watermark": row.watermark,
                "drained": row.drained,
            }
            for shard_id, row in read_fleet_state(manager).items()
        }
        return {"this_process": monitor.describe(), "stored_ring": shards}

    return app


def order_out(session: ShardedSession, order: Order) -> OrderOut:
    """The order as JSON, with the shard it was read from (its identity token)."""
    shard = str(inspect(order).identity_token)
    return OrderOut(
        customer_id=order.customer_id,
        order_id=order.order_id,
        status=order.status,
        total=order.total,
        shard=shard,
        items=[
            ItemOut(item_no=i.item_no, sku=i.sku, quantity=i.quantity, unit_price=i.unit_price)
            for i in order.items
        ],
    )


def create_schema(manager: ShardManager) -> None:
    """For the example only; a real deployment runs ``alembic upgrade head``."""
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    create_saga_tables(manager)


def main() -> None:  # pragma: no cover - serves until stopped
    import uvicorn

    from sa_shardkit.testing import manager_from_env_or_local_fleet

    with manager_from_env_or_local_fleet() as manager:
        create_schema(manager)
        uvicorn.run(create_app(manager), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
