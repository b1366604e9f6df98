"""The cluster core against a real ``redis-server`` (Debian's; started per module).

Two :class:`ClusterMember` instances in this process, each with its own connections,
play two gateway instances: records, expiry of a dead instance's calls, the control
bus, takeover, cluster-wide admission, and Redis paused (SIGSTOP), killed and restarted.
Waits are on Deferreds fired by the real reactor, never sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from redis_server import require_redis_server, started_redis
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from gateway.cluster.member import ClusterMember, HandOff, Takeover
from gateway.cluster.redis_client import (
    RedisConnection,
    RedisTarget,
    RedisUnavailableError,
    endpoint_connector,
)
from gateway.config import ClusterSettings, Secret
from gateway.tools.redis_process import RedisProcess
from gateway.vapi.calls import CreatedCall, SocketUrl

reactor: Any = global_reactor


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with started_redis() as server:
        yield server


@pytest.fixture
def redis_up(redis: RedisProcess) -> RedisProcess:
    if not redis.running:
        redis.restart()
    if redis.paused:
        redis.resume()
    return redis


@dataclass
class FakeCall:
    call_sid: str
    state: str = "awaiting-stream"
    stream_sid: str | None = None
    vapi_call_id: str | None = None
    created_wall: float = field(default_factory=time.time)
    cause: str | None = None

    @property
    def ended(self) -> bool:
        return self.cause is not None

    @property
    def info(self) -> Any:
        return type("Info", (), {"caller": "+15550001111", "called": "+15550002222"})()


class FakeCalls:
    """What a member asks of its switchboard, recorded."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.vapi_ended: list[str] = []
        self.handed: dict[str, HandOff] = {}
        self.orphans: list[str] = []
        self.ended_signal: Deferred[str] = Deferred()

    def end_call(self, call_sid: str, cause: str) -> Deferred[None] | None:
        self.ended.append((call_sid, cause))
        if not self.ended_signal.called:
            self.ended_signal.callback(call_sid)
        return succeed(None)

    def vapi_call_ended(self, vapi_call_id: str) -> bool:
        self.vapi_ended.append(vapi_call_id)
        return True

    def hand_over(self, call_sid: str) -> Deferred[HandOff]:
        return succeed(self.handed.get(call_sid, "none"))

    def end_orphan(self, created: CreatedCall) -> None:
        self.orphans.append(created.call_id)


def settings_for(redis: RedisProcess, **overrides: Any) -> ClusterSettings:
    values: dict[str, Any] = dict(backend=redis.url, refresh_interval=0.2, call_ttl=1.0,
                                  command_timeout=0.2, takeover_timeout=0.5,
                                  key_prefix=f"t{time.monotonic_ns()}:")
    values.update(overrides)
    return ClusterSettings(**values)


def member(settings: ClusterSettings, name: str, events: list[tuple[str, str]] | None = None
           ) -> tuple[ClusterMember, FakeCalls]:
    target = RedisTarget.from_settings(settings)
    m = ClusterMember(settings, reactor, endpoint_connector(reactor, target, 1.0),
                      instance_id=name, worker=None, ended_ttl_s=5.0,
                      events=(lambda kind, label: events.append((kind, label)))
                      if events is not None else None)
    calls = FakeCalls()
    m.local = calls
    return m, calls


def until(check: Any, timeout: float = 5.0, step: float = 0.02) -> Deferred[None]:
    """Fire once ``check()`` is true (it may return a Deferred), re-checking on the
    reactor every ``step`` (the reactor keeps running: no blocking sleep)."""
    deadline = time.monotonic() + timeout

    async def holds() -> bool:
        value = check()
        if isinstance(value, Deferred):
            value = await value
        return bool(value)

    async def wait() -> None:
        while not await holds():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await deferLater(reactor, step, lambda: None)

    return Deferred.fromCoroutine(wait())


async def started(*members: ClusterMember) -> None:
    for m in members:
        m.startService()
    await until(lambda: all(m.available for m in members))


