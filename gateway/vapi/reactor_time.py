"""A typed view of an injected ``IReactorTime`` clock, and integer-nanosecond time.

Without the mypy-zope plugin, mypy reads zope interface methods as if their
first parameter were ``self``, so calling ``IReactorTime.callLater`` fails type
checking. The Vapi shells accept ``IReactorTime`` (what callers hold: the
reactor, or ``task.Clock`` in tests) and use it through :class:`ReactorTime`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, cast

from twisted.internet.interfaces import IReactorTime

__all__ = ["DelayedCall", "ReactorTime", "now_ns", "reactor_time"]

NS_PER_SECOND: Final = 1_000_000_000


class DelayedCall(Protocol):
    """What a pending ``callLater`` offers."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class ReactorTime(Protocol):
    """The ``IReactorTime`` methods the Vapi shells call."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall: ...


def reactor_time(clock: IReactorTime) -> ReactorTime:
    """``clock`` seen through :class:`ReactorTime`."""
    return cast(ReactorTime, clock)


def now_ns(clock: ReactorTime) -> int:
    """The clock's time in integer nanoseconds (what the sans-io cores take)."""
    return round(clock.seconds() * NS_PER_SECOND)
