"""The call registry: which calls this process holds, keyed by Twilio's CallSid.

A small interface (:class:`CallRegistry`) with the in-memory implementation that a
single process uses by default.  The registry holds *live calls*: anything with an
``end(cause)`` method returning a Deferred that fires once the call has finished
tearing down.  Admission (capacity), readiness, the admin API and the drain on
shutdown all read it; it never holds a call after that call has ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed


class LiveCall(Protocol):
    """What the registry needs of a call."""

    @property
    def call_sid(self) -> str: ...

    def end(self, cause: str) -> Deferred[None]:
        """End both legs for ``cause``; fire once teardown is complete. Idempotent."""


class CallRegistry(Protocol):
    """The registry interface the daemon depends on."""

    def add(self, call: LiveCall) -> None: ...

    def remove(self, call: LiveCall) -> None: ...

    def update(self, call: LiveCall) -> None:
        """Something the cluster records about ``call`` changed (stream, Vapi call)."""

    def get(self, call_sid: str) -> LiveCall | None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[LiveCall]: ...

    def when_empty(self) -> Deferred[None]: ...

    def end_all(self, cause: str) -> Deferred[None]: ...


class InMemoryCallRegistry:
    """The registry of one process: a dict, plus waiters for "no calls left"."""

    def __init__(self) -> None:
        self._calls: dict[str, LiveCall] = {}
        self._empty_waiters: list[Deferred[None]] = []

    def add(self, call: LiveCall) -> None:
        """Record ``call``; a call already held under the same CallSid is replaced."""
        self._calls[call.call_sid] = call

    def remove(self, call: LiveCall) -> None:
        """Forget ``call`` (only if it is still the one held under its CallSid)."""
        if self._calls.get(call.call_sid) is call:
            del self._calls[call.call_sid]
            if not self._calls:
                waiters, self._empty_waiters = self._empty_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

    def update(self, call: LiveCall) -> None:
        """Nothing to do: this registry holds the call object itself."""

    def get(self, call_sid: str) -> LiveCall | None:
        return self._calls.get(call_sid)

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[LiveCall]:
        return iter(list(self._calls.values()))

    def when_empty(self) -> Deferred[None]:
        """A Deferred that fires when no call is held (at once if none is)."""
        if not self._calls:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._forget_waiter)
        self._empty_waiters.append(waiter)
        return waiter

    def _forget_waiter(self, waiter: Deferred[None]) -> None:
        if waiter in self._empty_waiters:
            self._empty_waiters.remove(waiter)

    def end_all(self, cause: str) -> Deferred[None]:
        """End every held call for ``cause``; fire when all have finished."""
        ends = [call.end(cause) for call in list(self._calls.values())]
        done: Deferred[None] = DeferredList(ends, consumeErrors=True).addCallback(lambda _: None)
        return done