async def stopped(*members: ClusterMember) -> None:
    for m in members:
        await m.stopService()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_records_are_written_listed_and_deleted(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up)
    a, _ = member(settings, "a")
    b, _ = member(settings, "b")
    await started(a, b)
    try:
        call = FakeCall("CA1")
        a.call_added(call)
        call.vapi_call_id, call.stream_sid, call.state = "vapi-1", "MZ1", "streaming"
        a.call_changed(call)
        await a.refresh()
        records = await b.list_calls()
        assert [(r.call_sid, r.owner, r.vapi_call_id, r.stream_sid) for r in records] == [
            ("CA1", "a", "vapi-1", "MZ1")]
        found = await b.find_call("CA1")
        assert found.record is not None and found.record.owner == "a"
        assert found.ended_by is None
        instances = sorted(i.instance_id for i in await b.list_instances())
        assert instances == ["a", "b"]
        call.cause = "twilio-stop"
        a.call_removed(call)
        await until(lambda: _no_calls(b))
        found = await b.find_call("CA1")
        assert found.record is None and found.ended_by == "a"
    finally:
        await stopped(a, b)
    assert [i.instance_id for i in await _fresh_list_instances(settings)] == []


def _no_calls(m: ClusterMember) -> Deferred[bool]:
    return m.list_calls().addCallback(lambda found: found == [])


async def _fresh_list_instances(settings: ClusterSettings) -> list[Any]:
    probe, _ = member(settings, "probe")
    probe.redis.start()
    await until(lambda: probe.redis.up)
    try:
        found = await probe.store.list_instances()
        return [i for i in found if i.instance_id != "probe"]
    finally:
        await probe.redis.stop()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_dead_instances_calls_expire(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up)
    a, _ = member(settings, "a")
    b, _ = member(settings, "b")
    await started(a, b)
    try:
        a.call_added(FakeCall("CA-dead"))
        await a.refresh()
        assert [r.call_sid for r in await b.list_calls()] == ["CA-dead"]
        # a dies without a word: its connections go, nothing is deleted
        a._refresh.stop()
        await a.redis.stop()
        await a.subscriber.stop()
        t0 = time.monotonic()
        await until(lambda: _no_calls(b), timeout=5)
        waited = time.monotonic() - t0
        assert waited <= settings.call_ttl + 1.0
        assert [i.instance_id for i in await b.list_instances()] == ["b"]
    finally:
        await stopped(b)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_the_bus_ends_a_call_on_its_owner(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up)
    a, a_calls = member(settings, "a")
    b, b_calls = member(settings, "b")
    await started(a, b)
    try:
        b.call_added(FakeCall("CA-b", vapi_call_id="vapi-b"))
        await b.refresh()
        owner = await a.end_elsewhere("CA-b", "twilio-status")
        assert owner == "b"
        assert await b_calls.ended_signal == "CA-b"
        assert b_calls.ended == [("CA-b", "twilio-status")] and a_calls.ended == []
        assert await a.vapi_ended_elsewhere("vapi-b") == "b"
        await until(lambda: b_calls.vapi_ended == ["vapi-b"])
        assert await a.end_elsewhere("CA-nobody", "twilio-status") is None
    finally:
        await stopped(a, b)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_takeover_hands_the_vapi_call_over(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up)
    a, a_calls = member(settings, "a")
    b, _ = member(settings, "b")
    await started(a, b)
    try:
        created = CreatedCall("vapi-x", SocketUrl("wss://vapi.example/vapi-x/transport"))
        a_calls.handed["CA-x"] = created
        a.call_added(FakeCall("CA-x"))
        await a.refresh()
        outcome: Takeover = await b.take_over("CA-x")
        assert outcome.reason == "handed-over"
        assert outcome.created is not None and outcome.created.call_id == "vapi-x"
        assert outcome.created.socket_url.reveal() == "wss://vapi.example/vapi-x/transport"
        # nobody holds it: create here
        assert (await b.take_over("CA-unknown")).reason == "no-owner"
        # the owner has nothing to give
        a.call_added(FakeCall("CA-y"))
        await a.refresh()
        assert (await b.take_over("CA-y")).reason == "owner-had-none"
    finally:
        await stopped(a, b)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_handover_that_comes_too_late_is_ended(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up, takeover_timeout=0.05)
    a, a_calls = member(settings, "a")
    b, b_calls = member(settings, "b")
    await started(a, b)
    try:
        created = CreatedCall("vapi-late", SocketUrl("wss://vapi.example/late/transport"))
        slow: Deferred[HandOff] = Deferred()
        a_calls.hand_over = lambda call_sid: slow  # type: ignore[method-assign,assignment]
        a.call_added(FakeCall("CA-late"))
        await a.refresh()
        outcome = await b.take_over("CA-late")
        assert outcome.reason == "owner-timeout" and outcome.created is None
        slow.callback(created)  # a hands over after b stopped waiting
        await until(lambda: b_calls.orphans == ["vapi-late"])
    finally:
        await stopped(a, b)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_cluster_wide_admission(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up, max_cluster_calls=2)
    a, _ = member(settings, "a")
    b, _ = member(settings, "b")
    await started(a, b)
    try:
        assert await a.reserve("CA-1") is True
        assert await b.reserve("CA-2") is True
        assert await b.reserve("CA-3") is False
        assert await a.reserve("CA-1") is True  # a retried webhook is not counted twice
        # reservations never confirmed by a record expire with call_ttl
        await until(lambda: b.reserve("CA-4"), timeout=5)
    finally:
        await stopped(a, b)




