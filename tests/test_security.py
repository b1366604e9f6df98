"""Security properties of the composed daemon, one test (or a table) per property.

See the README's "Threat model": what each check stops.  Here, in memory (raw bytes
into the daemon's own Sites over a ``StringTransport``, WebSockets over iosim, HTTP
APIs over ``StubTreq``, all on a ``MemoryReactorClock``):

- bodies are bounded before they are read (413 at once for a declared length, a
  chunked body cut off the moment it passes the limit), per path, on both listeners;
- a request must arrive whole within ``request_read_timeout`` (a slow sender gets 408),
  and an upgraded WebSocket is not limited by it;
- at most ``max_pending_streams`` media sockets may wait for their ``start``;
- the Vapi call socket enforces its message size;
- every route of both listeners refuses a request without credentials, except the
  health routes and /metrics; the listeners are on loopback by default;
- no configured secret appears in any answer (bodies, headers, WebSocket refusals
  and close reasons) or in any log line, across every error path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode

import known_secrets
import pytest
import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from ini import minimal_ini
from inmemory import pipe, txaio_on
from klein import Klein
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from gateway.admin import MAX_BODY_BYTES as ADMIN_MAX_BODY_BYTES
from gateway.config import Settings, parse_settings
from gateway.daemon import Gateway, build_gateway
from gateway.http_limits import HttpLimits, LimitedHTTPChannel, LimitedSite
from gateway.logs import render_event
from gateway.twilio.media import START_TIMEOUT_SECONDS, media_stream_factory
from gateway.twilio.routes import signature_validator_from, stream_tokens_from
from gateway.vapi.calls import AudioFormat, SocketUrl
from gateway.vapi.link_driver import LinkDriver

TXAIO: Any = txaio
PUBLIC = "http://127.0.0.1:8080"
STREAM_URL = "ws://127.0.0.1:8080/twilio/media"
ACCOUNT = "AC" + "0" * 32
API_KEY_SID = "SK" + "0" * 32
CALL_SID = "CA" + "1" * 32
AUTH_TOKEN = known_secrets.TWILIO_AUTH_TOKEN
SECRETS = known_secrets.ALL
NOW = 1_700_000_000.0


def make_settings(**sections: dict[str, str]) -> Settings:
    merged: dict[str, dict[str, str]] = {"gateway": {"public_url": PUBLIC}}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return parse_settings(minimal_ini(**merged), "gw.ini", {})


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, params))


# -- raw HTTP into a Site ------------------------------------------------------------------


@dataclass
class RawConnection:
    """One client connection to a Site, bytes in and out (no real socket)."""

    channel: Any
    transport: StringTransport

    @classmethod
    def open(cls, site: Site) -> RawConnection:
        channel = site.buildProtocol(IPv4Address("TCP", "203.0.113.9", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.9", 40000))
        channel.makeConnection(transport)
        return cls(channel, transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def answer(self) -> bytes:
        return bytes(self.transport.value())

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionError("test over")))


def post_head(path: str, length: int | None, *, chunked: bool = False,
              expect_continue: bool = False, extra: bytes = b"") -> bytes:
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"Content-Type: application/x-www-form-urlencoded\r\n" + extra
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n"
    if expect_continue:
        head += b"Expect: 100-continue\r\n"
    return head + b"\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


@dataclass
class ComposedDaemon:
    """build_gateway on a MemoryReactorClock, started (nothing bound for real)."""

    gateway: Gateway
    reactor: MemoryReactorClock
    http: ScriptedHttp

    @property
    def public_site(self) -> Site:
        return self.gateway.site

    @property
    def admin_site(self) -> Site:
        for port, factory, _, _ in self.reactor.tcpServers:
            if port == 9464:
                return cast(Site, factory)
        raise AssertionError("no admin listener")

    def stop(self) -> None:
        stopping = self.gateway.service.stopService()
        for _ in range(30):
            self.http.flush()
            self.reactor.advance(2)
        assert stopping.called


@dataclass
class ScriptedHttp:
    """The daemon's HTTP client (Vapi's and Twilio's REST APIs), answering from a script:
    each endpoint pops its next answer — ``(status, JSON body)`` or ``"refused"``."""

    vapi: list[tuple[int, Any] | str] = field(default_factory=list)
    twilio_create: list[tuple[int, Any] | str] = field(default_factory=list)
    twilio_update: list[tuple[int, Any] | str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        app = Klein()
        app.route("/call", methods=["POST"], endpoint="vapi")(
            lambda r: self._answer(r, self.vapi))
        app.route("/2010-04-01/Accounts/<account>/Calls.json", methods=["POST"],
                  endpoint="create")(lambda r, account: self._answer(r, self.twilio_create))
        app.route("/2010-04-01/Accounts/<account>/Calls/<sid>.json", methods=["POST"],
                  endpoint="update")(
            lambda r, account, sid: self._answer(r, self.twilio_update))
        self.stub: Any = StubTreq(app.resource())

    def _script(self, url: str) -> list[tuple[int, Any] | str]:
        if url.endswith("/call"):
            return self.vapi
        return self.twilio_create if url.endswith("/Calls.json") else self.twilio_update

    def _answer(self, request: IRequest, script: list[tuple[int, Any] | str]) -> bytes:
        answer = script.pop(0) if script else (500, {"message": "nothing scripted"})
        assert not isinstance(answer, str)
        status, body = answer
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def request(self, method: str, url: str, **options: Any) -> Deferred[Any]:
        self.requests.append((method, url))
        script = self._script(url)
        if script and script[0] == "refused":
            script.pop(0)
            return fail(ConnectionRefusedError("refused by the fake"))
        return cast(Deferred[Any], self.stub.request(method, url, **options))

    def post(self, url: str, **options: Any) -> Deferred[Any]:
        return self.request("POST", url, **options)

    def flush(self) -> None:
        self.stub.flush()


def refusing_connector(url: Any, factory: Any) -> Deferred[Any]:
    return fail(ConnectionRefusedError("no Vapi socket in this test"))


def composed(http: ScriptedHttp | None = None, **sections: dict[str, str]) -> ComposedDaemon:
    reactor = MemoryReactorClock()
    reactor.advance(NOW)
    http = http or ScriptedHttp()
    gateway = build_gateway(make_settings(**sections), reactor, {}, http_client=http,
                            link_connector=refusing_connector)
    gateway.service.privilegedStartService()
    gateway.service.startService()
    reactor.run()
    return ComposedDaemon(gateway, reactor, http)


# -- 1. bodies are bounded before they are read -----------------------------------------------


@pytest.mark.parametrize(("listener", "path", "limit"), [
    ("public", "/twilio/voice", 65536),
    ("public", "/twilio/status", 65536),
    ("public", "/twilio/stream-status", 65536),
    ("public", "/vapi/events", 1048576),
    ("public", "/health", 65536),
    ("admin", "/calls", ADMIN_MAX_BODY_BYTES),
])
def test_a_declared_oversized_body_is_refused_before_it_is_read(
        listener: str, path: str, limit: int) -> None:
    daemon = composed(admin={"token": known_secrets.ADMIN_TOKEN})
    site = daemon.public_site if listener == "public" else daemon.admin_site
    connection = RawConnection.open(site)
    connection.send(post_head(path, limit + 1, expect_continue=True))
    assert connection.answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"100 Continue" not in connection.answer  # the client is told not to send it
    assert connection.closing
    connection.send(b"x" * 1000)  # what a client sends anyway is ignored
    assert connection.answer.count(b"HTTP/1.1") == 1
    connection.lose()
    # at the limit, the same request waits for its body
    connection = RawConnection.open(site)
    connection.send(post_head(path, limit))
    assert connection.answer == b"" and not connection.closing
    connection.lose()
    assert len(daemon.gateway.registry) == 0
    daemon.stop()


def test_each_path_has_its_own_limit() -> None:
    """/vapi/events takes [vapi] max_message_size; the Twilio webhooks [twilio]
    max_body_size: a body one route accepts is refused at once on another."""
    daemon = composed(twilio={"max_body_size": "2048"}, vapi={"max_message_size": "8192"})
    for path, refused in (("/twilio/voice", True), ("/vapi/events", False)):
        connection = RawConnection.open(daemon.public_site)
        connection.send(post_head(path, 4096))
        assert connection.answer.startswith(b"HTTP/1.1 413 ") is refused, path
        connection.lose()
    daemon.stop()


def test_a_chunked_body_is_cut_off_the_moment_it_passes_the_limit() -> None:
    daemon = composed(twilio={"max_body_size": "2048"})
    connection = RawConnection.open(daemon.public_site)
    connection.send(post_head("/twilio/voice", None, chunked=True))
    connection.send(chunk(b"a" * 1000) + chunk(b"b" * 1000))
    assert connection.answer == b""  # 2000 bytes: still within the limit
    request = connection.channel.requests[0]
    connection.send(chunk(b"c" * 1000))
    assert connection.answer.startswith(b"HTTP/1.1 413 ")
    assert connection.closing
    assert request.content.tell() <= 2048  # what was kept never passed the limit
    connection.send(chunk(b"d" * 100_000) + b"0\r\n\r\n")
    assert connection.answer.count(b"HTTP/1.1") == 1
    connection.lose()
    assert len(daemon.gateway.registry) == 0
    daemon.stop()


# -- 2. a request must arrive whole, in time ------------------------------------------------


def test_a_slow_sender_gets_408_at_request_read_timeout() -> None:
    """One header byte every 4 s keeps Twisted's idle timeout from ever firing; the read
    deadline (10 s for the whole request) still does."""
    daemon = composed()
    connection = RawConnection.open(daemon.public_site)
    connection.send(b"POST /twilio/voice HTTP/1.1\r\n")
    for _ in range(2):
        daemon.reactor.advance(4)
        connection.send(b"X")
    assert connection.answer == b""
    daemon.reactor.advance(2)  # 10 s since the connection opened
    assert connection.answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert connection.closing
    connection.lose()
    daemon.stop()
    assert daemon.reactor.getDelayedCalls() == []


def test_an_idle_connection_is_closed_without_an_answer() -> None:
    daemon = composed(gateway={"request_read_timeout": "3"})
    connection = RawConnection.open(daemon.public_site)
    daemon.reactor.advance(3)
    assert connection.closing and connection.answer == b""
    connection.lose()
    daemon.stop()


def test_the_deadline_restarts_after_each_answer_on_a_kept_alive_connection() -> None:
    daemon = composed()
    connection = RawConnection.open(daemon.public_site)
    connection.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.answer.startswith(b"HTTP/1.1 200 ")
    daemon.reactor.advance(9)
    connection.send(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.answer.count(b"HTTP/1.1 200 ") == 2 and not connection.closing
    daemon.reactor.advance(9.9)
    assert not connection.closing
    daemon.reactor.advance(0.1)
    assert connection.closing
    connection.lose()
    daemon.stop()


class EchoSocket(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class RecordingClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.received: list[bytes] = []
        self.closed_with: tuple[bool, int | None, str | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_with = (wasClean, code, reason)


def test_an_upgraded_websocket_outlives_the_read_deadline() -> None:
    clock = Clock()
    with txaio_on(clock):
        factory = WebSocketServerFactory("ws://127.0.0.1:8080")
        factory.protocol = EchoSocket
        site = LimitedSite(WebSocketResource(factory), HttpLimits(read_timeout=5,
                                                                   max_body_size=0),
                           reactor=clock)
        client_factory = WebSocketClientFactory("ws://127.0.0.1:8080/")
        client_factory.protocol = RecordingClient
        client = cast(RecordingClient, client_factory.buildProtocol(None))
        server = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        pump = pipe(server, client, clock)
        pump.flush()
        assert client.opened
        clock.advance(60)
        pump.flush()
        client.sendMessage(b"still here")
        pump.flush()
        assert client.closed_with is None and client.received == [b"still here"]
        client.sendClose(1000)
        pump.flush()
        clock.advance(10)
        pump.flush()
        assert client.closed_with is not None and client.closed_with[1] == 1000


# -- 3. media sockets awaiting their start message are capped -----------------------------


@dataclass
class AttachingCalls:
    """CallControl for the media socket: every started stream is attached."""

    attached: list[Any] = field(default_factory=list)

    def attach_stream(self, stream: Any, started: Any) -> Any:
        self.attached.append(started)
        return self

    def on_stream_audio(self, audio: Any) -> None: ...
    def on_stream_dtmf(self, digit: str) -> None: ...
    def on_stream_mark(self, name: str) -> None: ...
    def on_stream_stopped(self) -> None: ...
    def on_stream_closed(self, stream: Any) -> None: ...


class MediaServer:
    """The media factory on a LimitedSite (as the daemon serves it), on a Clock."""

    def __init__(self, clock: Clock, **twilio: str) -> None:
        self.clock = clock
        self.settings = make_settings(twilio=twilio)
        self.tokens = stream_tokens_from(self.settings)
        self.calls = AttachingCalls()
        self.factory = media_stream_factory(
            self.settings, validator=signature_validator_from(self.settings),
            tokens=self.tokens, calls=cast(Any, self.calls), clock=clock)
        app = Klein()
        self.factory.register(app)
        self.site = LimitedSite(app.resource(), HttpLimits(read_timeout=10, max_body_size=0),
                                reactor=clock)
        self.pumps: list[iosim.IOPump] = []

    def connect(self, signature: str | None = "sign") -> RecordingClient:
        headers = {}
        if signature == "sign":
            signature = sign(STREAM_URL, {})
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        client_factory = WebSocketClientFactory(STREAM_URL, headers=headers)
        client_factory.protocol = RecordingClient
        client = cast(RecordingClient, client_factory.buildProtocol(None))
        server = self.site.buildProtocol(IPv4Address("TCP", "203.0.113.9", 40000))
        pump = pipe(server, client, self.clock)
        pump.flush()
        self.pumps.append(pump)
        return client

    def start(self, client: RecordingClient, call_sid: str = CALL_SID) -> None:
        token = self.tokens.issue(call_sid, self.clock.seconds())
        client.sendMessage(json.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
            "start": {"accountSid": ACCOUNT, "callSid": call_sid,
                      "customParameters": {"streamToken": token}}}).encode())
        self.flush()

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def close_all(self, clients: list[RecordingClient]) -> None:
        for client in clients:
            if client.opened and client.closed_with is None:
                client.sendClose(1000)
        self.flush()
        self.clock.advance(10)
        self.flush()


def refused_with(client: RecordingClient) -> str:
    assert not client.opened
    return str(client.wasNotCleanReason)


def test_sockets_awaiting_their_start_are_capped_with_503() -> None:
    clock = Clock()
    clock.advance(NOW)
    with txaio_on(clock):
        server = MediaServer(clock, max_pending_streams="2")
        first, second = server.connect(), server.connect()
        assert first.opened and second.opened
        third = server.connect()
        assert "[503]" in refused_with(third)
        # a forged upgrade is still a 403, and takes no slot
        assert "[403]" in refused_with(server.connect(signature="forged"))
        # a stream that starts (a valid token for its call) is no longer pending
        server.start(first)
        assert len(server.calls.attached) == 1
        fourth = server.connect()
        assert fourth.opened
        assert "[503]" in refused_with(server.connect())
        # one that never starts is closed at the start timeout, freeing its slot
        clock.advance(START_TIMEOUT_SECONDS)
        server.flush()
        assert second.closed_with is not None and second.closed_with[1] == 4008
        assert fourth.closed_with is not None
        fifth, sixth = server.connect(), server.connect()
        assert fifth.opened and sixth.opened
        assert server.factory.awaiting_start() == 2
        server.close_all([first, fifth, sixth])
        assert server.factory.awaiting_start() == 0
    assert clock.getDelayedCalls() == []


def test_a_socket_dropped_before_its_start_frees_its_slot() -> None:
    clock = Clock()
    clock.advance(NOW)
    with txaio_on(clock):
        server = MediaServer(clock, max_pending_streams="1")
        first = server.connect()
        assert "[503]" in refused_with(server.connect())
        assert first.transport is not None
        first.transport.loseConnection()
        server.flush()
        second = server.connect()
        assert second.opened
        server.close_all([second])
    assert clock.getDelayedCalls() == []


# -- 4. the Vapi call socket enforces its message size -------------------------------------------


class OversizingVapi(WebSocketServerProtocol):
    """Vapi's side: sends one message larger than the gateway accepts."""

    def onOpen(self) -> None:
        self.sendMessage(b"\xff" * 8192, isBinary=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_with = (wasClean, code)


@dataclass
class RecordingOwner:
    audio: list[bytes] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    transitions: list[str] = field(default_factory=list)

    def on_link_open(self) -> None: ...
    def on_link_audio(self, audio: bytes) -> None:
        self.audio.append(audio)

    def on_link_event(self, event: Any) -> None:
        self.events.append(event)

    def on_link_transition(self, old: Any, new: Any) -> None:
        self.transitions.append(type(new).__name__)

    def on_link_failed(self, failure: Any) -> None: ...
    def on_link_closed(self, reason: Any) -> None: ...


def test_the_vapi_socket_refuses_a_message_over_max_message_size() -> None:
    clock = Clock()
    servers: list[OversizingVapi] = []
    pumps: list[iosim.IOPump] = []

    def connector(url: SocketUrl, factory: Any) -> Deferred[Any]:
        server_factory = WebSocketServerFactory("ws://127.0.0.1:9000")
        server_factory.protocol = OversizingVapi
        server = cast(OversizingVapi, server_factory.buildProtocol(None))
        client = factory.buildProtocol(None)
        servers.append(server)
        pumps.append(pipe(server, client, clock))
        return succeed(client)

    with txaio_on(clock):
        owner = RecordingOwner()
        driver = LinkDriver(url=SocketUrl("ws://127.0.0.1:9000/call-1/transport"),
                            api_key=known_secrets.VAPI_API_KEY, audio=AudioFormat(),
                            owner=owner, clock=clock, connector=connector,
                            max_message_bytes=4096)
        driver.start()
        for pump in pumps:
            pump.flush()
        assert owner.audio == []  # the 8 KiB frame never reached the bridge
        assert servers[0].closed_with is not None  # Autobahn failed the connection
        assert "Reconnecting" in owner.transitions or "Failed" in owner.transitions
        stopped: list[Any] = []
        driver.stop().addBoth(stopped.append)
        for _ in range(10):
            clock.advance(5)
            for pump in pumps:
                pump.flush()
        assert stopped
    assert clock.getDelayedCalls() == []


# -- 5. every route needs credentials, except health and metrics; loopback by default ------


UNAUTHENTICATED_ROUTES = {"/health", "/ready", "/metrics"}
"""Routes that answer without credentials (no call data: liveness and counters)."""


def _routes(app: Klein) -> Iterator[tuple[str, str]]:
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            if method not in ("HEAD", "OPTIONS"):
                yield method, re.sub(r"<[^>]+>", CALL_SID, rule.rule)


def test_every_route_refuses_a_request_without_credentials() -> None:
    """A route added later without an authentication check fails this test."""
    daemon = composed(admin={"token": known_secrets.ADMIN_TOKEN})
    checked: list[tuple[str, str, int]] = []
    for app in (daemon.gateway.app, daemon.gateway.admin_app):
        stub: Any = StubTreq(app.resource())
        for method, path in _routes(app):
            if path in UNAUTHENTICATED_ROUTES or path == "/twilio/media":
                continue  # /twilio/media: the WebSocket upgrade, tested below
            body = urlencode({"CallSid": CALL_SID, "CallStatus": "completed",
                              "StreamEvent": "stream-error"}).encode()
            response = stub.request(method, "http://127.0.0.1:8080" + path, data=body,
                                    headers={"Content-Type": "application/json"}).result
            checked.append((method, path, response.code))
    assert all(code in (401, 403) for _, _, code in checked), checked
    assert {path for _, path, _ in checked} >= {
        "/twilio/voice", "/twilio/status", "/twilio/stream-status", "/vapi/events",
        "/calls", f"/calls/{CALL_SID}"}
    daemon.stop()


@pytest.mark.parametrize("path", ["/twilio/voice", "/twilio/status", "/twilio/stream-status"])
@pytest.mark.parametrize("signature", [
    None, "", sign(PUBLIC + "/twilio/voice", {}, token="another-accounts-token-0000"),
    sign("http://10.0.0.5:8080/twilio/voice", {}),
])
def test_every_twilio_webhook_of_the_daemon_checks_the_signature(
        path: str, signature: str | None) -> None:
    daemon = composed()
    params = {"CallSid": CALL_SID, "CallStatus": "completed", "StreamEvent": "stream-error"}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature.replace("/twilio/voice", path)
    stub: Any = StubTreq(daemon.public_site.resource)
    answer = stub.post("http://10.0.0.5:8080" + path, data=urlencode(params).encode(),
                       headers=headers).result
    assert answer.code == 403
    assert len(daemon.gateway.registry) == 0
    # the genuine signature over the public URL passes the same route
    headers["X-Twilio-Signature"] = sign(PUBLIC + path, params)
    assert stub.post(PUBLIC + path, data=urlencode(params).encode(),
                     headers=headers).result.code in (200, 204)
    daemon.stop()


def test_the_daemons_media_upgrade_checks_the_signature() -> None:
    daemon = composed()
    with txaio_on(daemon.reactor):  # type: ignore[arg-type]
        for signature in (None, "forged", sign("wss://127.0.0.1:8080/twilio/media", {})):
            headers = {"X-Twilio-Signature": signature} if signature else {}
            client_factory = WebSocketClientFactory(STREAM_URL, headers=headers)
            client_factory.protocol = RecordingClient
            client = cast(RecordingClient, client_factory.buildProtocol(None))
            server = daemon.public_site.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
            pipe(server, client, cast(Clock, daemon.reactor)).flush()
            assert "[403]: forbidden" in refused_with(client)
    daemon.stop()


def test_both_listeners_are_on_loopback_by_default() -> None:
    daemon = composed(admin={"token": known_secrets.ADMIN_TOKEN})
    listening = {port: interface for port, _, _, interface in daemon.reactor.tcpServers}
    assert listening == {8080: "127.0.0.1", 9464: "127.0.0.1"}
    # /metrics is served on the admin listener only
    stub: Any = StubTreq(daemon.public_site.resource)
    assert stub.get("http://127.0.0.1:8080/metrics").result.code == 404
    assert isinstance(daemon.public_site, LimitedSite)
    assert isinstance(daemon.admin_site, LimitedSite)
    assert isinstance(daemon.public_site.buildProtocol(None), LimitedHTTPChannel)
    daemon.stop()


# -- 6. no secret in any answer or log line, across the error paths ----------------------------


@contextmanager
def rendered_log_lines() -> Iterator[list[str]]:
    """Every log event while the block runs, rendered as the daemon writes it (JSON) but
    NOT redacted: the test sees what the code put in the line."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    lines: list[str] = []
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observer)
        lines.extend(render_event(event, "json") for event in events)


@dataclass
class Answers:
    """Everything the daemon said to its clients, to scan for secrets."""

    seen: list[tuple[str, int | None, bytes]] = field(default_factory=list)

    def stub(self, label: str, stub: Any, method: str, url: str, **options: Any) -> int:
        response = stub.request(method, url, **options).result
        body = stub.content(response).result
        headers = b"\n".join(name + b": " + b", ".join(values)
                             for name, values in response.headers.getAllRawHeaders())
        self.seen.append((label, response.code, headers + b"\n\n" + body))
        return int(response.code)

    def raw(self, label: str, site: Site, data: bytes, wait: tuple[Any, float] | None = None
            ) -> bytes:
        connection = RawConnection.open(site)
        connection.send(data)
        if wait is not None:
            clock, seconds = wait
            clock.advance(seconds)
        answer = connection.answer
        connection.lose()
        self.seen.append((label, int(answer[9:12]) if answer[9:12].isdigit() else None,
                          answer))
        return answer

    def text(self, label: str, text: str) -> None:
        self.seen.append((label, None, text.encode()))

    def statuses(self) -> set[int]:
        return {code for _, code, _ in self.seen if code is not None}


def test_no_secret_in_any_answer_or_log_line() -> None:
    http = ScriptedHttp(
        vapi=[(401, {"message": "Invalid Key. Hot tip, you may be using the private key "
                                "instead of the public key, or vice versa.",
                     "error": "Unauthorized", "statusCode": 401}),
              (500, {"message": "internal"}), (500, {"message": "internal"}),
              (500, {"message": "internal"}), "refused", "refused", "refused",
              (400, {"message": ["assistantId must be a UUID"], "error": "Bad Request",
                     "subscriptionLimits": {"concurrencyBlocked": True}})],
        twilio_create=[
            (401, {"code": 20003, "message": "Authenticate", "status": 401,
                   "more_info": "https://www.twilio.com/docs/errors/20003"}),
            (400, {"code": 21211, "message": "The 'To' number +1555 is not a valid phone "
                                             "number.", "status": 400}),
            (500, {"message": "oops"}), "refused"],
        twilio_update=[(401, {"code": 20003, "message": "Authenticate", "status": 401})] * 8,
    )
    sections = {
        "twilio": {"account_sid": ACCOUNT, "api_key_sid": API_KEY_SID,
                   "api_key_secret": known_secrets.TWILIO_API_KEY_SECRET,
                   "hangup_via": "rest", "max_body_size": "2048"},
        "vapi": {"max_message_size": "8192", "request_retries": "2"},
        "admin": {"token": known_secrets.ADMIN_TOKEN},
    }
    answers = Answers()
    with rendered_log_lines() as lines:
        daemon = composed(http, **sections)
        reactor = daemon.reactor
        web: Any = StubTreq(daemon.public_site.resource)
        admin: Any = StubTreq(daemon.admin_site.resource)
        form = {"Content-Type": "application/x-www-form-urlencoded"}

        def voice(call_sid: str, signature: str | None = "sign",
                  body: bytes | None = None) -> int:
            params = {"CallSid": call_sid, "AccountSid": ACCOUNT, "From": "+15550001111",
                      "To": "+15550002222"}
            headers = dict(form)
            if signature == "sign":
                signature = sign(PUBLIC + "/twilio/voice", params)
            if signature is not None:
                headers["X-Twilio-Signature"] = signature
            data = urlencode(params).encode() if body is None else body
            code = answers.stub("voice", web, "POST", PUBLIC + "/twilio/voice", data=data,
                                headers=headers)
            http.flush()
            return code

        # Twilio webhooks: bad signatures, bad bodies, a wrong account, too large
        assert voice(CALL_SID, signature=None) == 403
        assert voice(CALL_SID, signature=sign(PUBLIC + "/twilio/voice", {}, "x" * 32)) == 403
        assert voice(CALL_SID, body=b"CallSid=%FF%FE") == 403  # not UTF-8: undecodable
        bad_sid = {"CallSid": "not a sid", "AccountSid": ACCOUNT}
        assert answers.stub("voice", web, "POST", PUBLIC + "/twilio/voice",
                            data=urlencode(bad_sid).encode(),
                            headers={**form, "X-Twilio-Signature": sign(
                                PUBLIC + "/twilio/voice", bad_sid)}) == 400
        other = {"CallSid": CALL_SID, "AccountSid": "AC" + "9" * 32}
        assert answers.stub("status", web, "POST", PUBLIC + "/twilio/status",
                            data=urlencode(other).encode(),
                            headers={**form, "X-Twilio-Signature": sign(
                                PUBLIC + "/twilio/status", other)}) == 403
        assert answers.raw("voice-413", daemon.public_site,
                           post_head("/twilio/voice", 4096)).startswith(b"HTTP/1.1 413")
        assert answers.raw("slow-408", daemon.public_site, b"POST /x HTTP/1.1\r\n",
                           wait=(reactor, 10)).startswith(b"HTTP/1.1 408")

        # Vapi webhooks: no secret, a wrong one, a bad body, too large
        events = PUBLIC + "/vapi/events"
        assert answers.stub("vapi", web, "POST", events, data=b"{}") == 401
        assert answers.stub("vapi", web, "POST", events, data=b"{}",
                            headers={"X-Vapi-Secret": "wrong-secret-value"}) == 401
        assert answers.stub("vapi", web, "POST", events, data=b'{"message":',
                            headers={"X-Vapi-Secret": known_secrets.VAPI_WEBHOOK_SECRET}) == 400
        assert answers.raw("vapi-413", daemon.public_site,
                           post_head("/vapi/events", 9000)).startswith(b"HTTP/1.1 413")

        # calls whose Vapi call creation fails: rejected (401, 400), 5xx, unreachable
        for n in range(4):
            assert voice(f"CA{n}" + "2" * 31) == 200
            for _ in range(6):
                reactor.advance(1)
                http.flush()

        # the media upgrade: unsigned, forged; a start with a forged or foreign token
        with txaio_on(cast(Clock, reactor)):
            for signature in (None, "forged"):
                headers = {"X-Twilio-Signature": signature} if signature else {}
                client_factory = WebSocketClientFactory(STREAM_URL, headers=headers)
                client_factory.protocol = RecordingClient
                client = cast(RecordingClient, client_factory.buildProtocol(None))
                server = daemon.public_site.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
                pipe(server, client, cast(Clock, reactor)).flush()
                answers.text("upgrade-refused", refused_with(client))
            tokens = stream_tokens_from(daemon.gateway.switchboard.settings)
            for token in ("forged-token", tokens.issue("CA" + "8" * 32, NOW)):
                client_factory = WebSocketClientFactory(
                    STREAM_URL, headers={"X-Twilio-Signature": sign(STREAM_URL, {})})
                client_factory.protocol = RecordingClient
                client = cast(RecordingClient, client_factory.buildProtocol(None))
                server = daemon.public_site.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
                pump = pipe(server, client, cast(Clock, reactor))
                pump.flush()
                client.sendMessage(json.dumps({
                    "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                    "start": {"accountSid": ACCOUNT, "callSid": "CA" + "0" * 32,
                              "customParameters": {"streamToken": token}}}).encode())
                pump.flush()
                reactor.advance(10)
                pump.flush()
                assert client.closed_with is not None and client.closed_with[1] == 4008
                answers.text("start-refused", repr(client.closed_with))

        # the admin API: no token, a wrong one, bad bodies, too large, Twilio's refusals
        calls = "http://127.0.0.1:9464/calls"
        bearer = {"Authorization": f"Bearer {known_secrets.ADMIN_TOKEN}"}
        assert answers.stub("admin", admin, "GET", calls) == 401
        assert answers.stub("admin", admin, "GET", calls,
                            headers={"Authorization": "Bearer not-the-token"}) == 401
        assert answers.stub("admin", admin, "POST", calls, data=b"{nope",
                            headers=bearer) == 400
        assert answers.stub("admin", admin, "DELETE", f"{calls}/{CALL_SID}",
                            headers=bearer) == 404
        assert answers.raw("admin-413", daemon.admin_site, post_head(
            "/calls", ADMIN_MAX_BODY_BYTES + 1)).startswith(b"HTTP/1.1 413")
        place = json.dumps({"to": "+15550001111", "from": "+15551230001"}).encode()
        for expected in (502, 400, 502, 502):  # Twilio 401, 400, 500, unreachable
            response = admin.request("POST", calls, data=place, headers=bearer)
            for _ in range(5):
                http.flush()
                admin.flush()
                reactor.advance(6)
            result = response.result
            body = admin.content(result).result
            answers.seen.append(("place-call", result.code, body))
            assert result.code == expected, body

        daemon.stop()  # ends what is left: REST hang-ups that Twilio refuses (401)

    assert answers.statuses() >= {400, 401, 403, 404, 408, 413, 502}
    assert len([r for r in http.requests if r[1].endswith("/call")]) >= 8
    assert any(url.endswith("/Calls.json") for _, url in http.requests)
    assert len(lines) > 50
    logged = "\n".join(lines)
    for event in ("vapi webhook refused", "twilio webhook refused: bad signature",
                  "media socket refused: bad signature", "bad stream token",
                  "admin request refused", "outbound call refused by twilio",
                  "http request refused: body too large"):
        assert event in logged, event
    for label, code, answer in answers.seen:
        for secret in SECRETS:
            assert secret.encode() not in answer, f"{label} ({code}) answered a secret"
    for line in lines:
        for secret in SECRETS:
            assert secret not in line, f"a log line holds a configured secret: {line[:200]}"
