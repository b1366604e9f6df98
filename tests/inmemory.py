"""In-memory Twisted plumbing for the tests: the result of a Deferred that has fired,
Autobahn's own timers on a ``Clock``, a connection between two protocols (iosim), and
every log event written while Autobahn logs at debug."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import txaio
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

TXAIO: Any = txaio  # txaio's type stubs omit config


def result_of(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (raises its failure)."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@contextmanager
def txaio_on(clock: Clock) -> Iterator[None]:
    """Run Autobahn's own timers (handshake, close) on ``clock``, then restore."""
    saved = TXAIO.config.loop
    TXAIO.config.loop = clock
    try:
        yield
    finally:
        TXAIO.config.loop = saved


def pipe(server: Any, client: Any, clock: Clock) -> iosim.IOPump:
    """Connect a server and a client protocol in memory; nothing moves until pumped."""
    pump: iosim.IOPump = iosim.connect(
        server, iosim.FakeTransport(server, isServer=True),
        client, iosim.FakeTransport(client, isServer=False),
        greet=False, clock=clock,
    )
    return pump


@contextmanager
def debug_log_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event while txaio's global level is debug (what an unpinned Autobahn
    logger writes then, e.g. an upgrade request's headers), then the old level back."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    saved = TXAIO.get_global_log_level()
    TXAIO.set_global_log_level("debug")
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)
        TXAIO.set_global_log_level(saved)
