"""The Media Streams socket in memory: an Autobahn client playing Twilio, connected over
twisted.test.iosim to the real Site + Klein route + WebSocketResource, on a Clock.

Upgrade signatures (403), the stream token and account checks (4008), the start
timeout, frames to the session, violations, stop, drops, session sends as Twilio's
exact JSON, a session that raises (4011), and one run against the real Switchboard
after a real voice webhook.  Every test ends with no delayed call left on the Clock.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode

import known_secrets
import pytest
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from ini import minimal_ini
from inmemory import pipe, txaio_on
from klein import Klein
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet import abstract, main
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from gateway.admission import Admission
from gateway.bridge.outbound import OutboundCall, OutboundCalls
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.bridge.session import CallSession, MediaSocket, VapiLink
from gateway.bridge.switchboard import Switchboard
from gateway.config import Settings, parse_settings
from gateway.twilio.media import MediaStreamFactory, MediaStreamProtocol, media_stream_factory
from gateway.twilio.routes import (
    StreamSession,
    TwilioRoutes,
    signature_validator_from,
    stream_tokens_from,
    twiml_answers_from,
)
from gateway.twilio.stream import FRAME_BYTES, Audio, Started
from gateway.twilio.token import StreamTokens
from gateway.vapi.assistants import AssistantById
from gateway.vapi.calls import CreatedCall
from gateway.websocket_fastpath import xor_mask

AUTH_TOKEN = known_secrets.TWILIO_AUTH_TOKEN
PUBLIC = "https://gw.example.com"
STREAM_URL = "wss://gw.example.com/twilio/media"
ACCOUNT = "AC" + "0" * 32
CALL_SID = "CA" + "1" * 32
OTHER_CALL_SID = "CA" + "9" * 32
STREAM_SID = "MZ" + "2" * 32
NOW = 1_700_000_000.0
FRAME = bytes(range(FRAME_BYTES))


def make_settings(**twilio: str) -> Settings:
    return parse_settings(minimal_ini(gateway={"public_url": PUBLIC}, twilio=twilio), "gw.ini", {})


def ws_signature(url: str = STREAM_URL, token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, {}))


# -- Twilio's side ---------------------------------------------------------------------


class TwilioFrames:
    """Frames as Twilio numbers them: one sequence counter from start = 1."""

    def __init__(
        self, stream_sid: str = STREAM_SID, call_sid: str = CALL_SID, account: str = ACCOUNT
    ) -> None:
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account = account
        self.sequence = 0

    def _next(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    @staticmethod
    def connected() -> bytes:
        return b'{"event":"connected","protocol":"Call","version":"1.0.0"}'

    def start(self, token: str | None, **parameters: str) -> bytes:
        custom = {"CallSid": self.call_sid, "From": "+15550001111", "To": "+15550002222"}
        if token is not None:
            custom["streamToken"] = token
        custom.update(parameters)
        return _json(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": self.account,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": custom,
                },
            }
        )

    def media(self, timestamp: int, payload: bytes = FRAME) -> bytes:
        return self._event(
            "media",
            {
                "track": "inbound",
                "chunk": "1",
                "timestamp": str(timestamp),
                "payload": base64.b64encode(payload).decode(),
            },
        )

    def dtmf(self, digit: str) -> bytes:
        return self._event("dtmf", {"track": "inbound_track", "digit": digit})

    def mark(self, name: str) -> bytes:
        return self._event("mark", {"name": name})

    def stop(self) -> bytes:
        return self._event("stop", {"accountSid": self.account, "callSid": self.call_sid})

    def _event(self, event: str, body: dict[str, str]) -> bytes:
        return _json(
            {
                "event": event,
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                event: body,
            }
        )


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


class TwilioSide(WebSocketClientProtocol):
    """The Twilio end of the socket: records what the gateway sends."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.received: list[bytes] = []
        self.closed_with: tuple[bool, int | None, str | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert not isBinary
        self.received.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_with = (wasClean, code, reason)


# -- the bridge's side -------------------------------------------------------------------


@dataclass
class FakeSession:
    """A StreamSession that writes everything down."""

    audio: list[Audio] = field(default_factory=list)
    digits: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    stopped: int = 0
    closed: list[MediaSocket] = field(default_factory=list)
    pauses: list[bool] = field(default_factory=list)
    raise_on_audio: bool = False

    def on_stream_audio(self, audio: Audio) -> None:
        if self.raise_on_audio:
            raise RuntimeError("session bug")
        self.audio.append(audio)

    def on_stream_dtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def on_stream_mark(self, name: str) -> None:
        self.marks.append(name)

    def on_stream_stopped(self) -> None:
        self.stopped += 1

    def on_stream_closed(self, stream: MediaSocket) -> None:
        self.closed.append(stream)

    def on_stream_paused(self, stream: MediaSocket, paused: bool) -> None:
        self.pauses.append(paused)


@dataclass
class FakeCalls:
    """CallControl for the media socket: attach_stream hands out FakeSessions."""

    admit: bool = True
    attached: list[tuple[MediaSocket, Started]] = field(default_factory=list)
    sessions: list[FakeSession] = field(default_factory=list)
    opened_outbound: list[tuple[OutboundCall, Started]] = field(default_factory=list)

    def open_call(self, info: Any) -> object:
        raise AssertionError("not used by the media socket")

    def holds(self, call_sid: str) -> bool:
        raise AssertionError("not used by the media socket")

    def call_status(self, call_sid: str, status: str) -> bool:
        raise AssertionError("not used by the media socket")

    def end_call(self, call_sid: str, cause: str) -> object:
        raise AssertionError("not used by the media socket")

    def attach_stream(self, stream: MediaSocket, started: Started,
                      outbound: OutboundCall | None = None) -> StreamSession | None:
        if outbound is not None:
            self.opened_outbound.append((outbound, started))
        self.attached.append((stream, started))
        if not self.admit:
            return None
        session = FakeSession()
        self.sessions.append(session)
        return session

    @property
    def session(self) -> FakeSession:
        (session,) = self.sessions
        return session


# -- the rig ----------------------------------------------------------------------------


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    clock.advance(NOW)
    with txaio_on(clock):
        yield clock
    assert clock.getDelayedCalls() == []  # no timer of ours (or Autobahn's) left behind


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("event") == name]


