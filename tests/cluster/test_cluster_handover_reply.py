"""A Vapi call handed over, whose answer never reaches the instance that asked for it.

Found by ``tests/e2e/test_cluster.py`` (two workers behind one port): the webhook's
instance gives up its session (``handed-over``, so it does not end the Vapi call) and
publishes ``HandedOver``; when that publish fails (Redis went, the commands connection
dropped), the asking instance times out (``owner-timeout``) and creates a Vapi call of its
own, and the handed-over Vapi call is never ended by anyone.  The instance that could not
deliver it is the only one that still knows it: it must end it (``end_orphan``).

Against a real ``redis-server``, two members in this process, waits on the reactor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from redis_server import require_redis_server
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from gateway.cluster.member import ClusterMember, HandOff
from gateway.cluster.redis_client import RedisTarget, endpoint_connector
from gateway.config import ClusterSettings
from gateway.tools.redis_process import RedisProcess
from gateway.vapi.calls import CreatedCall, SocketUrl

reactor: Any = global_reactor


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    require_redis_server()
    with RedisProcess() as server:
        yield server


class Call:
    """What the member records of a call (``RecordedCall``)."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self.cause: str | None = None
        self.state = "awaiting-stream"
        self.stream_sid: str | None = None
        self.vapi_call_id: str | None = None
        self.created_wall = time.time()
        self.info = None

    @property
    def ended(self) -> bool:
        return self.cause is not None


class Calls:
    """The switchboard's side, as the member sees it; ``hand_over`` waits for the test."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.handing: Deferred[HandOff] = Deferred()
        self.orphans: list[str] = []

    def end_call(self, call_sid: str, cause: str) -> Deferred[None] | None:
        return None

    def vapi_call_ended(self, vapi_call_id: str) -> bool:
        return False

    def hand_over(self, call_sid: str) -> Deferred[HandOff]:
        self.asked.append(call_sid)
        return self.handing

    def end_orphan(self, created: CreatedCall) -> None:
        self.orphans.append(created.call_id)


def member(settings: ClusterSettings, name: str) -> tuple[ClusterMember, Calls]:
    target = RedisTarget.from_settings(settings)
    m = ClusterMember(settings, reactor, endpoint_connector(reactor, target, 1.0),
                      instance_id=name, worker=None, ended_ttl_s=5.0)
    calls = Calls()
    m.local = calls
    return m, calls


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_handover_that_cannot_be_answered_ends_the_vapi_call(
        redis: RedisProcess) -> None:
    settings = ClusterSettings(backend=redis.url, refresh_interval=0.2, call_ttl=1.0,
                               command_timeout=0.2, takeover_timeout=0.5,
                               key_prefix=f"h{time.monotonic_ns()}:")
    a, a_calls = member(settings, "a")
    b, _ = member(settings, "b")
    for m in (a, b):
        m.startService()
    try:
        await until(lambda: a.available and b.available)
        a.call_added(Call("CA-h"))
        await a.refresh()
        asking = b.take_over("CA-h")
        await until(lambda: a_calls.asked == ["CA-h"])
        await a.redis.stop()  # a's commands connection is gone: its reply cannot go out
        a_calls.handing.callback(
            CreatedCall("vapi-h", SocketUrl("wss://vapi.example/vapi-h/transport")))
        outcome = await asking
        assert outcome.reason == "owner-timeout"  # b creates a Vapi call of its own
        await until(lambda: a_calls.orphans == ["vapi-h"], timeout=2)
    finally:
        for m in (a, b):
            await m.stopService()
