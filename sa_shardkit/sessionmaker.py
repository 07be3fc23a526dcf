"""``manager.sessionmaker()``: SQLAlchemy's ``sessionmaker``, with its common call made cheap.

A ``sessionmaker`` call merges its stored keywords into the call's, and the session's constructor
then matches every keyword against its parameters and checks the routing arguments one by one.
For the call almost every application makes per unit of work, ``Session()`` with nothing but the
manager and ``Session``'s own defaults configured, that is a fixed answer: this class builds that
session directly (:meth:`ShardedSession._of_manager`). Any other call, or any other configuration
(``configure()``, ``info=``, a bind, ``replica_reads=False`` ...), takes the stock path unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import sessionmaker

from .session import ShardedSession

if TYPE_CHECKING:
    from .manager import ShardManager

_PLAIN_KEYWORDS = frozenset({"bind", "autoflush", "expire_on_commit", "manager"})
"""What a ``sessionmaker(class_=ShardedSession, manager=m)`` stores in ``kw``, and nothing more."""


class ShardedSessionmaker(sessionmaker[ShardedSession]):
    """A ``sessionmaker`` of :class:`~sa_shardkit.ShardedSession` routed by one manager."""

    def __call__(self, **local_kw: Any) -> ShardedSession:
        kw = self.kw
        if not local_kw and kw.keys() == _PLAIN_KEYWORDS and kw["bind"] is None:
            session: ShardedSession = self.class_._of_manager(
                kw["manager"], kw["autoflush"], kw["expire_on_commit"]
            )
            return session
        return super().__call__(**local_kw)


def sessionmaker_for(manager: ShardManager, **kw: Any) -> ShardedSessionmaker:
    """A sessionmaker of :class:`ShardedSession` routed by ``manager`` (``manager.sessionmaker()``)."""
    return ShardedSessionmaker(class_=ShardedSession, manager=manager, **kw)


__all__ = ["ShardedSessionmaker", "sessionmaker_for"]