@dataclass
class Connection:
    """One Twilio client connected in memory to the gateway's site."""

    client: TwilioSide
    server_transport: iosim.FakeTransport
    pump: iosim.IOPump
    frames: TwilioFrames = field(default_factory=TwilioFrames)

    @property
    def server(self) -> MediaStreamProtocol:
        protocol = self.server_transport.protocol
        assert isinstance(protocol, MediaStreamProtocol), protocol
        return protocol

    def send(self, *frames: bytes, binary: bool = False) -> None:
        for frame in frames:
            self.client.sendMessage(frame, isBinary=binary)
        self.pump.flush()

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.received]

    @property
    def close_code(self) -> int | None:
        assert self.client.closed_with is not None, "the socket is still open"
        return self.client.closed_with[1]


def connect_twilio(
    site: Site,
    clock: Clock,
    signature: str | None = "sign",
    path: str = "/twilio/media",
    protocols: list[str] | None = None,
) -> Connection:
    """Connect a Twilio client in memory to ``site``, the way Twilio does (by default
    with a correct signature), and run the opening handshake."""
    headers = {}
    if signature == "sign":
        signature = ws_signature()
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    client_factory = WebSocketClientFactory(
        url="wss://gw.example.com" + path,
        headers=headers,
        useragent="Twilio.TmeWs/1.0",
        protocols=protocols or [],
    )
    client_factory.protocol = TwilioSide
    server = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
    assert server is not None
    client = cast(TwilioSide, client_factory.buildProtocol(None))
    pump = pipe(server, client, clock)
    pump.flush()
    return Connection(client, pump.serverIO, pump)


class MediaRig:
    """The media factory served by a Klein app (as the daemon does) on a Clock."""

    def __init__(
        self,
        clock: Clock,
        settings: Settings | None = None,
        calls: Any = None,
        root: Resource | None = None,
        outbound: bool = False,
    ) -> None:
        self.clock = clock
        self.settings = settings or make_settings()
        self.tokens: StreamTokens = stream_tokens_from(self.settings)
        self.calls = calls if calls is not None else FakeCalls()
        self.outbound = OutboundCalls(
            cast(Any, self.calls), ttl_seconds=self.tokens.ttl_seconds
        )
        self.factory: MediaStreamFactory = media_stream_factory(
            self.settings,
            validator=signature_validator_from(self.settings),
            tokens=self.tokens,
            calls=self.calls,
            clock=clock,
            outbound=self.outbound if outbound else None,
        )
        self.app = Klein()
        self.factory.register(self.app)
        self.site = Site(root if root is not None else self.app.resource(), reactor=clock)

    def token(self, call_sid: str = CALL_SID) -> str:
        return self.tokens.issue(call_sid, self.clock.seconds())

    def connect(self, **options: Any) -> Connection:
        return connect_twilio(self.site, self.clock, **options)

    def started(self, **connect: Any) -> Connection:
        """A connection whose stream started with a valid token."""
        connection = self.connect(**connect)
        assert connection.client.opened
        connection.send(connection.frames.connected(), connection.frames.start(self.token()))
        assert len(self.calls.attached) == 1
        return connection