@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_redis_paused_fails_fast_then_resyncs(redis_up: RedisProcess) -> None:
    events: list[tuple[str, str]] = []
    settings = settings_for(redis_up, max_cluster_calls=10)
    a, _ = member(settings, "a", events)
    b, _ = member(settings, "b")
    await started(a, b)
    try:
        kept = FakeCall("CA-kept")
        a.call_added(kept)
        gone = FakeCall("CA-gone")
        a.call_added(gone)
        await a.refresh()
        redis_up.pause()
        t0 = time.monotonic()
        await until(lambda: not a.redis.up, timeout=3)
        noticed = time.monotonic() - t0
        assert noticed < 2.0
        # while Redis is away: answers come at once, from this instance alone
        t0 = time.monotonic()
        assert await a.reserve("CA-new") is None
        assert (await a.take_over("CA-any")).reason == "redis-unavailable"
        assert time.monotonic() - t0 < 0.1
        assert ("fallback", "admission") in events
        gone.cause = "twilio-stop"
        a.call_removed(gone)  # cannot be deleted now: replayed on the re-sync
        added = FakeCall("CA-added-while-down")
        a.call_added(added)
        redis_up.resume()
        await until(lambda: a.available and b.available, timeout=10)
        await until(lambda: _sids_are(b, {"CA-kept", "CA-added-while-down"}), timeout=5)
        found = await b.find_call("CA-gone")
        assert found.record is None and found.ended_by == "a"
    finally:
        if redis_up.paused:
            redis_up.resume()
        await stopped(a, b)


def _sids_are(m: ClusterMember, expected: set[str]) -> Deferred[bool]:
    return m.list_calls().addCallbacks(
        lambda found: {r.call_sid for r in found} == expected, lambda _: False)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_redis_killed_and_restarted_resyncs(redis_up: RedisProcess) -> None:
    settings = settings_for(redis_up)
    a, a_calls = member(settings, "a")
    b, b_calls = member(settings, "b")
    await started(a, b)
    try:
        a.call_added(FakeCall("CA-survivor"))
        await a.refresh()
        redis_up.kill()
        await until(lambda: not a.redis.up and not b.subscriber.up, timeout=3)
        with pytest.raises(RedisUnavailableError):
            await a.redis.execute("PING")
        redis_up.restart()  # empty: persistence is off
        await until(lambda: a.available and b.available, timeout=10)
        await until(lambda: _sids_are(b, {"CA-survivor"}), timeout=5)
        # the bus works again (b re-subscribed): end a's call from b
        a_calls.ended_signal = Deferred()
        assert await b.end_elsewhere("CA-survivor", "admin-hangup") == "a"
        assert await a_calls.ended_signal == "CA-survivor"
        assert b_calls.ended == []
    finally:
        await stopped(a, b)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_password_is_used_and_a_wrong_one_never_connects(
        tmp_path: Any) -> None:
    require_redis_server()
    with RedisProcess(extra_args=("--requirepass", "s3cret-redis")) as locked:
        good = ClusterSettings(backend=locked.url, password=Secret("s3cret-redis"),
                               refresh_interval=0.2, call_ttl=1.0)
        a, _ = member(good, "a")
        await started(a)
        try:
            assert await a.redis.execute("PING") == b"PONG"
        finally:
            await stopped(a)
        bad = ClusterSettings(backend=locked.url, password=Secret("wrong"),
                              refresh_interval=0.2, call_ttl=1.0)
        conn = RedisConnection(RedisTarget.from_settings(bad), reactor,
                               endpoint_connector(reactor, RedisTarget.from_settings(bad), 1),
                               name="t", command_timeout=0.5)
        conn.start()
        await until(lambda: conn.refusals > 0)
        assert not conn.up
        await conn.stop()
