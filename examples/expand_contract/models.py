"""The customers model as deployed between the expand and the contract step (step 2 of the workflow).

The code maps ``full_name`` and no longer maps ``name``: only now may the contract step drop
``name``. ``shardkit migrations lint --models examples.expand_contract.models:Base`` checks the pair
against this model; against ``sa_shardkit.demo.models`` (which still maps ``name``) the contract step
is refused.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from sqlalchemy import BigInteger, DateTime, Numeric, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __shard_key__ = "customer_id"

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    full_name: Mapped[str | None] = mapped_column(Text)
    balance: Mapped[Decimal] = mapped_column(Numeric(14, 2), default=Decimal("0"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