# -- upgrade --------------------------------------------------------------------------


def test_a_signed_stream_with_a_valid_token_reaches_its_session(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.connect()
    assert connection.client.opened
    assert connection.client.websocket_protocol_in_use is None
    frames = connection.frames
    token = rig.token()
    connection.send(frames.connected(), frames.start(token))
    ((stream, started),) = rig.calls.attached
    assert stream is connection.server
    assert started == Started(
        call_sid=CALL_SID,
        stream_sid=STREAM_SID,
        account_sid=ACCOUNT,
        custom_parameters={
            "CallSid": CALL_SID,
            "From": "+15550001111",
            "To": "+15550002222",
            "streamToken": token,
        },
        tracks=("inbound",),
    )
    connection.send(frames.media(0), frames.media(20), frames.dtmf("5"), frames.mark("g1-5"))
    session = rig.calls.session
    assert session.audio == [Audio(FRAME, 0), Audio(FRAME, 20)]
    assert (session.digits, session.marks) == (["5"], ["g1-5"])
    connection.send(frames.stop())
    assert session.stopped == 1
    assert connection.client.closed_with == (True, 1000, "stream stopped")
    assert session.closed == [connection.server]


def test_session_sends_arrive_as_twilios_exact_json(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    stream = connection.server
    stream.send_media(FRAME)
    stream.send_mark("g1-1")
    stream.send_clear()
    connection.pump.flush()
    payload = base64.b64encode(FRAME).decode()
    assert connection.client.received == [
        b'{"event":"media","streamSid":"%s","media":{"payload":"%s"}}'
        % (STREAM_SID.encode(), payload.encode()),
        b'{"event":"mark","streamSid":"%s","mark":{"name":"g1-1"}}' % STREAM_SID.encode(),
        b'{"event":"clear","streamSid":"%s"}' % STREAM_SID.encode(),
    ]
    assert connection.messages()[0] == {
        "event": "media",
        "streamSid": STREAM_SID,
        "media": {"payload": payload},
    }
    stream.close(1000, "call ended: test")
    connection.pump.flush()


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (None, "missing-signature"),
        ("", "missing-signature"),
        ("forged", "mismatch"),
        (ws_signature(token="another-auth-token-000000"), "mismatch"),
        (ws_signature("wss://10.0.0.9:8080/twilio/media"), "mismatch"),
        (ws_signature("https://gw.example.com/twilio/media"), "mismatch"),
    ],
)
def test_a_bad_upgrade_signature_is_refused_with_403(
    clock: Clock, signature: str | None, reason: str, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock)
    connection = rig.connect(signature=signature)
    assert not connection.client.opened
    assert "[403]: forbidden" in str(connection.client.wasNotCleanReason)
    assert rig.calls.attached == []
    (line,) = named(log_events, "media socket refused: bad signature")
    assert line["reason"] == reason
    if signature:
        assert signature not in json.dumps(log_events, default=repr)


