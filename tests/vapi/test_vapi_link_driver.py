"""The link driver with Autobahn in memory (twisted.test.iosim) under a Clock: open,
audio both ways, ping/pong, a missing pong -> reconnect, backoff 1/2/4 s then
give up, stop -> end-call once + close, Vapi ending the call, bad frames
counted; no delayed call left afterwards; the URL and key never logged. Plus a
real loopback TLS test: an untrusted
certificate is refused, a trusted one works.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import known_secrets
import pytest
import pytest_twisted  # type: ignore[import-untyped]
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from inmemory import debug_log_events, pipe, txaio_on
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.test import iosim

from gateway.logs import redactor
from gateway.vapi.calls import AudioFormat, SocketUrl
from gateway.vapi.codec import CallEvent, Say, SpeechUpdate, StatusUpdate
from gateway.vapi.link import (
    Closed,
    Connecting,
    Ending,
    Failed,
    LinkClosedReason,
    LinkFailure,
    LinkSettings,
    LinkState,
    Open,
    Reconnecting,
)
from gateway.vapi.link_driver import (
    CallSocketFactory,
    CallSocketProtocol,
    LinkDriver,
    LinkNotOpenError,
    tls_connector,
)

API_KEY = known_secrets.VAPI_API_KEY
TXAIO: Any = txaio  # txaio's type stubs omit config and the log-level functions


# A distinctive capability token: tests assert it never reaches a log line.
SOCKET_TOKEN = "call-7f3e9a-capability-4b1d"
SOCKET_URL = f"ws://127.0.0.1:9000/{SOCKET_TOKEN}/transport"


class FakeVapiServer(WebSocketServerProtocol):
    """Vapi's side of one call socket: records what the gateway sends."""

    answer_pings = True
    refuse_with: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.authorization: str | None = None
        self.path: str | None = None
        self.audio: list[bytes] = []
        self.texts: list[bytes] = []
        self.pings: list[bytes] = []
        self.opened = False
        self.closed_with: tuple[bool, int | None] | None = None

    def onConnect(self, request: Any) -> None:
        self.authorization = request.headers.get("authorization")
        self.path = request.path
        if self.refuse_with is not None:
            raise ConnectionDeny(self.refuse_with, "refused by the fake")

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        (self.audio if isBinary else self.texts).append(payload)

    def onPing(self, payload: bytes) -> None:
        self.pings.append(payload)
        if self.answer_pings:
            self.sendPong(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_with = (wasClean, code)


@dataclass
class IosimConnector:
    """Connects each attempt to a fresh :class:`FakeVapiServer` in memory.

    ``refusals`` attempts fail at TCP level first; ``hang`` makes attempts never
    connect (the returned Deferred stays pending until cancelled).
    """

    clock: Clock
    refusals: int = 0
    hang: bool = False
    answer_pings: bool = True
    refuse_upgrade_with: int | None = None
    servers: list[FakeVapiServer] = field(default_factory=list)
    pumps: list[iosim.IOPump] = field(default_factory=list)
    urls: list[SocketUrl] = field(default_factory=list)
    hanging: list[Deferred[Any]] = field(default_factory=list)

    def __call__(self, url: SocketUrl, factory: CallSocketFactory) -> Deferred[Any]:
        self.urls.append(url)
        if self.refusals > 0:
            self.refusals -= 1
            return fail(ConnectionRefusedError("refused by the fake"))
        if self.hang:
            pending: Deferred[Any] = Deferred()
            self.hanging.append(pending)
            return pending
        server_factory = WebSocketServerFactory("ws://127.0.0.1:9000")
        server_factory.protocol = FakeVapiServer
        server_factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=1)
        server = cast(FakeVapiServer, server_factory.buildProtocol(None))
        server.answer_pings = self.answer_pings
        server.refuse_with = self.refuse_upgrade_with
        client = factory.buildProtocol(None)
        self.servers.append(server)
        self.pumps.append(pipe(server, client, self.clock))
        return succeed(client)

    @property
    def server(self) -> FakeVapiServer:
        return self.servers[-1]

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


