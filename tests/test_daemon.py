"""The root service under a fake reactor: bind, ready, drain, drain timeout, close."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from ini import minimal_ini
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from gateway.bridge.registry import InMemoryCallRegistry
from gateway.config import parse_settings
from gateway.daemon import Gateway, ListenFailed, build_gateway


class FakeCall:
    """A live call whose teardown completes when the test says so."""

    def __init__(self, registry: InMemoryCallRegistry, call_sid: str) -> None:
        self.call_sid = call_sid
        self.registry = registry
        self.causes: list[str] = []
        self.ending: Deferred[None] | None = None
        registry.add(self)

    def end(self, cause: str) -> Deferred[None]:
        self.causes.append(cause)
        if self.ending is None:
            self.ending = Deferred()
        return self.ending

    def finish(self) -> None:
        self.registry.remove(self)
        if self.ending is not None and not self.ending.called:
            self.ending.callback(None)


def make(text: str = "", environ: dict[str, str] | None = None
         ) -> tuple[Gateway, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    settings = parse_settings(minimal_ini() + text, "gw.ini", {})
    gateway = build_gateway(settings, reactor, environ or {})
    gateway.service.privilegedStartService()
    gateway.service.startService()
    reactor.run()
    return gateway, reactor


def get_json(gateway: Gateway, path: str) -> tuple[int, object]:
    treq = StubTreq(gateway.site.resource)
    response = treq.get(f"http://127.0.0.1:8080{path}").result  # type: ignore[attr-defined]
    body = treq.content(response).result  # type: ignore[attr-defined]
    return response.code, json.loads(body)


def test_binds_the_configured_endpoint() -> None:
    gateway, reactor = make("[gateway]\nlisten = tcp:9123:interface=127.0.0.1\n")
    (port, factory, _, interface) = reactor.tcpServers[0]
    assert (port, interface) == (9123, "127.0.0.1")
    assert factory is gateway.site
    assert gateway.service.listener.bound.called


def test_health_and_ready() -> None:
    gateway, reactor = make("[gateway]\nmax_concurrent_calls = 2\n")
    reactor.advance(12.5)
    code, body = get_json(gateway, "/health")
    assert code == 200
    assert body == {"status": "ok", "version": "0.1.0", "uptime_seconds": 12.5,
                    "active_calls": 0, "max_concurrent_calls": 2}
    assert get_json(gateway, "/ready") == (200, {"ready": True})
    FakeCall(gateway.registry, "CA1")  # type: ignore[arg-type]
    FakeCall(gateway.registry, "CA2")  # type: ignore[arg-type]
    assert get_json(gateway, "/ready") == (503, {"ready": False, "reason": "capacity"})
    assert get_json(gateway, "/health")[1]["active_calls"] == 2  # type: ignore[index]


def test_unknown_route_is_404_and_wrong_method_405() -> None:
    gateway, _ = make()
    treq = StubTreq(gateway.site.resource)
    assert treq.get("http://x/nope").result.code == 404  # type: ignore[attr-defined]
    assert treq.post("http://x/health").result.code == 405  # type: ignore[attr-defined]


def test_drain_with_no_calls_stops_at_once() -> None:
    gateway, reactor = make()
    done = gateway.service.stopService()
    assert done.called
    assert reactor.getDelayedCalls() == []


def test_drain_waits_for_calls_then_closes_the_port() -> None:
    gateway, reactor = make("[gateway]\ndrain_timeout = 30\n")
    call = FakeCall(gateway.registry, "CA1")  # type: ignore[arg-type]
    done = gateway.service.stopService()
    assert gateway.admission.draining
    assert get_json(gateway, "/ready") == (503, {"ready": False, "reason": "draining"})
    assert get_json(gateway, "/health")[1]["status"] == "draining"  # type: ignore[index]
    reactor.advance(29)
    assert not done.called and call.causes == []
    call.finish()
    reactor.advance(1.9)  # the port stays open for the calls' status callbacks
    assert not done.called and gateway.service.listener.port is not None
    reactor.advance(0.1)
    assert done.called
    assert reactor.getDelayedCalls() == []
    assert gateway.service.listener.port is None


def test_drain_timeout_ends_remaining_calls() -> None:
    gateway, reactor = make("[gateway]\ndrain_timeout = 10\n")
    calls = [FakeCall(gateway.registry, f"CA{i}") for i in range(3)]  # type: ignore[arg-type]
    done = gateway.service.stopService()
    reactor.advance(10)
    assert [c.causes for c in calls] == [["drain-timeout"]] * 3
    assert not done.called
    for c in calls:
        c.finish()
    assert done.called
    assert len(gateway.registry) == 0
    assert reactor.getDelayedCalls() == []


def test_drain_gives_up_on_calls_that_never_finish_ending() -> None:
    gateway, reactor = make("[gateway]\ndrain_timeout = 1\n")
    FakeCall(gateway.registry, "CA1")  # type: ignore[arg-type]
    done = gateway.service.stopService()
    reactor.advance(1)
    reactor.advance(5)
    assert done.called
    assert reactor.getDelayedCalls() == []


def test_port_in_use_exits_with_a_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = parse_settings(
            minimal_ini(gateway={"listen": f"tcp:{port}:interface=127.0.0.1"}))
        gateway = build_gateway(settings, reactor, {})  # type: ignore[arg-type]
        with pytest.raises(ListenFailed) as info:
            gateway.service.privilegedStartService()
    assert str(info.value.code) == (
        f"vapi-gateway: cannot listen on 'tcp:{port}:interface=127.0.0.1': "
        "Address already in use")


def test_systemd_endpoint_without_inherited_socket_exits_clearly() -> None:
    reactor = MemoryReactorClock()
    settings = parse_settings(minimal_ini(gateway={"listen": "systemd:domain=INET:index=0"}))
    gateway = build_gateway(settings, reactor, {})
    with pytest.raises(ListenFailed) as info:
        gateway.service.privilegedStartService()
    assert str(info.value.code) == (
        "vapi-gateway: cannot listen on 'systemd:domain=INET:index=0': no such socket "
        "inherited from systemd (socket activation: LISTEN_FDS/LISTEN_PID)")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_notify_ready_watchdog_status_and_stopping(notify_socket: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "4000000"}
    gateway, reactor = make("", env)
    messages = received(notify_socket)
    assert "READY=1\nSTATUS=serving; 0 active calls" in messages
    assert any(m.startswith("WATCHDOG=1") for m in messages)
    reactor.advance(2)
    assert received(notify_socket) == ["WATCHDOG=1\nSTATUS=serving; 0 active calls"]
    FakeCall(gateway.registry, "CA1")  # type: ignore[arg-type]
    reactor.advance(2)
    assert received(notify_socket) == ["WATCHDOG=1\nSTATUS=serving; 1 active calls"]
    gateway.service.stopService()
    messages = received(notify_socket)
    assert messages[0] == "STOPPING=1\nSTATUS=draining; 1 active calls"


def test_watchdog_off_without_watchdog_usec(notify_socket: socket.socket) -> None:
    make("", {"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert received(notify_socket) == ["READY=1\nSTATUS=serving; 0 active calls"]