def test_the_signature_may_cover_a_trailing_slash(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.connect(signature=ws_signature(STREAM_URL + "/"))
    assert connection.client.opened
    connection.server.close(1000, "done")
    connection.pump.flush()


def test_with_validation_off_any_upgrade_is_accepted_and_logged(
    clock: Clock, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock, make_settings(validate_signatures="false"))
    connection = rig.connect(signature=None)
    assert connection.client.opened
    assert named(
        log_events, "twilio signature validation is disabled: media socket accepted unchecked"
    )
    # The stream token is still required.
    connection.send(connection.frames.start("forged-token"))
    assert connection.close_code == 4008
    assert rig.calls.attached == []


def test_a_socket_on_another_path_is_refused(
    clock: Clock, log_events: list[dict[str, Any]]
) -> None:
    root = Resource()
    rig = MediaRig(clock, root=root)
    root.putChild(b"elsewhere", WebSocketResource(rig.factory))
    connection = rig.connect(path="/elsewhere", signature=ws_signature(PUBLIC + "/elsewhere"))
    assert not connection.client.opened
    assert "[404]: not found" in str(connection.client.wasNotCleanReason)
    assert named(log_events, "media socket refused: wrong path")


def test_the_first_offered_subprotocol_is_selected(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.connect(protocols=["twilio.v1", "other"])
    assert connection.client.websocket_protocol_in_use == "twilio.v1"
    connection.server.close(1000, "done")
    connection.pump.flush()


# -- the start message ------------------------------------------------------------------


def refused_start(rig: MediaRig, start: bytes) -> Connection:
    connection = rig.connect()
    connection.send(connection.frames.connected(), start)
    assert rig.calls.attached == []
    assert connection.close_code == 4008
    return connection


FORGING_TOKENS = StreamTokens("another-stream-token-secret-0123456789")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no token", "missing"),
        ("garbage", "malformed"),
        ("forged with another secret", "bad-signature"),
        ("issued for another call", "wrong-call"),
        ("start for another call", "wrong-call"),
    ],
)
def test_a_start_without_a_valid_token_is_closed_with_4008(
    clock: Clock, case: str, reason: str, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock)
    frames = TwilioFrames(call_sid=OTHER_CALL_SID if case == "start for another call" else CALL_SID)
    token = {
        "no token": None,
        "garbage": "AAAA",
        "forged with another secret": FORGING_TOKENS.issue(CALL_SID, NOW),
        "issued for another call": rig.token(OTHER_CALL_SID),
        "start for another call": rig.token(CALL_SID),
    }[case]
    connection = refused_start(rig, frames.start(token))
    assert connection.client.closed_with == (True, 4008, f"stream token {reason}")
    (line,) = named(log_events, "media stream refused: bad stream token")
    assert line["reason"] == reason
    if token:
        assert token not in json.dumps(log_events, default=repr)


def test_a_replayed_token_is_refused(clock: Clock) -> None:
    rig = MediaRig(clock)
    token = rig.token()
    first = rig.connect()
    first.send(first.frames.start(token))
    assert len(rig.calls.attached) == 1
    second = rig.connect()
    second.send(second.frames.start(token))
    assert second.client.closed_with == (True, 4008, "stream token replayed")
    assert len(rig.calls.attached) == 1
    first.server.close(1000, "done")
    first.pump.flush()


def test_an_expired_token_is_refused(clock: Clock) -> None:
    rig = MediaRig(clock)
    token = rig.token()
    clock.advance(rig.tokens.ttl_seconds)
    connection = rig.connect()
    connection.send(connection.frames.start(token))
    assert connection.client.closed_with == (True, 4008, "stream token expired")


def test_a_stream_of_another_account_is_refused(
    clock: Clock, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock, make_settings(account_sid=ACCOUNT))
    connection = refused_start(rig, TwilioFrames(account="AC" + "f" * 32).start(rig.token()))
    assert connection.client.closed_with == (True, 4008, "wrong account")
    assert named(log_events, "media stream refused: wrong account")
    # The token was not spent by the refused stream: the genuine one still attaches.
    good = rig.connect()
    good.send(good.frames.start(rig.token()))
    assert len(rig.calls.attached) == 1
    good.server.close(1000, "done")
    good.pump.flush()


def test_a_stream_the_switchboard_refuses_is_closed(clock: Clock) -> None:
    rig = MediaRig(clock, calls=FakeCalls(admit=False))
    connection = rig.connect()
    connection.send(connection.frames.start(rig.token()))
    assert len(rig.calls.attached) == 1
    assert connection.client.closed_with == (True, 4008, "call not admitted")


def test_no_start_in_time_closes_the_socket(clock: Clock, log_events: list[dict[str, Any]]) -> None:
    rig = MediaRig(clock)
    connection = rig.connect()
    connection.send(connection.frames.connected())
    clock.advance(rig.factory.start_timeout - 0.5)
    connection.pump.flush()
    assert connection.client.closed_with is None
    clock.advance(0.5)
    connection.pump.flush()
    assert connection.client.closed_with == (True, 4008, "no start message")
    assert named(log_events, "no valid start message in time: closing the media socket")