@dataclass
class RecordingOwner:
    """A :class:`~gateway.vapi.link_driver.LinkOwner` that writes everything down."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)
    events: list[CallEvent] = field(default_factory=list)
    raise_on_audio: bool = False

    def on_link_open(self) -> None:
        self.calls.append(("open", None))

    def on_link_audio(self, audio: bytes) -> None:
        if self.raise_on_audio:
            raise RuntimeError("owner bug")
        self.audio.append(audio)

    def on_link_event(self, event: CallEvent) -> None:
        self.events.append(event)

    def on_link_transition(self, old: LinkState, new: LinkState) -> None:
        self.calls.append(("transition", (type(old).__name__, type(new).__name__)))

    def on_link_failed(self, failure: LinkFailure) -> None:
        self.calls.append(("failed", failure))

    def on_link_closed(self, reason: LinkClosedReason) -> None:
        self.calls.append(("closed", reason))

    def transitions(self) -> list[tuple[str, str]]:
        return [value for name, value in self.calls if name == "transition"]

    def named(self, name: str) -> list[Any]:
        return [value for kind, value in self.calls if kind == name]


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    with txaio_on(clock):
        yield clock


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


class Rig:
    """A driver wired to an in-memory fake Vapi."""

    def __init__(self, clock: Clock, audio: AudioFormat | None = None,
                 settings: LinkSettings | None = None, **connector: Any) -> None:
        self.clock = clock
        self.connector = IosimConnector(clock, **connector)
        self.owner = RecordingOwner()
        self.driver = LinkDriver(url=SocketUrl(SOCKET_URL), api_key=API_KEY,
                                 audio=audio or AudioFormat(), owner=self.owner, clock=clock,
                                 connector=self.connector, settings=settings)

    def state(self) -> LinkState:
        return self.driver.state

    def flush(self) -> None:
        self.connector.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def open(self) -> None:
        self.driver.start()
        self.flush()
        assert isinstance(self.state(), Open)

    def stop(self) -> list[Any]:
        closed: list[Any] = []
        self.driver.stop().addBoth(closed.append)
        self.flush()
        return closed

    def timers(self) -> list[float]:
        return sorted(call.getTime() - self.clock.seconds()
                      for call in self.clock.getDelayedCalls())


def test_open_sends_the_bearer_key_and_reports_every_transition(clock: Clock) -> None:
    rig = Rig(clock)
    opened: list[Any] = []
    rig.driver.when_open().addBoth(opened.append)
    rig.open()
    server = rig.connector.server
    assert server.authorization == f"Bearer {API_KEY}"
    assert server.path == f"/{SOCKET_TOKEN}/transport"
    assert opened == [None]
    assert rig.owner.transitions() == [("Idle", "Connecting"), ("Connecting", "Open")]
    assert rig.owner.named("open") == [None]
    assert rig.timers() == [10.0]  # only the heartbeat runs
    rig.driver.start()  # a second start does nothing
    assert len(rig.connector.servers) == 1
    assert rig.stop() == [LinkClosedReason.STOPPED]
    assert clock.getDelayedCalls() == []


def test_audio_and_events_both_ways(clock: Clock) -> None:
    rig = Rig(clock)
    assert rig.driver.send_audio(b"\xff" * 160) is False  # not open yet: dropped
    assert rig.driver.send_message(Say(content="hi")) is False
    rig.open()
    server = rig.connector.server
    assert rig.driver.send_audio(b"\xff" * 160)
    assert rig.driver.send_message(Say(content="One moment."))
    rig.flush()
    assert server.audio == [b"\xff" * 160]
    assert json.loads(server.texts[0]) == {"type": "say", "content": "One moment."}

    server.sendMessage(b"\x7f" * 160, isBinary=True)
    server.sendMessage(b"\x7f" * 161, isBinary=True)  # odd is fine for mu-law
    server.sendMessage(b"", isBinary=True)
    server.sendMessage(b'{"type":"speech-update","status":"started","role":"user"}')
    server.sendMessage(b'{"type":"voice-input","input":"x"}')
    server.sendMessage(b'{"type":"transcript","transcript":5}')
    server.sendMessage(b"[1,2")
    rig.flush()
    assert rig.owner.audio == [b"\x7f" * 160, b"\x7f" * 161]
    assert rig.owner.events == [SpeechUpdate(status="started", role="user")]
    counters = rig.driver.counters
    assert (counters.audio_frames_in, counters.frames_empty, counters.events_unknown,
            counters.frames_bad_text, counters.audio_dropped_not_open,
            counters.messages_dropped_not_open) == (2, 1, 1, 2, 1, 1)
    assert isinstance(rig.state(), Open)  # bad input never hurts the link
    rig.stop()
    assert clock.getDelayedCalls() == []


def test_odd_pcm_frames_are_dropped_and_counted(clock: Clock) -> None:
    rig = Rig(clock, audio=AudioFormat("pcm_s16le", 16000))
    rig.open()
    rig.connector.server.sendMessage(b"\x00" * 640, isBinary=True)
    rig.connector.server.sendMessage(b"\x00" * 639, isBinary=True)
    rig.flush()
    assert [len(a) for a in rig.owner.audio] == [640]
    assert rig.driver.counters.frames_odd_length == 1
    rig.stop()


def test_an_owner_that_raises_is_counted_not_propagated(clock: Clock) -> None:
    rig = Rig(clock)
    rig.owner.raise_on_audio = True
    rig.open()
    rig.connector.server.sendMessage(b"\xff" * 160, isBinary=True)
    rig.flush()
    assert rig.driver.counters.owner_errors == 1
    assert isinstance(rig.state(), Open)
    rig.stop()


def test_heartbeat_keeps_a_silent_link_open(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    for _ in range(6):  # a silent assistant for a minute
        rig.advance(10)
        assert rig.timers() == [10.0]  # pong came back: next ping in 10 s
    assert rig.connector.server.pings == [n.to_bytes(8, "big") for n in range(1, 7)]
    assert isinstance(rig.state(), Open) and len(rig.connector.servers) == 1
    rig.stop()
    assert clock.getDelayedCalls() == []


def test_a_missing_pong_reconnects_to_the_same_url(clock: Clock) -> None:
    rig = Rig(clock, answer_pings=False)
    rig.open()
    rig.advance(10)  # ping
    assert rig.timers() == [5.0]  # pong deadline
    rig.advance(4.9)
    assert isinstance(rig.state(), Open)
    rig.connector.answer_pings = True  # the next socket is healthy
    rig.advance(0.1)
    assert rig.state() == Reconnecting(attempt=1, socket_id=1)
    assert rig.connector.servers[0].closed_with is not None  # the dead socket was dropped
    rig.advance(1)
    assert rig.state() == Open(socket_id=2)
    assert [u.reveal() for u in rig.connector.urls] == [SOCKET_URL, SOCKET_URL]
    assert rig.driver.counters.reconnects == 1
    assert rig.owner.transitions()[2:] == [("Open", "Reconnecting"),
                                           ("Reconnecting", "Connecting"),
                                           ("Connecting", "Open")]
    assert rig.owner.named("open") == [None, None]
    rig.stop()
    assert clock.getDelayedCalls() == []


def test_backoff_is_1_2_4_seconds_then_the_owner_is_told(clock: Clock) -> None:
    rig = Rig(clock, refusals=4)
    attempts_at: list[float] = []
    connect = rig.connector.__call__

    def timed_connect(url: SocketUrl, factory: Any) -> Deferred[Any]:
        attempts_at.append(clock.seconds())
        connecting: Deferred[Any] = connect(url, factory)
        return connecting

    rig.driver._connector = timed_connect
    opened: list[Any] = []
    rig.driver.when_open().addBoth(opened.append)
    rig.driver.start()
    for step in (1, 2, 4):
        assert rig.timers() == [float(step)]
        rig.advance(step)
    assert attempts_at == [0, 1, 3, 7]
    assert isinstance(rig.state(), Failed)
    [failure] = rig.owner.named("failed")
    assert failure == LinkFailure(
        "connect failed: ConnectionRefusedError: Connection was refused by other side: "
        "refused by the fake.", 3, "recreate")
    assert opened[0].check(LinkNotOpenError)
    assert clock.getDelayedCalls() == []
    assert rig.stop() == [LinkClosedReason.STOPPED]


def test_stop_sends_end_call_once_and_closes_cleanly(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    server = rig.connector.server
    closed: list[Any] = []
    rig.driver.stop().addBoth(closed.append)
    rig.driver.stop().addBoth(closed.append)
    assert closed == []  # the socket is still closing
    rig.flush()
    assert [json.loads(t) for t in server.texts] == [{"type": "end-call"}]
    assert server.closed_with == (True, 1000)
    assert closed == [LinkClosedReason.STOPPED] * 2
    assert rig.owner.named("closed") == [LinkClosedReason.STOPPED]
    assert rig.driver.send_audio(b"\xff") is False
    assert clock.getDelayedCalls() == []
    assert rig.driver.when_open().result.check(LinkNotOpenError)  # type: ignore[attr-defined]
    rig.driver.when_open().addErrback(lambda _: None)


def test_vapi_ending_the_call_is_final_even_if_the_socket_drops(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    server = rig.connector.server
    server.sendMessage(b'{"type":"status-update","status":"ended","endedReason":"x"}')
    rig.flush()
    assert rig.state() == Ending(1)
    assert rig.owner.events == [StatusUpdate(status="ended", ended_reason="x")]
    server.dropConnection(abort=True)  # no close handshake
    rig.flush()
    assert rig.state() == Closed(LinkClosedReason.REMOTE_ENDED)
    assert rig.owner.named("closed") == [LinkClosedReason.REMOTE_ENDED]
    assert len(rig.connector.servers) == 1 and server.texts == []  # no reconnect, no end-call
    assert clock.getDelayedCalls() == []


def test_vapi_ending_the_call_but_never_closing(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    rig.connector.server.sendMessage(b'{"type":"end-of-call-report","endedReason":"x"}')
    rig.flush()
    rig.advance(5)  # close-wait
    assert rig.state() == Closed(LinkClosedReason.REMOTE_ENDED)
    assert rig.connector.server.closed_with == (True, 1000)
    assert clock.getDelayedCalls() == []


def test_a_clean_close_from_vapi_ends_the_link(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    closed: list[Any] = []
    rig.driver.when_closed().addBoth(closed.append)
    rig.connector.server.sendClose(1000)
    rig.flush()
    assert closed == [LinkClosedReason.REMOTE_CLOSED]
    assert clock.getDelayedCalls() == []


def test_sending_while_vapi_is_closing_drops_instead_of_raising(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    rig.connector.server.sendClose(1000)
    rig.connector.pumps[0].pump()  # the close frame arrived; the TCP close has not
    assert isinstance(rig.state(), Open)
    assert rig.driver.send_audio(b"\xff" * 160) is False
    assert rig.driver.send_message(Say(content="hi")) is False
    assert rig.driver.counters.audio_dropped_not_open == 1
    rig.flush()
    assert rig.state() == Closed(LinkClosedReason.REMOTE_CLOSED)
    assert clock.getDelayedCalls() == []


def test_an_unclean_drop_reconnects(clock: Clock) -> None:
    rig = Rig(clock)
    rig.open()
    rig.connector.server.dropConnection(abort=True)
    rig.flush()
    assert rig.state() == Reconnecting(1, 1)
    rig.advance(1)
    assert rig.state() == Open(2)
    rig.stop()
    assert clock.getDelayedCalls() == []


def test_a_refused_upgrade_counts_as_a_failed_connect(clock: Clock) -> None:
    rig = Rig(clock, refuse_upgrade_with=404)
    rig.driver.start()
    rig.flush()
    assert rig.state() == Reconnecting(1, 1)
    assert rig.stop() == [LinkClosedReason.STOPPED]
    assert clock.getDelayedCalls() == []


def test_a_connect_that_hangs_is_cancelled_at_the_deadline(clock: Clock) -> None:
    rig = Rig(clock, hang=True)
    rig.driver.start()
    assert rig.timers() == [10.0]
    [pending] = rig.connector.hanging
    rig.advance(9.9)
    assert not pending.called
    rig.advance(0.1)
    assert pending.called  # cancelled (the driver's errback consumed the CancelledError)
    assert rig.state() == Reconnecting(1, 1)
    assert rig.stop() == [LinkClosedReason.STOPPED]
    assert clock.getDelayedCalls() == []


def test_stop_while_connecting_cancels_the_connect(clock: Clock) -> None:
    rig = Rig(clock, hang=True)
    rig.driver.start()
    assert rig.stop() == [LinkClosedReason.STOPPED]
    assert rig.connector.hanging[0].called
    assert clock.getDelayedCalls() == []


def test_stop_during_backoff_makes_no_further_attempt(clock: Clock) -> None:
    rig = Rig(clock, refusals=1)
    rig.driver.start()
    assert isinstance(rig.state(), Reconnecting)
    assert rig.stop() == [LinkClosedReason.STOPPED]
    rig.advance(60)
    assert len(rig.connector.urls) == 1
    assert clock.getDelayedCalls() == []


def test_the_url_is_redacted_from_every_log_line_while_the_link_lives(clock: Clock) -> None:
    rig = Rig(clock)
    line = f"GET /{SOCKET_TOKEN}/transport from {SOCKET_URL}"
    assert SOCKET_TOKEN not in redactor(line)
    rig.open()
    rig.stop()
    assert redactor(line) == line  # forgotten once the link is over (no unbounded growth)


def test_peer_error_text_is_clipped_and_scrubbed(clock: Clock) -> None:
    rig = Rig(clock, refuse_upgrade_with=404)
    rig.driver.start()
    rig.flush()
    text = rig.driver._loggable(f"upgrade failed for {SOCKET_URL} ({'x' * 500})")
    assert SOCKET_TOKEN not in text and "<socket url>" in text and len(text) == 200
    rig.stop()


def test_stop_before_start(clock: Clock) -> None:
    rig = Rig(clock)
    assert rig.stop() == [LinkClosedReason.STOPPED]
    assert rig.connector.urls == []


def _debug_logged_run(clock: Clock, api_key: str) -> str:
    """Open, ping, miss a pong, reconnect and stop with txaio at debug; the log text."""
    with debug_log_events() as events:
        rig = Rig(clock, answer_pings=False)
        rig.driver._api_key = api_key
        rig.open()
        rig.connector.server.sendMessage(b"{bad", isBinary=False)
        rig.advance(15)  # ping, missing pong, reconnect scheduled
        rig.connector.answer_pings = True
        rig.advance(1)
        rig.stop()
    return repr(events)


def test_the_url_and_key_never_reach_a_log_even_at_debug(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake server is test code: keep its own debug log of the request quiet.
    monkeypatch.setattr(FakeVapiServer, "log", TXAIO.make_logger(level="info"))
    # Control: Autobahn's client logger left at debug writes the upgrade request
    # (a throwaway key here, so the suite's secret scan stays meaningful).
    with monkeypatch.context() as unpinned:
        unpinned.setattr(CallSocketProtocol, "log", TXAIO.make_logger())
        control = _debug_logged_run(clock, api_key="throwaway-control-key")
    assert SOCKET_TOKEN in control and "throwaway-control-key" in control
    # The driver's pinned logger: nothing.
    text = _debug_logged_run(clock, api_key=API_KEY)
    assert SOCKET_TOKEN not in text and API_KEY not in text


# --- real loopback TLS -----------------------------------------------------


def _self_signed_localhost() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


class RecordingTlsServer(FakeVapiServer):
    """The fake Vapi behind real TLS; remembers every socket that opened."""

    opened_servers: list[FakeVapiServer] = []

    def onOpen(self) -> None:
        super().onOpen()
        self.opened_servers.append(self)


async def run_tls_link(trust: str) -> RecordingOwner:
    """Open (or fail to open) a link over real loopback TLS, send audio, stop."""
    key_pem, cert_pem = _self_signed_localhost()
    factory = WebSocketServerFactory("wss://127.0.0.1")
    factory.protocol = RecordingTlsServer
    RecordingTlsServer.opened_servers = []
    server_cert = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
    listening = global_reactor.listenSSL(  # type: ignore[attr-defined]
        0, factory, server_cert.options(), interface="127.0.0.1")
    owner = RecordingOwner()
    trust_root = ssl.Certificate.loadPEM(cert_pem) if trust == "self-signed" else None
    driver = LinkDriver(
        url=SocketUrl(f"wss://127.0.0.1:{listening.getHost().port}/{SOCKET_TOKEN}/transport"),
        api_key=API_KEY, audio=AudioFormat(), owner=owner, clock=global_reactor,
        connector=tls_connector(global_reactor, trust_root=trust_root),
        settings=LinkSettings(reconnect_attempts=0, connect_timeout_ns=5_000_000_000))
    try:
        driver.start()
        try:
            await driver.when_open()
            driver.send_audio(b"\xff" * 160)
            await deferLater(global_reactor, 0.05)
        except LinkNotOpenError:
            pass
        await driver.stop()
        await deferLater(global_reactor, 0.01)  # let the server side finish closing
    finally:
        await listening.stopListening()
    leftovers = [call for call in global_reactor.getDelayedCalls()  # type: ignore[attr-defined]
                 if "LinkDriver" in repr(call)]
    assert leftovers == []
    return owner


TLS_WARNINGS = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


@TLS_WARNINGS
@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_tls_refuses_an_untrusted_certificate() -> None:
    owner = await run_tls_link(trust="platform")
    [failure] = owner.named("failed")
    assert "certificate verify failed" in failure.reason, failure.reason
    assert RecordingTlsServer.opened_servers == []  # the websocket never opened


@TLS_WARNINGS
@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_tls_with_a_trusted_certificate_opens() -> None:
    owner = await run_tls_link(trust="self-signed")
    assert owner.named("open") == [None]
    [server] = RecordingTlsServer.opened_servers
    assert server.authorization == f"Bearer {API_KEY}"
    assert server.audio == [b"\xff" * 160]
    assert owner.named("closed") == [LinkClosedReason.STOPPED]


def test_connecting_state_is_reported_before_open(clock: Clock) -> None:
    rig = Rig(clock, hang=True)
    rig.driver.start()
    assert rig.state() == Connecting(0, 1)
    rig.stop()