def test_a_valid_start_cancels_the_start_timeout(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    clock.advance(rig.factory.start_timeout * 3)
    connection.pump.flush()
    assert connection.client.closed_with is None
    connection.server.close(1000, "done")
    connection.pump.flush()
    assert connection.close_code == 1000


# -- violations -----------------------------------------------------------------------


def test_violations_are_counted_until_max_violations_closes(
    clock: Clock, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock, make_settings(max_violations="5"))
    connection = rig.connect()
    frames = connection.frames
    connection.send(frames.connected())
    connection.send(frames.media(0))  # before start
    connection.send(frames.start(rig.token()))
    session = rig.calls.session
    connection.send(TwilioFrames(stream_sid="MZother").media(20))  # wrong streamSid
    connection.send(b"\x00\x01binary", binary=True)
    connection.send(b"{not json")
    assert connection.client.closed_with is None
    stats = connection.server._stream.stats.violations
    assert {kind.value: count for kind, count in stats.items()} == {
        "before-start": 1,
        "wrong-stream-sid": 1,
        "binary-frame": 1,
        "malformed-json": 1,
    }
    connection.send(b"[]")  # the fifth
    assert connection.client.closed_with == (
        True,
        4008,
        "too many protocol violations (last: not-an-object)",
    )
    assert session.closed == [connection.server]
    assert len(named(log_events, "media stream protocol violation")) == 3  # the first few
    (closing,) = named(log_events, "media stream protocol violations: closing the socket")
    assert closing["violations"] == 5
    (closed,) = named(log_events, "media socket closed")
    assert closed["stream"]["violations"]["malformed-json"] == 1


def test_violation_logging_is_bounded(clock: Clock, log_events: list[dict[str, Any]]) -> None:
    rig = MediaRig(clock, make_settings(max_violations="1000"))
    connection = rig.started()
    for _ in range(250):
        connection.client.sendMessage(b"{bad")
    connection.pump.flush()
    totals = [line["total"] for line in named(log_events, "media stream protocol violation")]
    assert totals == [1, 2, 3, 100, 200]
    assert connection.client.closed_with is None
    connection.server.close(1000, "done")
    connection.pump.flush()


def test_frames_after_our_close_are_ignored(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    connection.server.close(1000, "call ended: test")
    # Twilio's frames already in flight cross our close frame.
    connection.client.sendMessage(connection.frames.media(0))
    connection.pump.flush()
    assert rig.calls.session.audio == []
    assert connection.close_code == 1000


# -- the end of a socket ------------------------------------------------------------------


def test_twilio_dropping_the_socket_tells_the_session_once(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    stream = connection.server
    connection.client.dropConnection(abort=True)
    connection.pump.flush()
    session = rig.calls.session
    assert session.closed == [stream]
    assert connection.client.closed_with is not None
    assert connection.client.closed_with[0] is False
    # The session may still try to send: nothing is sent, nothing raises.
    stream.send_media(FRAME)
    stream.send_mark("m")
    stream.send_clear()
    stream.close(1000, "late")
    assert stream.dropped_sends == 3
    assert session.closed == [stream]


def test_a_close_from_twilio_tells_the_session_once(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    connection.client.sendClose(1000)
    connection.pump.flush()
    assert rig.calls.session.closed == [connection.server]
    assert connection.close_code == 1000


def test_the_session_closing_the_stream(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    stream = connection.server
    stream.close(1000, "call ended: vapi-ended")
    stream.close(4008, "a second close is ignored")
    stream.send_media(FRAME)  # dropped: the socket is closing
    connection.pump.flush()
    assert connection.client.closed_with == (True, 1000, "call ended: vapi-ended")
    assert connection.client.received == []
    assert rig.calls.session.closed == [stream]


def test_a_session_that_raises_closes_the_socket_with_4011(
    clock: Clock, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    rig.calls.session.raise_on_audio = True
    connection.send(connection.frames.media(0))
    assert connection.client.closed_with == (True, 4011, "internal error")
    (line,) = named(log_events, "media stream event failed; closing the socket")
    assert "log_failure" in line
    assert line["call_sid"] == CALL_SID
    assert line["stream_sid"] == STREAM_SID
    assert rig.calls.session.closed == [connection.server]


def test_factory_options_follow_the_settings(clock: Clock) -> None:
    rig = MediaRig(clock, make_settings(max_message_size="2048"))
    factory = rig.factory
    assert factory.protocol is MediaStreamProtocol
    assert factory.maxMessagePayloadSize == factory.maxFramePayloadSize == 2048
    assert factory.autoPingInterval == 0
    assert factory.openHandshakeTimeout == 10
    assert factory.closeHandshakeTimeout == 5
    assert factory.public_stream_url == STREAM_URL


def test_an_oversized_message_is_refused_by_autobahn(clock: Clock) -> None:
    """Autobahn enforces max_message_size itself and fails the connection by dropping
    the TCP (its failByDrop default): Twilio sees an abrupt close (1006)."""
    rig = MediaRig(clock, make_settings(max_message_size="2048"))
    connection = rig.started()
    connection.send(connection.frames.media(0, payload=bytes(4096)))
    assert connection.client.closed_with is not None
    assert connection.client.closed_with[:2] == (False, 1006)
    assert rig.calls.session.audio == []
    assert rig.calls.session.closed == [connection.server]


# -- outbound calls: the token is bound to the outboundRef, the CallSid to the entry -------


def reserve_outbound(rig: MediaRig, call_sid: str | None = CALL_SID) -> OutboundCall:
    """A pending outbound call (as the admin API reserves it), placed as ``call_sid``."""
    call = rig.outbound.reserve(
        caller="+15550002222",
        called="+15550001111",
        choice=AssistantById("asst-outbound"),
        variables={"name": "Ada"},
        now=rig.clock.seconds(),
    )
    if call_sid is not None:
        assert rig.outbound.placed(call.reference, call_sid, rig.clock.seconds()) is not None
    return call


def outbound_start(rig: MediaRig, call: OutboundCall, token: str | None = "issue",
                   frames: TwilioFrames | None = None) -> bytes:
    """The ``start`` Twilio sends for the outbound TwiML (no CallSid parameter)."""
    if token == "issue":
        token = rig.tokens.issue(call.reference, rig.clock.seconds())
    frames = frames or TwilioFrames()
    custom = {"outboundRef": call.reference, "From": call.caller, "To": call.called}
    start = json.loads(frames.start(token, **custom))
    del start["start"]["customParameters"]["CallSid"]
    return _json(start)


def test_an_outbound_stream_starts_with_a_token_for_its_reference(clock: Clock) -> None:
    rig = MediaRig(clock, outbound=True)
    call = reserve_outbound(rig)
    connection = rig.connect()
    connection.send(connection.frames.connected(), outbound_start(rig, call))
    ((opened, started),) = rig.calls.opened_outbound
    assert opened.reference == call.reference
    assert opened.call_sid == CALL_SID
    assert opened.choice == AssistantById("asst-outbound")
    assert started.call_sid == CALL_SID
    ((stream, _),) = rig.calls.attached
    assert stream is connection.server
    assert len(rig.outbound) == 0  # the reference is consumed
    connection.send(connection.frames.media(0))
    assert rig.calls.session.audio == [Audio(FRAME, 0)]
    connection.server.close(1000, "done")
    connection.pump.flush()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("start for another call", "outbound call wrong-call"),
        ("create not answered yet", "outbound call not-placed"),
        ("unknown reference", "outbound call unknown"),
        ("expired reference", "outbound call expired"),
        ("token issued for the CallSid", "stream token wrong-call"),
        ("token of another reference", "stream token wrong-call"),
        ("no token", "stream token missing"),
        ("forged token", "stream token bad-signature"),
    ],
)
def test_a_bad_outbound_start_is_closed_with_4008(
    clock: Clock, case: str, reason: str, log_events: list[dict[str, Any]]
) -> None:
    rig = MediaRig(clock, outbound=True)
    call = reserve_outbound(rig, None if case == "create not answered yet" else CALL_SID)
    other = reserve_outbound(rig, OTHER_CALL_SID)
    frames = TwilioFrames(call_sid=OTHER_CALL_SID if case == "start for another call" else CALL_SID)
    token: str | None = "issue"
    if case == "unknown reference":
        call = OutboundCall("OB" + "0" * 32, call.caller, call.called, call.choice, {}, 0.0)
    elif case == "expired reference":
        token = rig.tokens.issue(call.reference, clock.seconds())
        clock.advance(rig.tokens.ttl_seconds)
    elif case == "token issued for the CallSid":
        token = rig.tokens.issue(CALL_SID, clock.seconds())
    elif case == "token of another reference":
        token = rig.tokens.issue(other.reference, clock.seconds())
    elif case == "no token":
        token = None
    elif case == "forged token":
        token = FORGING_TOKENS.issue(call.reference, clock.seconds())
    connection = rig.connect()
    connection.send(connection.frames.connected(), outbound_start(rig, call, token, frames))
    assert connection.client.closed_with == (True, 4008, reason)
    assert rig.calls.attached == []
    assert rig.calls.opened_outbound == []
    refused = [e for e in log_events if str(e.get("event", "")).startswith("media stream refused")]
    assert len(refused) == 1
    if token:
        assert token not in json.dumps(log_events, default=repr)


def test_a_refused_outbound_start_leaves_the_entry_for_the_genuine_stream(clock: Clock) -> None:
    rig = MediaRig(clock, outbound=True)
    call = reserve_outbound(rig)
    token = rig.tokens.issue(call.reference, clock.seconds())
    intruder = rig.connect()
    intruder.send(outbound_start(rig, call, token, TwilioFrames(call_sid=OTHER_CALL_SID)))
    assert intruder.client.closed_with == (True, 4008, "outbound call wrong-call")
    genuine = rig.connect()
    genuine.send(outbound_start(rig, call, token))
    assert len(rig.calls.attached) == 1
    genuine.server.close(1000, "done")
    genuine.pump.flush()


def test_a_replayed_outbound_start_is_refused(clock: Clock) -> None:
    rig = MediaRig(clock, outbound=True)
    call = reserve_outbound(rig)
    start = outbound_start(rig, call)
    first = rig.connect()
    first.send(start)
    assert len(rig.calls.attached) == 1
    second = rig.connect()
    second.send(start)
    assert second.client.closed_with == (True, 4008, "outbound call unknown")
    assert len(rig.calls.attached) == 1
    first.server.close(1000, "done")
    first.pump.flush()


def test_an_outbound_start_without_outbound_calls_is_refused(clock: Clock) -> None:
    rig = MediaRig(clock)  # the factory has no pending outbound calls
    call = reserve_outbound(rig)
    connection = rig.connect()
    connection.send(outbound_start(rig, call))
    assert connection.client.closed_with == (True, 4008, "outbound call unknown")
    assert rig.calls.attached == []


def test_an_outbound_call_the_switchboard_does_not_admit_is_closed(clock: Clock) -> None:
    rig = MediaRig(clock, calls=FakeCalls(admit=False), outbound=True)
    call = reserve_outbound(rig)
    connection = rig.connect()
    connection.send(outbound_start(rig, call))
    assert len(rig.calls.opened_outbound) == 1
    assert connection.client.closed_with == (True, 4008, "call not admitted")
    assert len(rig.outbound) == 0


# -- with the real switchboard, after a real voice webhook ---------------------------------


class PendingVapi:
    """Vapi call creation that never finishes: the phone leg is what is under test."""

    def __init__(self) -> None:
        self.requests = 0

    def create_call(self, choice: Any, audio: Any, overrides: Any = None) -> Deferred[Any]:
        self.requests += 1
        return Deferred()


def no_links(session: CallSession, created: CreatedCall) -> VapiLink:
    raise AssertionError("no Vapi link in this test")


def test_voice_webhook_then_stream_with_the_real_switchboard(clock: Clock) -> None:
    settings = make_settings()
    registry = InMemoryCallRegistry()
    admission = Admission(registry, 5)
    vapi = PendingVapi()
    switchboard = Switchboard(settings, registry, admission, clock, vapi, no_links, None)
    validator = signature_validator_from(settings)
    tokens = stream_tokens_from(settings)
    app = Klein()
    TwilioRoutes(
        settings,
        validator=validator,
        tokens=tokens,
        twiml=twiml_answers_from(settings),
        admission=admission,
        calls=switchboard,
        clock=clock,
    ).register(app)
    factory = media_stream_factory(
        settings, validator=validator, tokens=tokens, calls=switchboard, clock=clock
    )
    factory.register(app)

    # The voice webhook, signed over the public URL.
    params = {
        "CallSid": CALL_SID,
        "AccountSid": ACCOUNT,
        "From": "+15550001111",
        "To": "+15550002222",
    }
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC + "/twilio/voice", params)
    stub: Any = StubTreq(app.resource())
    responses: list[Any] = []
    stub.post(
        "http://10.0.0.5/twilio/voice",
        data=urlencode(params).encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        },
    ).addCallback(stub.content).addCallback(responses.append)
    twiml = responses[0].decode()
    token = twiml.split('name="streamToken" value="')[1].split('"')[0]
    session = switchboard.get(CALL_SID)
    assert session is not None
    assert vapi.requests == 1
    assert len(registry) == 1

    # Twilio opens the stream the TwiML named.
    connection = connect_twilio(Site(app.resource(), reactor=clock), clock)
    frames = connection.frames
    connection.send(frames.connected(), frames.start(token), frames.media(0), frames.media(20))
    assert session.stream is connection.server
    assert session.stream_sid == STREAM_SID
    assert session.counters.uplink_dropped_frames == 2  # no Vapi link yet
    connection.send(frames.stop())
    assert session.ended
    assert session.cause == "twilio-stop"
    assert len(registry) == 0
    assert connection.close_code == 1000


# -- back-pressure ------------------------------------------------------------------------


def test_the_protocol_is_its_transports_streaming_producer(clock: Clock) -> None:
    rig = MediaRig(clock)
    connection = rig.started()
    server = connection.server
    assert connection.server_transport.producer is server
    assert connection.server_transport.streamingProducer
    assert IPushProducer.providedBy(server)
    session = rig.calls.session
    server.pauseProducing()
    server.pauseProducing()  # said twice, told once
    assert server.writing_paused and server.write_pauses == 1
    assert session.pauses == [True]
    server.resumeProducing()
    server.resumeProducing()
    assert not server.writing_paused and session.pauses == [True, False]
    connection.send(connection.frames.stop())
    assert connection.server_transport.producer is None  # let go before the close


class _NoPolling:
    """Enough of IReactorFDSet for a descriptor nobody polls: doWrite is called by hand."""

    def addReader(self, reader: object) -> None: ...

    def addWriter(self, writer: object) -> None: ...

    def removeReader(self, reader: object) -> None: ...

    def removeWriter(self, writer: object) -> None: ...


class BackedUpSocket(abstract.FileDescriptor):
    """Twisted's own write buffer and producer handling (``FileDescriptor``) over a
    socket that takes nothing until ``taking``: a TCP transport whose peer stopped
    reading.  Only ``tcp.Server`` gets the fast path's direct writes, so every write
    goes through ``FileDescriptor.write`` here."""

    bufferSize = 4096
    protocol: Any = None

    def __init__(self) -> None:
        super().__init__(reactor=cast(Any, _NoPolling()))
        self.connected = 1
        self.taking = False
        self.sent = bytearray()

    def writeSomeData(self, data: bytes) -> int:
        if not self.taking:
            return 0
        self.sent += data
        return len(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "10.0.0.9", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "10.0.0.1", 443)


@implementer(IPushProducer)
class UpgradeChannel:
    """Stands in for the HTTP channel that served the upgrade: it registered itself as
    the transport's producer, and Autobahn's takeover leaves it there."""

    def pauseProducing(self) -> None:
        raise AssertionError("the HTTP channel no longer owns the socket")

    resumeProducing = stopProducing = pauseProducing


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client-to-server frame (payloads under 64 KiB)."""
    length = len(payload)
    header = bytes([0x80 | opcode]) + (
        bytes([0x80 | length]) if length <= 125 else b"\xfe" + length.to_bytes(2, "big"))
    mask = os.urandom(4)
    return header + mask + xor_mask(mask, payload)


def test_a_full_write_buffer_pauses_the_session_until_it_drains(clock: Clock) -> None:
    rig = MediaRig(clock)
    transport = BackedUpSocket()
    transport.registerProducer(UpgradeChannel(), True)
    server = rig.factory.buildProtocol(transport.getPeer())
    transport.protocol = server
    server.makeConnection(transport)
    assert transport.producer is server  # it took the HTTP channel's place
    key = base64.b64encode(os.urandom(16)).decode()
    server.dataReceived(
        ("GET /twilio/media HTTP/1.1\r\nHost: gw.example.com\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
         f"Sec-WebSocket-Version: 13\r\nX-Twilio-Signature: {ws_signature()}\r\n\r\n"
         ).encode())
    frames = TwilioFrames()
    server.dataReceived(client_frame(frames.connected())
                        + client_frame(frames.start(rig.token())))
    session = rig.calls.session

    sent = 0
    while not server.writing_paused and sent < 100:  # Twilio reads nothing
        server.send_media(FRAME)
        sent += 1
    assert server.writing_paused and session.pauses == [True]
    buffered = transport._tempDataLen + len(transport.dataBuffer)
    assert 4096 < buffered < 4096 + 400  # paused one frame past bufferSize: bounded
    transport.taking = True  # Twilio reads again: Twisted drains its buffer
    assert transport.doWrite() is None
    assert not server.writing_paused and session.pauses == [True, False]
    assert transport.sent.count(b'"event":"media"') == sent

    transport.taking = False
    while not server.writing_paused:
        server.send_media(FRAME)
    # Twilio closes while we are paused: the close completes once the buffer drains
    # (a paused producer left registered would hold Twisted's loseConnection back)
    server.dataReceived(client_frame((1000).to_bytes(2, "big"), opcode=8))
    assert transport.disconnecting and transport.producer is None
    transport.taking = True
    assert transport.doWrite() is main.CONNECTION_DONE
    server.connectionLost(Failure(ConnectionDone()))
    assert session.closed == [server]
