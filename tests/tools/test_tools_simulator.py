"""The call simulator, deterministically: its sans-io cores on integer nanoseconds, and
whole calls on a Clock against the gateway's real routes, media socket and switchboard
(StubTreq for HTTP, iosim for the socket, a scripted Vapi link), and against a fake
gateway server that sends crafted frames.

Every rig runs an event loop that jumps the Clock straight to the next delayed call
and pumps the in-memory connections after each step: no sleeps, no real time.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl

import known_secrets
import msgspec
import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from ini import minimal_ini
from inmemory import pipe, result_of, txaio_on
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from gateway.admission import Admission
from gateway.audio import mulaw
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.bridge.switchboard import PlayoutClock, Switchboard
from gateway.config import Settings, parse_settings
from gateway.tools.daemon_process import DaemonProcess, free_port
from gateway.tools.simulator import (
    CallerAudio,
    CallReport,
    CallScenario,
    GatewayTarget,
    MediaClock,
    SimulatedCall,
    render_text,
    run_calls,
    summarize,
    to_json,
)
from gateway.tools.simulator.cli import parse_arguments, plan_run
from gateway.tools.simulator.downlink import GatewayMessageChecker, ViolationLog
from gateway.tools.simulator.playout import TwilioPlayout
from gateway.tools.simulator.twiml_reader import read_twiml
from gateway.tools.simulator.uplink import CallerTimeline, TwilioStreamMessages, UplinkClock
from gateway.tools.simulator.wav import (
    SILENCE_FRAME,
    read_wav_as_mulaw,
    write_wav,
)
from gateway.tools.simulator.webhooks import TwilioSigner, voice_form
from gateway.twilio.media import media_stream_factory
from gateway.twilio.routes import (
    TwilioRoutes,
    signature_validator_from,
    stream_tokens_from,
    twiml_answers_from,
)
from gateway.twilio.signature import TwilioSignatureValidator, parse_form_body
from gateway.twilio.twiml import TwimlAnswers
from gateway.vapi.calls import CreatedCall, SocketUrl
from gateway.vapi.codec import SpeechUpdate, UserInterrupted
from gateway.vapi.link import Closed, Connecting, LinkClosedReason, LinkState, Open

CLIPS = Path(__file__).resolve().parents[3] / "shared" / "audio"
"""The shared speech clips: gateway/tools/clips packages only the 8 kHz mu-law ones."""

AUTH_TOKEN = known_secrets.TWILIO_AUTH_TOKEN
PUBLIC = "https://gw.example.com"
STREAM_URL = "wss://gw.example.com/twilio/media"
LOCAL = "http://127.0.0.1:8080"
MS = 1_000_000
FRAME_NS = 20 * MS
T0 = 1_000 * 1_000_000_000
TONE = bytes([0x10, 0x90]) * 80  # a loud 160-byte mu-law frame
QUIET = bytes([0x7E]) * 160  # near-silence that is not 0xFF


# -- the event loop of the in-memory rigs ------------------------------------------------


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    clock.advance(1000)
    with txaio_on(clock):
        yield clock


class Network:
    """In-memory TCP: connects Autobahn client factories to a server factory over iosim."""

    def __init__(self, clock: Clock, server_factory: Callable[[], Any]) -> None:
        self.clock = clock
        self.server_factory = server_factory
        self.pumps: list[iosim.IOPump] = []
        self.addresses: list[Any] = []

    def connect(self, factory: Any, address: Any) -> Deferred[Any]:
        self.addresses.append(address)
        server = self.server_factory()
        client = factory.buildProtocol(None)
        self.pumps.append(pipe(server, client, self.clock))
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def run_until(self, done: Deferred[Any], limit_s: float = 120.0) -> None:
        """Jump the Clock from delayed call to delayed call, pumping after each step."""
        deadline = self.clock.seconds() + limit_s
        while True:
            self.flush()
            if done.called:
                return
            pending = [call.getTime() for call in self.clock.getDelayedCalls()]
            assert pending, "nothing left to happen, but the run has not finished"
            upcoming = min(pending)
            assert upcoming <= deadline, "the run did not finish in time"
            self.clock.advance(max(0.0, upcoming - self.clock.seconds()))

    def settle(self) -> None:
        """Let Autobahn's bucketed close timers expire; nothing may be left after."""
        self.clock.advance(60)
        self.flush()
        assert self.clock.getDelayedCalls() == []


# -- the gateway in memory, with a scripted Vapi ------------------------------------------


@dataclass
class ScriptedLink:
    """A Vapi call socket that opens at once and then follows the test's script."""

    owner: Any
    clock: Clock
    state: LinkState = field(default_factory=lambda: Connecting(0, 1))
    audio_in: list[bytes] = field(default_factory=list)
    stops: int = 0

    def start(self) -> None:
        self.clock.callLater(0.03, self._open)

    def _open(self) -> None:
        if isinstance(self.state, Connecting):
            old, self.state = self.state, Open(1)
            self.owner.on_link_transition(old, self.state)
            self.owner.on_link_open()

    def say(self, at_s: float, audio: bytes, *, burst_ms: int = 200,
            every_ms: int = 100) -> None:
        """Send ``audio`` from ``at_s``: ``burst_ms`` of it every ``every_ms`` (faster than
        real time, as Vapi does), then the assistant's speech-update stopped."""
        burst = burst_ms * 8
        chunks = [audio[i : i + burst] for i in range(0, len(audio), burst)]
        for n, chunk in enumerate(chunks):
            self.clock.callLater(at_s + n * every_ms / 1000, self._audio, chunk)
        self.clock.callLater(at_s + len(chunks) * every_ms / 1000, self._event,
                             SpeechUpdate(status="stopped", role="assistant"))

    def interrupt(self, at_s: float) -> None:
        self.clock.callLater(at_s, self._event, UserInterrupted())

    def _audio(self, chunk: bytes) -> None:
        if isinstance(self.state, Open):
            self.owner.on_link_audio(chunk)

    def _event(self, event: Any) -> None:
        if isinstance(self.state, Open):
            self.owner.on_link_event(event)

    def stop(self) -> Deferred[LinkClosedReason]:
        self.stops += 1
        self.state = Closed(LinkClosedReason.STOPPED)
        self.owner.on_link_closed(LinkClosedReason.STOPPED)
        return succeed(LinkClosedReason.STOPPED)

    def send_audio(self, audio: bytes) -> bool:
        if not isinstance(self.state, Open):
            return False
        self.audio_in.append(audio)
        return True

    def send_message(self, message: Any) -> bool:
        return isinstance(self.state, Open)

    def when_open(self) -> Deferred[None]:
        return succeed(None)


class InstantVapi:
    def __init__(self) -> None:
        self.created = 0

    def create_call(self, choice: Any, audio: Any, overrides: Any = None
                    ) -> Deferred[CreatedCall]:
        self.created += 1
        return succeed(CreatedCall(f"vapi-{self.created}",
                                   SocketUrl(f"ws://127.0.0.1:9/{self.created}/transport")))


def gateway_settings(**sections: dict[str, str]) -> Settings:
    gateway = {"public_url": PUBLIC, **sections.pop("gateway", {})}
    return parse_settings(minimal_ini(gateway=gateway, **sections), "gw.ini", {})


class GatewayRig:
    """The gateway's Twilio routes, media socket and switchboard on a Clock."""

    def __init__(self, clock: Clock, script: Callable[[ScriptedLink], None] | None = None,
                 **sections: dict[str, str]) -> None:
        self.clock = clock
        self.settings = gateway_settings(**sections)
        self.script = script
        registry = InMemoryCallRegistry()
        self.registry = registry
        admission = Admission(registry, self.settings.gateway.max_concurrent_calls)
        self.links: list[ScriptedLink] = []
        self.switchboard = Switchboard(self.settings, registry, admission, clock, InstantVapi(),
                                       self._link, None)
        validator = signature_validator_from(self.settings)
        tokens = stream_tokens_from(self.settings)
        app = Klein()
        TwilioRoutes(self.settings, validator=validator, tokens=tokens,
                     twiml=twiml_answers_from(self.settings), admission=admission,
                     calls=self.switchboard, clock=clock).register(app)
        media_stream_factory(self.settings, validator=validator, tokens=tokens,
                             calls=self.switchboard, clock=clock).register(app)
        self.site = Site(app.resource(), reactor=clock)
        self.http = RecordingHttp(StubTreq(app.resource()))
        self.network = Network(clock, lambda: self.site.buildProtocol(
            IPv4Address("TCP", "10.0.0.9", 40000)))
        self.playout_clock = PlayoutClock(self.switchboard, clock)
        self.playout_clock.startService()
        self.target = GatewayTarget.from_settings(self.settings, url=LOCAL)

    def _link(self, owner: Any, created: CreatedCall) -> ScriptedLink:
        link = ScriptedLink(owner, self.clock)
        if self.script is not None:
            self.script(link)
        self.links.append(link)
        return link

    def run(self, scenario: CallScenario, **options: Any) -> list[CallReport]:
        done = run_calls(scenario, self.target, clock=self.clock, http=self.http,
                         connect_socket=self.network.connect, **options)
        self.network.run_until(done)
        reports: list[CallReport] = result_of(done)
        self.playout_clock.stopService()
        self.network.settle()
        assert len(self.registry) == 0
        return reports


class RecordingHttp:
    """A treq-like client that writes down every request it forwards."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append((url, dict(kwargs["headers"]), kwargs["data"]))
        return cast(Deferred[Any], self.inner.post(url, **kwargs))

    def forms(self, path: str) -> list[dict[str, str]]:
        return [dict(parse_qsl(body.decode(), keep_blank_values=True))
                for url, _, body in self.requests if url.endswith(path)]


def agent_audio(ms: int) -> bytes:
    return TONE * (ms // 20)


# -- a fake gateway that sends crafted frames ----------------------------------------------


class FakeGatewaySocket(WebSocketServerProtocol):
    """The fake gateway's end of a media socket."""

    def onConnect(self, request: Any) -> str | None:
        gateway: FakeGateway = self.factory.gateway
        gateway.upgrades.append(request)
        if gateway.refuse_upgrade:
            from autobahn.websocket.types import ConnectionDeny
            raise ConnectionDeny(403, "forbidden")
        gateway.socket = self
        return None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        gateway: FakeGateway = self.factory.gateway
        message = json.loads(payload)
        gateway.received.append((gateway.clock.seconds(), message))
        if message["event"] == "start":
            gateway.on_start(self)
        elif message["event"] == "stop" and gateway.close_on_stop:
            self.sendClose(1000, "stream stopped")


class FakeGateway:
    """Voice webhook, callbacks and a media socket whose frames the test writes."""

    def __init__(self, clock: Clock, *, refuse_upgrade: bool = False,
                 close_on_stop: bool = True, twiml: str | None = None) -> None:
        self.clock = clock
        self.refuse_upgrade = refuse_upgrade
        self.close_on_stop = close_on_stop
        self.twiml = twiml
        self.upgrades: list[Any] = []
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.socket: FakeGatewaySocket | None = None
        self.script: list[tuple[float, bytes, bool]] = []  # (delay after start, frame, binary)
        self.answers = TwimlAnswers(
            stream_url=STREAM_URL, stream_status_callback_url=PUBLIC + "/twilio/stream-status",
            fallback_message="Sorry, goodbye.", busy_message="All lines are busy.")
        app = Klein()
        app.route("/twilio/voice", methods=["POST"])(self._voice)
        app.route("/twilio/status", methods=["POST"])(self._no_content)
        app.route("/twilio/stream-status", methods=["POST"])(self._no_content)
        self.http = RecordingHttp(StubTreq(app.resource()))
        factory = WebSocketServerFactory()
        factory.protocol = FakeGatewaySocket
        factory.gateway = self  # type: ignore[attr-defined]
        self.network = Network(clock, lambda: factory.buildProtocol(None))
        self.target = GatewayTarget(public_url=PUBLIC, auth_token=AUTH_TOKEN, url=LOCAL)

    def _voice(self, request: IRequest) -> bytes:
        if self.twiml is not None:
            return self.twiml.encode()
        form = parse_form_body(request.content.read())  # type: ignore[union-attr]
        return self.answers.connect(call_sid=form[b"CallSid"][0].decode(), caller="+1",
                                    called="+2", stream_token="token-1").encode()

    @staticmethod
    def _no_content(request: IRequest) -> bytes:
        request.setResponseCode(204)
        return b""

    def send_after_start(self, delay_s: float, frame: bytes, binary: bool = False) -> None:
        self.script.append((delay_s, frame, binary))

    def on_start(self, socket: FakeGatewaySocket) -> None:
        for delay, frame, binary in self.script:
            self.clock.callLater(delay, self._send, socket, frame, binary)

    @staticmethod
    def _send(socket: FakeGatewaySocket, frame: bytes, binary: bool) -> None:
        if socket.state == WebSocketServerProtocol.STATE_OPEN:
            socket.sendMessage(frame, isBinary=binary)

    def run(self, scenario: CallScenario, **options: Any) -> CallReport:
        done = run_calls(scenario, self.target, clock=self.clock, http=self.http,
                         connect_socket=self.network.connect, **options)
        self.network.run_until(done)
        (report,) = result_of(done)
        self.network.settle()
        return cast(CallReport, report)

    def messages(self, event: str) -> list[dict[str, Any]]:
        return [message for _, message in self.received if message["event"] == event]

    def stream_sid(self) -> str:
        (start,) = self.messages("start")
        return cast(str, start["streamSid"])


def gw_media(stream_sid: str, payload: bytes = TONE) -> bytes:
    return json.dumps({"event": "media", "streamSid": stream_sid,
                       "media": {"payload": base64.b64encode(payload).decode()}}).encode()


def gw_mark(stream_sid: str, name: str) -> bytes:
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).encode()


def gw_clear(stream_sid: str) -> bytes:
    return json.dumps({"event": "clear", "streamSid": stream_sid}).encode()


STREAM_SID = "MZ" + "a" * 32
CALL_SID = "CA" + "b" * 32


def fake_call(gateway: FakeGateway, scenario: CallScenario | None = None) -> CallReport:
    call = SimulatedCall(scenario or CallScenario(duration_ms=1000), gateway.target,
                         clock=gateway.clock, http=gateway.http,
                         connect_socket=gateway.network.connect,
                         call_sid=CALL_SID, stream_sid=STREAM_SID)
    done = call.run()
    gateway.network.run_until(done)
    gateway.network.settle()
    return cast(CallReport, result_of(done))


# -- signatures, URLs and the webhook forms -------------------------------------------------


def test_signatures_match_twilios_documented_example() -> None:
    signer = TwilioSigner("12345")
    # The current edition of Twilio's security docs (the reference notes mix two editions).
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675310", "Digits": "1234",
              "From": "+14158675310", "To": "+18005551212"}
    assert signer.sign_form("https://example.com/myapp.php?foo=1&bar=2", params) == (
        "L/OH5YylLD5NRKLltdqwSvS0BnU=")
    validator = TwilioSignatureValidator(AUTH_TOKEN)
    assert validator.check_websocket(STREAM_URL, TwilioSigner(AUTH_TOKEN).sign_websocket(
        STREAM_URL)).ok


def test_public_urls_map_onto_the_connect_url() -> None:
    target = GatewayTarget(public_url="https://example.com/gw", auth_token="t",
                           url="http://127.0.0.1:8080")
    assert target.voice_url == "https://example.com/gw/twilio/voice"
    assert target.local(target.voice_url) == "http://127.0.0.1:8080/twilio/voice"
    assert target.local("wss://example.com/gw/twilio/media") == "ws://127.0.0.1:8080/twilio/media"
    assert target.local("https://elsewhere.example/x") == "https://elsewhere.example/x"
    assert target.local("https://example.com/gwx") == "https://example.com/gwx"
    assert GatewayTarget(public_url=LOCAL, auth_token="t").local(LOCAL + "/a") == LOCAL + "/a"
    assert "t'" not in repr(target) and "auth_token" not in repr(target)
    with pytest.raises(ValueError, match="auth token"):
        GatewayTarget(public_url=LOCAL, auth_token="")


def test_every_request_is_signed_like_twilios(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    gateway.send_after_start(0.1, gw_media(STREAM_SID))
    report = fake_call(gateway)
    assert report.ok, report
    validator = TwilioSignatureValidator(AUTH_TOKEN)
    paths = []
    for url, headers, body in gateway.http.requests:
        assert url.startswith(LOCAL)
        path = url[len(LOCAL):]
        paths.append(path)
        check = validator.check_form(PUBLIC + path, parse_form_body(body),
                                     headers["X-Twilio-Signature"])
        assert check.ok, (path, check)
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert paths == ["/twilio/voice", "/twilio/stream-status", "/twilio/stream-status",
                     "/twilio/status"]
    (voice,) = gateway.http.forms("/twilio/voice")
    assert voice == {"AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01",
                     "CallSid": CALL_SID, "CallStatus": "ringing", "Called": "+15550002222",
                     "Caller": "+15550001111", "Direction": "inbound",
                     "From": "+15550001111", "To": "+15550002222"}
    (status,) = gateway.http.forms("/twilio/status")
    assert (status["CallStatus"], status["CallSid"], status["CallDuration"]) == (
        "completed", CALL_SID, "1")
    started, stopped = gateway.http.forms("/twilio/stream-status")
    assert (started["StreamEvent"], stopped["StreamEvent"]) == ("stream-started",
                                                               "stream-stopped")
    assert started["StreamSid"] == STREAM_SID
    assert report.end.stream_events == {"stream-started": 204, "stream-stopped": 204}
    assert report.end.status_callback == 204


def test_generated_sids_look_like_twilios() -> None:
    form = voice_form(call_sid="CA1", account_sid="AC1", caller="+1", called="+2")
    assert form["CallStatus"] == "ringing" and form["Direction"] == "inbound"
    call = SimulatedCall(CallScenario(), GatewayTarget(public_url=LOCAL, auth_token="t"),
                         clock=Clock(), http=cast(Any, None), connect_socket=cast(Any, None))
    assert call.call_sid.startswith("CA") and len(call.call_sid) == 34
    assert call.stream_sid.startswith("MZ") and len(call.stream_sid) == 34
    int(call.call_sid[2:], 16)


def test_the_upgrade_is_signed_with_twilios_headers_and_no_subprotocol(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    gateway.send_after_start(0.1, gw_media(STREAM_SID))
    assert fake_call(gateway).ok
    (request,) = gateway.upgrades
    assert request.path == "/twilio/media"
    assert request.headers["user-agent"] == "Twilio.TmeWs/1.0"
    assert request.protocols == []
    assert "origin" not in request.headers
    assert TwilioSignatureValidator(AUTH_TOKEN).check_websocket(
        STREAM_URL, request.headers["x-twilio-signature"]).ok
    (address,) = gateway.network.addresses
    assert (address.host, address.port, address.tls) == ("127.0.0.1", 8080, False)


# -- TwiML -------------------------------------------------------------------------------------


def test_the_gateways_connect_answer_is_read_in_full() -> None:
    answers = TwimlAnswers(stream_url=STREAM_URL,
                           stream_status_callback_url=PUBLIC + "/twilio/stream-status",
                           fallback_message="Sorry, goodbye.", busy_message="Busy.",
                           greeting="Hello there.")
    answer = read_twiml(answers.connect(call_sid=CALL_SID, caller="+1", called="+2",
                                        stream_token="tok"))
    assert answer.kind == "connect"
    assert answer.greeting == ("Hello there.",)
    assert answer.stream is not None
    assert answer.stream.url == STREAM_URL
    assert answer.stream.status_callback == PUBLIC + "/twilio/stream-status"
    assert answer.stream.status_callback_method == "POST"
    assert answer.stream.parameters == {"CallSid": CALL_SID, "From": "+1", "To": "+2",
                                        "streamToken": "tok"}
    assert answer.after_stream == ("Sorry, goodbye.",)
    assert answer.hangup and answer.problems == ()


def test_a_busy_answer_is_recognised() -> None:
    answers = TwimlAnswers(stream_url=STREAM_URL, stream_status_callback_url=None,
                           fallback_message=None, busy_message="All lines are busy.")
    answer = read_twiml(answers.busy())
    assert (answer.kind, answer.greeting, answer.stream, answer.hangup) == (
        "busy", ("All lines are busy.",), None, True)


def test_what_twilio_would_refuse_in_a_stream_is_a_problem() -> None:
    answer = read_twiml(
        '<Response><Connect><Stream url="wss://gw.example.com/m?x=1" track="both_tracks" '
        'statusCallback="ftp://x"><Parameter name="p" value="' + "v" * 500 + '"/></Stream>'
        '<Stream url="wss://gw.example.com/2"/></Connect></Response>')
    assert answer.kind == "connect"
    assert len(answer.problems) == 5, answer.problems
    assert read_twiml("<Response><Say>hi</Say></Response>").kind == "other"
    with pytest.raises(ValueError, match="not XML"):
        read_twiml("<Response>")
    with pytest.raises(ValueError, match="not <Response>"):
        read_twiml("<html/>")


def test_a_busy_gateway_refuses_the_second_call(clock: Clock) -> None:
    rig = GatewayRig(clock, lambda link: link.say(0.1, agent_audio(200)),
                     gateway={"max_concurrent_calls": "1"})
    reports = rig.run(CallScenario(duration_ms=1000), calls=2)
    first, second = reports
    assert first.ok
    assert (second.outcome, second.detail, second.answer.kind) == ("refused", "busy", "busy")
    assert second.answer.greeting == [rig.settings.twilio.busy_message]
    assert second.end.status_callback == 204  # Twilio still reports the call completed
    assert not second.ok
    summary = summarize(reports)
    assert (summary.calls, summary.completed, summary.refused, summary.ok) == (2, 1, 1, 1)
    assert summary.refusals == {"busy": 1}


def test_a_webhook_refused_for_its_signature_is_reported(clock: Clock) -> None:
    rig = GatewayRig(clock)
    rig.target = GatewayTarget(public_url=PUBLIC, auth_token="another-token", url=LOCAL)
    (report,) = rig.run(CallScenario(duration_ms=1000))
    assert (report.outcome, report.detail) == ("refused", "voice webhook answered 403")
    assert report.end.status_callback == 403


# -- the frames Twilio sends ---------------------------------------------------------------


def test_stream_messages_are_numbered_and_shaped_like_twilios() -> None:
    from gateway.twilio.stream import MediaStreamState, Started

    messages = TwilioStreamMessages(stream_sid=STREAM_SID, call_sid=CALL_SID,
                                    account_sid="AC1")
    timeline = CallerTimeline(CallerAudio(TONE))
    frames = [messages.connected(), messages.start({"streamToken": "t", "x": "y"})]
    for index in range(3):
        frames.append(messages.media(index * 20, timeline.frame(index)[0]))
    frames += [messages.mark("g1:p5"), messages.stop()]
    decoded = [json.loads(frame) for frame in frames]
    assert decoded[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert decoded[1] == {
        "event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID,
        "start": {"accountSid": "AC1", "streamSid": STREAM_SID, "callSid": CALL_SID,
                  "tracks": ["inbound"], "customParameters": {"streamToken": "t", "x": "y"},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                  "channels": 1}}}
    assert decoded[2] == {"event": "media", "sequenceNumber": "2", "streamSid": STREAM_SID,
                          "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                                    "payload": base64.b64encode(TONE).decode()}}
    assert [(m["sequenceNumber"], m["media"]["chunk"], m["media"]["timestamp"])
            for m in decoded[3:5]] == [("3", "2", "20"), ("4", "3", "40")]
    assert base64.b64decode(decoded[4]["media"]["payload"]) == SILENCE_FRAME
    assert decoded[5] == {"event": "mark", "sequenceNumber": "5", "streamSid": STREAM_SID,
                          "mark": {"name": "g1:p5"}}
    assert decoded[6] == {"event": "stop", "sequenceNumber": "6", "streamSid": STREAM_SID,
                          "stop": {"accountSid": "AC1", "callSid": CALL_SID}}
    # The gateway's own decoder accepts every frame, in order, without a violation.
    state = MediaStreamState()
    events = [state.receive_frame(frame) for frame in frames]
    assert isinstance(events[1], Started)
    assert state.stats.violations == {} and state.stats.sequence_gaps == 0


def test_the_timeline_puts_the_interruption_over_the_caller_audio() -> None:
    caller = CallerAudio(bytes([1]) * 160 * 5)
    interrupt = CallerAudio(bytes([2]) * 160 * 2)
    timeline = CallerTimeline(caller, audio_at_ms=40, interrupt=interrupt, interrupt_at_ms=80)
    spoken = [(base64.b64decode(timeline.frame(i)[0])[0], timeline.frame(i)[1])
              for i in range(9)]
    assert spoken == [(0xFF, False), (0xFF, False), (1, True), (1, True), (2, True),
                      (2, True), (1, True), (0xFF, False), (0xFF, False)]


# -- the absolute media clock ------------------------------------------------------------


def test_the_uplink_clock_is_absolute_and_catches_up_after_a_late_tick() -> None:
    uplink = UplinkClock(T0)
    assert list(uplink.frames_due(T0)) == [0]
    assert list(uplink.frames_due(T0 + 19 * MS - 1)) == []  # not due yet
    assert list(uplink.frames_due(T0 + 19 * MS)) == [1]  # 1 ms early counts as on time
    assert list(uplink.frames_due(T0 + 20 * MS)) == []
    assert list(uplink.frames_due(T0 + 95 * MS)) == [2, 3, 4]  # a late tick sends all owed
    assert list(uplink.frames_due(T0 + 100 * MS)) == [5]  # and the next is back on the grid
    # Jittery ticks for ten minutes never drift: the frame count follows the time alone.
    sent = 6
    for tick in range(6, 30_000):
        jitter = (tick * 7919) % (15 * MS)
        sent += len(uplink.frames_due(T0 + tick * FRAME_NS + jitter))
    assert sent == uplink.next_frame == 30_000 + (1 if jitter >= 19 * MS else 0)
    assert uplink.skipped_frames == 0
    assert list(uplink.frames_due(T0 + 30_000 * FRAME_NS, limit=29_990)) == []


def test_a_long_stall_skips_the_oldest_frames() -> None:
    uplink = UplinkClock(T0, max_catch_up_frames=10)
    uplink.frames_due(T0)
    assert list(uplink.frames_due(T0 + 1000 * MS)) == list(range(41, 51))
    assert uplink.skipped_frames == 40


def test_media_frames_go_out_on_the_20ms_grid_under_a_clock(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    gateway.send_after_start(0.2, gw_media(STREAM_SID))
    call = SimulatedCall(CallScenario(duration_ms=400), gateway.target, clock=clock,
                         http=gateway.http, connect_socket=gateway.network.connect,
                         stream_sid=STREAM_SID)
    done = call.run()
    gateway.network.flush()
    t0 = clock.seconds()
    for step in (0.02, 0.02, 0.07, 0.01, 0.02):  # one tick 50 ms late
        clock.advance(step)
        gateway.network.flush()
    media = [(at, m["media"]["timestamp"]) for at, m in gateway.received
             if m["event"] == "media"]
    arrivals = [(round((at - t0) * 1000), int(ts)) for at, ts in media]
    assert arrivals == [(0, 0), (20, 20), (40, 40), (110, 60), (110, 80), (110, 100),
                        (120, 120), (140, 140)]
    gateway.network.run_until(done)
    gateway.network.settle()
    report: CallReport = result_of(done)
    assert report.ok
    assert report.frames.sent_media == 20 and report.frames.skipped == 0
    sequence = [int(m["sequenceNumber"]) for _, m in gateway.received if "sequenceNumber" in m]
    assert sequence == list(range(1, len(sequence) + 1))
    assert gateway.messages("stop")


# -- Twilio's playout ---------------------------------------------------------------------


def test_queued_audio_plays_at_8000_bytes_a_second() -> None:
    playout = TwilioPlayout(T0, record=True)
    second = bytes(range(256)) * 31 + bytes(64)  # 8000 bytes
    playout.on_media(second, T0)
    playout.advance(T0 + 500 * MS)
    assert playout.queued_bytes == 8000 - 25 * 160  # slots 0..24 have started
    playout.advance(T0 + 1000 * MS)
    assert playout.queued_bytes == 0
    assert playout.played_slots == 50
    playout.finish(T0 + 1200 * MS)
    assert playout.recording == bytearray(second) + SILENCE_FRAME * 10


def test_a_mark_is_echoed_when_the_audio_before_it_has_played() -> None:
    playout = TwilioPlayout(T0)
    assert list(playout.on_mark("nothing-queued", T0 + 2 * MS)) == ["nothing-queued"]
    assert list(playout.on_media(TONE * 3, T0 + 5 * MS)) == []  # too late for slot 0: 1-3
    assert list(playout.on_mark("m1", T0 + 6 * MS)) == []
    assert list(playout.on_media(TONE, T0 + 7 * MS)) == []
    assert list(playout.on_mark("m2", T0 + 8 * MS)) == []
    assert list(playout.advance(T0 + 78 * MS)) == []
    assert list(playout.advance(T0 + 80 * MS)) == ["m1"]  # slots 1-3 ended at 80 ms
    assert list(playout.advance(T0 + 99 * MS)) == ["m2"]  # slot 4 ended at 100 ms (1 ms slack)
    # A mark sent while its audio's last frame is playing waits for that frame to end.
    assert list(playout.on_media(TONE, T0 + 119 * MS)) == []  # plays in slot 6 (120-140 ms)
    assert list(playout.on_mark("m3", T0 + 125 * MS)) == []
    assert list(playout.advance(T0 + 138 * MS)) == []
    assert list(playout.advance(T0 + 139 * MS)) == ["m3"]
    assert (playout.marks_received, playout.marks_played, playout.pending_marks) == (4, 4, 0)


def test_clear_drops_the_queue_and_echoes_every_pending_mark_at_once() -> None:
    playout = TwilioPlayout(T0, record=True)
    playout.on_media(TONE * 10, T0)
    playout.on_mark("a", T0)
    playout.on_media(TONE * 10, T0)
    playout.on_mark("b", T0)
    assert list(playout.advance(T0 + 50 * MS)) == []
    assert list(playout.on_clear(T0 + 50 * MS)) == ["a", "b"]
    assert playout.marks_flushed == 2 and playout.marks_played == 0
    (clear,) = playout.clears
    assert clear.dropped_ms == 17 * 20  # slots 0-2 started before the clear
    assert clear.marks_flushed == 2 and clear.since_last_media_ms == 50
    assert list(playout.on_mark("c", T0 + 51 * MS)) == []  # slot 2 (40-60 ms) finishes
    assert list(playout.advance(T0 + 60 * MS)) == ["c"]
    playout.finish(T0 + 100 * MS)
    assert playout.recording == bytearray(TONE * 3 + SILENCE_FRAME * 2)


def test_gaps_are_dry_runs_inside_an_utterance() -> None:
    playout = TwilioPlayout(T0, utterance_gap_ms=300)
    playout.on_media(TONE * 5, T0)  # slots 0-4
    playout.on_media(TONE * 5, T0 + 140 * MS)  # after a dry run of slots 5-6: a 40 ms gap
    playout.on_media(TONE * 2, T0 + 600 * MS)  # after 300 ms of silence: a new utterance
    playout.on_media(TONE, T0 + 700 * MS)  # 60 ms dry: a second gap
    playout.on_clear(T0 + 730 * MS)
    playout.on_media(TONE, T0 + 800 * MS)  # after a clear: a new utterance, not a gap
    playout.finish(T0 + 2000 * MS)  # silence at the end is the end of speech
    assert (playout.gap_count, playout.gap_slots, playout.utterances) == (2, 5, 3)
    assert [(gap.at_ms, gap.ms) for gap in playout.gaps] == [(100, 40), (640, 60)]
    assert playout.longest_gap_slots == 3
    assert playout.first_audio_slot == 0 and playout.played_slots == 14


def test_barge_in_measures_the_clear_and_the_audio_after_the_interruption() -> None:
    playout = TwilioPlayout(T0, interrupt_at_ms=1010)  # rounds down to slot 50 (1000 ms)
    playout.on_media(TONE * 100, T0)
    playout.advance(T0 + 1100 * MS)
    assert list(playout.on_clear(T0 + 1130 * MS)) == []
    playout.finish(T0 + 2000 * MS)
    assert playout.speaking_at_interrupt is True
    assert playout.clear_after_interrupt_ns == 130 * MS
    assert playout.slots_after_interrupt == 7  # slots 50-56: the one playing at 1130 finishes
    silent = TwilioPlayout(T0, interrupt_at_ms=200)
    silent.on_media(TONE * 5, T0)
    silent.finish(T0 + 1000 * MS)
    assert (silent.speaking_at_interrupt, silent.slots_after_interrupt) == (False, 0)
    assert silent.clear_after_interrupt_ns is None


def test_first_audio_and_first_audible_audio_are_told_apart() -> None:
    playout = TwilioPlayout(T0)
    playout.on_media(QUIET * 3 + TONE, T0 + 100 * MS)
    playout.finish(T0 + 300 * MS)
    assert playout.first_media_ns == T0 + 100 * MS
    assert (playout.first_audio_slot, playout.first_audible_slot) == (5, 8)


# -- what the gateway sends, checked ---------------------------------------------------------


def test_protocol_violations_are_detected_and_only_valid_frames_play(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    sid = STREAM_SID
    crafted = [
        gw_media(sid),  # fine
        b"\x00\x01",  # binary
        b"{not json",
        b"[1, 2]",
        json.dumps({"event": "stop", "streamSid": sid}).encode(),  # not media/mark/clear
        json.dumps({"event": "media", "media": {"payload": "AAAA"}}).encode(),
        gw_media("MZ-someone-else"),
        gw_media(sid, TONE[:100]),  # plays, but not a whole frame
        json.dumps({"event": "media", "streamSid": sid, "media": {"payload": "!!!"}}).encode(),
        json.dumps({"event": "clear", "streamSid": sid, "extra": 1}).encode(),
        json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": 7}}).encode(),
        json.dumps({"streamSid": sid}).encode(),
        gw_media(sid, b""),
    ]
    for n, frame in enumerate(crafted):
        gateway.send_after_start(0.1 + n * 0.001, frame, binary=frame == b"\x00\x01")
    report = fake_call(gateway)
    assert report.outcome == "completed" and not report.ok
    assert report.violations.by_kind == {
        "binary-frame": 1, "malformed-json": 1, "not-an-object": 1, "unknown-event": 1,
        "missing-stream-sid": 1, "wrong-stream-sid": 1, "partial-frame": 1, "bad-base64": 1,
        "unexpected-field": 1, "wrong-type": 1, "missing-field": 1, "empty-payload": 1,
    }
    assert report.violations.total == 12
    unknown = next(s for s in report.violations.samples if s.kind == "unknown-event")
    assert "'stop'" in unknown.detail and unknown.at_ms is not None
    assert report.frames.received_media == 3  # the good one, the short one, the empty one
    assert report.frames.received_media_bytes == 260
    assert report.frames.received_total == len(crafted)
    assert report.speech.played_ms == 40
    assert "WITH VIOLATIONS" in render_text([report], summarize([report]))


def test_frames_before_start_are_violations(clock: Clock) -> None:
    checker = GatewayMessageChecker(STREAM_SID, ViolationLog())
    assert checker.check(gw_media(STREAM_SID), False, None) is None
    checker.started = True
    assert checker.check(gw_clear(STREAM_SID), False, 5.0) is not None
    assert checker.violations.by_kind == {"before-start": 1}


def test_marks_and_clear_from_the_gateway_are_answered_like_twilio(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    sid = STREAM_SID
    gateway.send_after_start(0.1, gw_media(sid, TONE * 10))  # plays 100-300 ms
    gateway.send_after_start(0.1, gw_mark(sid, "g1:p10"))
    gateway.send_after_start(0.1, gw_media(sid, TONE * 10))
    gateway.send_after_start(0.1, gw_mark(sid, "g1:p20"))
    gateway.send_after_start(0.25, gw_clear(sid))
    report = fake_call(gateway)
    assert report.ok, report
    echoes = [(round((at - gateway.received[0][0]) * 1000), m["mark"]["name"])
              for at, m in gateway.received if m["event"] == "mark"]
    assert echoes == [(250, "g1:p10"), (250, "g1:p20")]  # both flushed by the clear
    assert (report.marks.received, report.marks.echoed_played, report.marks.echoed_by_clear) == (
        2, 0, 2)
    assert report.clears.count == 1
    assert report.clears.samples[0].dropped_ms == 240  # 160 ms played of 400 ms queued


def test_gaps_and_barge_in_are_measured_on_crafted_frames(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    sid = STREAM_SID
    gateway.send_after_start(0.1, gw_media(sid, TONE * 5))  # slots 5-9
    gateway.send_after_start(0.26, gw_media(sid, TONE * 25))  # slots 13-37: a 60 ms gap
    gateway.send_after_start(0.45, gw_clear(sid))  # 50 ms after the caller cut in
    gateway.send_after_start(0.6, gw_media(sid, TONE * 5))  # the answer to the interruption
    report = fake_call(gateway, CallScenario(duration_ms=1000, interrupt_at_ms=400,
                                             interrupt_audio=CallerAudio(TONE * 10)))
    assert report.ok, report
    speech = report.speech
    assert (speech.gaps, speech.gap_ms, speech.utterances, speech.played_ms) == (1, 60, 2, 400)
    assert [(gap.at_ms, gap.ms) for gap in speech.gap_samples] == [(200, 60)]
    assert report.barge_in is not None
    assert (report.barge_in.assistant_speaking, report.barge_in.clear_after_ms,
            report.barge_in.audio_after_interrupt_ms) == (True, 50.0, 60)
    (clear,) = report.clears.samples
    assert (clear.at_ms, clear.dropped_ms, clear.since_last_media_ms) == (450, 300, 190)
    speech_frames = [m for _, m in gateway.received if m["event"] == "media"
                     and base64.b64decode(m["media"]["payload"]) == TONE]
    assert [int(m["media"]["timestamp"]) for m in speech_frames] == list(range(400, 600, 20))


def test_the_gateway_closing_the_stream_first_is_reported(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    gateway.send_after_start(0.2, gw_media(STREAM_SID))

    def close_at_300ms(socket: FakeGatewaySocket) -> None:
        clock.callLater(0.3, socket.sendClose, 4008, "stream token expired")

    gateway.on_start = close_at_300ms  # type: ignore[method-assign]
    report = fake_call(gateway)
    assert (report.outcome, report.end.ended_by, report.end.closed_by) == (
        "failed", "gateway", "gateway")
    assert (report.end.close_code, report.end.close_reason) == (4008, "stream token expired")
    assert report.detail == "the gateway closed the media socket with 4008 'stream token expired'"
    assert report.end.reason == (
        "the gateway ended the call after 0.3 s (closed 4008 'stream token expired')")
    assert report.end.fallback_spoken  # Twilio goes on with the TwiML: the fallback <Say>
    assert report.end.status_callback == 204
    assert report.end.stream_events == {"stream-started": 204, "stream-stopped": 204}
    assert report.timing.duration_ms == 300


def test_a_gateway_that_does_not_close_after_stop_is_caught(clock: Clock) -> None:
    gateway = FakeGateway(clock, close_on_stop=False)
    report = fake_call(gateway, CallScenario(duration_ms=200, close_timeout_s=5))
    assert report.outcome == "failed"
    assert report.detail == "the gateway did not close the media socket within 5 s of stop"
    assert (report.end.ended_by, report.end.closed_by, report.end.close_code) == (
        "caller", "simulator", 1000)


def test_a_refused_upgrade_is_reported(clock: Clock) -> None:
    gateway = FakeGateway(clock, refuse_upgrade=True)
    report = fake_call(gateway)
    assert (report.outcome, report.detail) == ("refused", "media socket upgrade answered 403")
    assert report.end.closed_by is None and report.end.status_callback == 204


def test_a_connect_answer_without_a_stream_fails_and_bad_twiml_counts(clock: Clock) -> None:
    gateway = FakeGateway(clock, twiml="<Response><Connect/><Hangup/></Response>")
    report = fake_call(gateway)
    assert report.outcome == "failed" and report.answer.kind == "other"
    assert report.violations.by_kind == {"bad-twiml": 1}


# -- whole calls against the real gateway pieces ------------------------------------------


def test_a_whole_call_against_the_gateway(clock: Clock, tmp_path: Path) -> None:
    rig = GatewayRig(clock, lambda link: link.say(0.5, agent_audio(1000)))
    caller = CallerAudio(TONE * 50)  # one second of "speech"
    record = tmp_path / "heard.wav"
    (report,) = rig.run(CallScenario(audio=caller, audio_at_ms=100, duration_ms=3000,
                                     record_path=str(record)))
    assert report.ok, report
    assert report.answer.kind == "connect"
    assert report.answer.parameters == ["CallSid", "From", "To", "streamToken"]
    # Vapi speaks 0.5 s after the webhook; the gateway's first tick passes it on at once.
    assert report.timing.first_media_ms is not None and 500 <= report.timing.first_media_ms <= 520
    assert report.timing.first_audio_ms == report.timing.first_audible_ms
    assert (report.speech.played_ms, report.speech.utterances, report.speech.gaps) == (
        1000, 1, 0)
    assert report.marks.received == report.marks.echoed_played == 10
    assert report.frames.sent_media == 150 and report.frames.sent_speech == 50
    assert (report.end.ended_by, report.end.closed_by, report.end.close_code) == (
        "caller", "gateway", 1000)
    assert report.end.close_reason == "call ended: twilio-stop"
    assert report.end.status_callback == 204
    # The caller's speech reached Vapi, frame by frame (the link is open from 30 ms on).
    (link,) = rig.links
    assert b"".join(link.audio_in).count(TONE) == 50
    # The recording is what the caller heard: silence, one second of speech, silence.
    heard = read_wav_as_mulaw(record)
    assert len(heard) == 3 * 8000
    start = report.timing.first_audio_ms
    assert start is not None
    first = int(start * 8)
    assert heard[:first] == SILENCE_FRAME * (first // 160)
    assert heard[first : first + 8000] == TONE * 50
    assert set(heard[first + 8000 :]) == {0xFF}


def test_barge_in_against_the_gateway(clock: Clock) -> None:
    def script(link: ScriptedLink) -> None:
        link.say(0.2, agent_audio(3000))
        link.interrupt(1.5)  # Vapi notices the caller 100 ms after they start

    rig = GatewayRig(clock, script)
    interruption = CallerAudio(TONE * 25)
    (report,) = rig.run(CallScenario(duration_ms=2500, interrupt_audio=interruption,
                                     interrupt_at_ms=1400))
    assert report.ok, report
    barge = report.barge_in
    assert barge is not None and barge.assistant_speaking
    assert barge.clear_after_ms is not None and 100 <= barge.clear_after_ms <= 105
    assert 100 <= barge.audio_after_interrupt_ms <= 120  # until the clear, plus the slot
    assert report.clears.count == 1
    assert report.speech.gaps == 0
    (link,) = rig.links
    assert b"".join(link.audio_in).count(TONE) >= 5  # the interruption went up before the clear


def test_dropping_the_connection_ends_the_call_at_the_gateway(clock: Clock) -> None:
    rig = GatewayRig(clock, lambda link: link.say(0.1, agent_audio(400)))
    (report,) = rig.run(CallScenario(duration_ms=1000, drop=True))
    assert report.ok, report
    assert (report.end.ended_by, report.end.closed_by, report.end.clean) == (
        "caller-drop", "simulator", False)
    assert report.end.close_code == 1006
    assert "stream-stopped" not in report.end.stream_events
    assert rig.switchboard.sessions() == []


def test_many_calls_share_one_media_clock(clock: Clock, tmp_path: Path) -> None:
    rig = GatewayRig(clock, lambda link: link.say(0.3, agent_audio(600)))
    media_clock = MediaClock(clock)
    record = tmp_path / "heard.wav"
    reports = rig.run(CallScenario(duration_ms=1500, record_path=str(record)), calls=20,
                      stagger_s=0.013, media_clock=media_clock)
    assert [r.ok for r in reports] == [True] * 20
    assert reports[6].recording == str(tmp_path / "heard-007.wav")
    assert len(read_wav_as_mulaw(tmp_path / "heard-020.wav")) == 1500 * 8
    assert len({r.call_sid for r in reports}) == 20
    assert not media_clock.running
    assert media_clock.max_tick_interval_ms == 20
    summary = summarize(reports, media_clock.max_tick_interval_ms)
    assert (summary.calls, summary.ok, summary.gaps, summary.violations) == (20, 20, 0, 0)
    assert summary.first_audio_ms is not None and summary.first_audio_ms.count == 20
    text = render_text(reports, summary, brief=True)
    assert text.count("\ncall CA") == 19 and "20 calls: 20 completed" in text


# -- the report -------------------------------------------------------------------------------


def test_the_json_report_has_every_section(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    gateway.send_after_start(0.1, gw_media(STREAM_SID, TONE * 2))
    report = fake_call(gateway, CallScenario(duration_ms=500, interrupt_at_ms=100))
    document = json.loads(to_json([report], summarize([report], 20.0)))
    assert set(document) == {"calls", "summary"}
    (call,) = document["calls"]
    assert set(call) == {"call_sid", "stream_sid", "caller", "called", "outcome", "ok",
                         "detail", "answer", "timing", "speech", "barge_in", "clears",
                         "marks", "violations", "frames", "end", "recording"}
    assert call["timing"] == {"first_media_ms": 100.0, "first_audio_ms": 100,
                              "first_audible_ms": 100, "duration_ms": 500.0}
    assert call["barge_in"] == {"interrupt_at_ms": 100, "assistant_speaking": True,
                                "clear_after_ms": None, "audio_after_interrupt_ms": 40}
    assert set(call["speech"]) == {"played_ms", "utterances", "gaps", "gap_ms",
                                   "longest_gap_ms", "gap_samples", "max_queued_ms"}
    assert set(call["end"]) == {"ended_by", "reason", "closed_by", "close_code",
                                "close_reason", "clean", "fallback_spoken",
                                "status_callback", "status_callbacks", "close_frame_ignored",
                                "dropped_after_close_frame_ms",
                                "status_callback_to_close_ms", "stream_events"}
    assert set(call["frames"]) >= {"sent_media", "received_media", "skipped"}
    assert document["summary"]["first_audio_ms"] == {"count": 1, "p50": 100, "p99": 100,
                                                     "max": 100}
    assert document["summary"]["max_tick_interval_ms"] == 20.0
    assert msgspec.json.decode(to_json([report], summarize([report])))["calls"][0]["ok"]


def test_percentiles_are_nearest_rank() -> None:
    from gateway.tools.simulator.report import percentile

    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile([7.0], 0.99)) == (
        50.0, 99.0, 7.0)


# -- WAV files -------------------------------------------------------------------------------


def test_clips_are_read_from_mulaw_and_16k_pcm() -> None:
    ulaw = read_wav_as_mulaw(CLIPS / "caller_8k_ulaw.wav")
    pcm = read_wav_as_mulaw(CLIPS / "caller_16k.wav")
    assert abs(len(ulaw) - len(pcm)) <= 160
    clip = CallerAudio.from_wav(CLIPS / "interrupt_8k_ulaw.wav")
    assert all(len(frame) == 160 for frame in clip.frames)
    assert clip.duration_ms == len(clip.frames) * 20 > 1000
    assert base64.b64decode(clip.encoded_frames[3]) == clip.frames[3]


@pytest.mark.parametrize("encoding", ["mulaw", "pcm16"])
def test_recordings_round_trip(tmp_path: Path, encoding: str) -> None:
    audio = bytes(range(256)) * 10 + b"\x01"
    path = tmp_path / "heard.wav"
    write_wav(path, audio, encoding)  # type: ignore[arg-type]
    back = read_wav_as_mulaw(path)
    if encoding == "mulaw":
        assert back == audio
    else:  # through 16-bit PCM and back: lossless but for mu-law's two zeros
        assert mulaw.decode(back).tolist() == mulaw.decode(audio).tolist()


def test_unusable_wav_files_are_refused(tmp_path: Path) -> None:
    from gateway.tools.simulator.wav import WavError

    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(WavError, match="not a WAVE file"):
        read_wav_as_mulaw(tmp_path / "text.wav")
    import wave

    with wave.open(str(tmp_path / "stereo.wav"), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(400))
    with pytest.raises(WavError, match="mono"):
        read_wav_as_mulaw(tmp_path / "stereo.wav")


# -- the command line -----------------------------------------------------------------------


def test_the_plan_comes_from_the_gateways_ini(tmp_path: Path) -> None:
    ini = tmp_path / "gw.ini"
    ini.write_text(minimal_ini(gateway={"public_url": PUBLIC},
                               twilio={"auth_token": "env:SIM_TOKEN",
                                       "voice_path": "/tw/voice"}))
    environ = {"SIM_TOKEN": AUTH_TOKEN}
    plan = plan_run(parse_arguments([
        "--config", str(ini), "--url", LOCAL, "--audio", str(CLIPS / "caller_16k.wav"),
        "--interrupt-at", "2.5", "--interrupt-audio", str(CLIPS / "interrupt_8k_ulaw.wav"),
        "--duration", "12", "--hangup-after", "9", "--calls", "3", "--stagger", "0.1",
        "--from", "+15551112222", "--to", "+15553334444", "--record", "x.wav", "--json",
    ]), environ)
    assert plan.target == GatewayTarget(public_url=PUBLIC, auth_token=AUTH_TOKEN, url=LOCAL,
                                        voice_path="/tw/voice")
    scenario = plan.scenario
    assert (scenario.duration_ms, scenario.hangup_after_ms, scenario.end_ms) == (
        12000, 9000, 9000)
    assert (scenario.interrupt_at_ms, scenario.caller, scenario.called) == (
        2500, "+15551112222", "+15553334444")
    assert scenario.audio is not None and scenario.interrupt_audio is not None
    assert (plan.calls, plan.stagger_s, plan.json, scenario.record_path) == (3, 0.1, True,
                                                                               "x.wav")
    flags = plan_run(parse_arguments(["--public-url", PUBLIC, "--auth-token", "env:SIM_TOKEN",
                                      "--audio", "none"]), environ)
    assert flags.target.auth_token == AUTH_TOKEN and flags.target.url == ""
    assert flags.scenario.audio is None


def test_bad_arguments_exit_with_status_2(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    from gateway.tools.simulator import main

    assert main(["--url", LOCAL]) == 2
    assert "Auth Token" in capsys.readouterr().err
    assert main(["--url", LOCAL, "--auth-token", "x", "--calls", "0"]) == 2
    assert main(["--url", LOCAL, "--auth-token", "x", "--audio", str(tmp_path / "no.wav")]) == 2
    (tmp_path / "bad.ini").write_text("[gateway]\nnope = 1\n")
    assert main(["--config", str(tmp_path / "bad.ini")]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_a_call_in_which_the_assistant_never_speaks_fails(clock: Clock) -> None:
    rig = GatewayRig(clock)  # the Vapi link opens but says nothing
    (report,) = rig.run(CallScenario(duration_ms=600))
    assert (report.outcome, report.ok) == ("failed", False)
    assert report.detail == (
        "the assistant never spoke: the caller hung up at the end of the scenario (0.6 s)")



# -- against the real daemon ---------------------------------------------------------------


@pytest.mark.e2e
def test_the_command_against_a_real_daemon(tmp_path: Path, log_capture_path: Path) -> None:
    """The whole network path (treq, Autobahn over TCP, the reactor, the exit status): the
    daemon's Vapi is unreachable, so it answers, streams, then ends the call itself."""
    port, dead_port = free_port(), free_port()
    daemon = DaemonProcess(minimal_ini(
        gateway={"listen": f"tcp:{port}:interface=127.0.0.1",
                 "public_url": f"http://127.0.0.1:{port}"},
        vapi={"api_url": f"http://127.0.0.1:{dead_port}", "request_retries": "0"},
        admin={"listen": f"tcp:{free_port()}:interface=127.0.0.1"}, log={"format": "json"}))
    daemon.start()
    try:
        daemon.wait_ready()
        out = subprocess.run(
            [sys.executable, "-m", "gateway.tools.simulator", "--config", daemon.config_path,
             "--audio", str(CLIPS / "caller_8k_ulaw.wav"), "--duration", "5", "--json"],
            capture_output=True, text=True, timeout=60)
    finally:
        daemon.kill()
        with log_capture_path.open("a", encoding="utf-8") as capture:
            capture.write("\n".join(daemon.lines) + "\n")
    assert out.returncode == 1, out.stderr
    document = json.loads(out.stdout)
    (call,) = document["calls"]
    assert call["outcome"] == "failed"
    assert call["detail"].startswith("the assistant never spoke: the gateway ended the call")
    assert (call["answer"]["webhook_status"], call["answer"]["kind"]) == (200, "connect")
    end = call["end"]
    assert (end["ended_by"], end["closed_by"], end["close_code"]) == ("gateway", "gateway", 1000)
    assert end["close_reason"] == "call ended: vapi-create-failed"
    assert end["fallback_spoken"] and end["status_callback"] == 204
    assert end["stream_events"] == {"stream-started": 204, "stream-stopped": 204}
    assert call["violations"]["total"] == 0 and call["frames"]["sent_media"] >= 1
    assert document["summary"]["failed"] == 1


# -- faults on Twilio's side ------------------------------------------------------------------


def _paths(gateway: FakeGateway) -> list[str]:
    return [url.rsplit("/", 1)[1] for url, _, _ in gateway.http.requests]


def test_fault_flags_become_the_scenario() -> None:
    plan = plan_run(parse_arguments([
        "--public-url", PUBLIC, "--auth-token", "t", "--call-sid", CALL_SID, "--no-stream",
        "--stream-delay", "0.5", "--status-callback", "twice", "--mute-at", "1.5",
        "--stop-without-close", "--stall-reading-at", "1", "--stall-reading-for", "2.5",
    ]), {})
    scenario = plan.scenario
    assert (scenario.call_sid, scenario.open_stream, scenario.stream_delay_ms) == (
        CALL_SID, False, 500)
    assert (scenario.status_callback, scenario.mute_at_ms, scenario.stop_without_close) == (
        "twice", 1500, True)
    assert (scenario.stall_reading_at_ms, scenario.stall_reading_ms) == (1000, 2500)


@pytest.mark.parametrize(("fields", "message"), [
    ({"call_sid": "C"}, "call_sid"),
    ({"stream_delay_ms": -1}, "stream_delay_ms"),
    ({"status_callback": "sometimes"}, "status_callback"),
    ({"mute_at_ms": -20}, "mute_at_ms"),
    ({"stop_without_close": True, "drop": True}, "stop_without_close"),
    ({"stall_reading_ms": 100}, "stall_reading_ms"),
])
def test_bad_fault_scenarios_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CallScenario(**fields)


def test_the_status_callback_can_come_before_the_stream_twice_or_never(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    report = fake_call(gateway, CallScenario(duration_ms=200, status_callback="before-stream"))
    assert _paths(gateway)[:2] == ["voice", "status"] and _paths(gateway).count("status") == 1
    assert report.end.status_callbacks == [204]
    gateway = FakeGateway(clock)
    report = fake_call(gateway, CallScenario(duration_ms=200, status_callback="twice"))
    assert _paths(gateway)[-2:] == ["status", "status"]
    assert report.end.status_callbacks == [204, 204] and report.end.status_callback == 204
    gateway = FakeGateway(clock)
    report = fake_call(gateway, CallScenario(duration_ms=200, status_callback="never"))
    assert "status" not in _paths(gateway) and report.end.status_callbacks == []


def test_no_stream_answers_the_webhook_and_opens_nothing(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    report = fake_call(gateway, CallScenario(open_stream=False))
    assert gateway.upgrades == [] and _paths(gateway) == ["voice", "status"]
    assert report.answer.kind == "connect" and report.end.ended_by == "caller"


def test_the_stream_opens_after_the_delay(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    answered = clock.seconds()
    fake_call(gateway, CallScenario(duration_ms=200, stream_delay_ms=700))
    (start_at, _), = [(at, m) for at, m in gateway.received if m["event"] == "start"]
    assert start_at - answered >= 0.7


def test_muted_media_stops_while_the_socket_stays_open(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    report = fake_call(gateway, CallScenario(duration_ms=1000, mute_at_ms=300))
    assert report.frames.sent_media == 15  # 300 ms of 20 ms frames, then nothing
    assert len(gateway.messages("media")) == 15 and gateway.messages("stop")


def test_stop_without_close_leaves_the_close_frame_unanswered(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    gateway.send_after_start(0.05, gw_media(STREAM_SID))
    report = fake_call(gateway, CallScenario(duration_ms=200, stop_without_close=True))
    assert report.end.close_frame_ignored == 1000 and report.end.closed_by == "gateway"
    assert report.end.clean is False  # the gateway had to drop the connection
    assert report.end.dropped_after_close_frame_ms is not None
    assert report.end.dropped_after_close_frame_ms > 0  # its close handshake timeout
    assert (report.outcome, report.end.ended_by) == ("completed", "caller"), report.detail


def test_one_call_sid_for_several_calls_makes_duplicate_streams(clock: Clock) -> None:
    gateway = FakeGateway(clock)
    done = run_calls(CallScenario(duration_ms=200, call_sid=CALL_SID), gateway.target,
                     clock=clock, http=gateway.http, connect_socket=gateway.network.connect,
                     calls=2)
    gateway.network.run_until(done)
    gateway.network.settle()
    reports = result_of(done)
    assert [report.call_sid for report in reports] == [CALL_SID, CALL_SID]
    assert len({report.stream_sid for report in reports}) == 2
    assert {m["start"]["callSid"] for m in gateway.messages("start")} == {CALL_SID}


# -- the media socket and the status callback sent elsewhere (a cluster) ------------------


def test_the_stream_and_the_status_callback_can_go_to_other_instances(clock: Clock) -> None:
    """--stream-url / --status-url: the webhook goes to one instance, the media socket and
    the status callback to others (signed over the public URL all the same); a status
    callback posted mid-stream (--status-callback-at) is timed to the socket's close."""
    plan = plan_run(parse_arguments([
        "--public-url", PUBLIC, "--auth-token", "t", "--url", LOCAL,
        "--stream-url", "http://127.0.0.1:8081", "--status-url", "http://127.0.0.1:8082/",
        "--status-callback-at", "0.3"]), {})
    target = plan.target
    assert (target.stream_url, target.status_callback_url) == (
        "http://127.0.0.1:8081", "http://127.0.0.1:8082/")
    assert plan.scenario.status_callback_at_ms == 300
    assert target.local(target.voice_url) == LOCAL + "/twilio/voice"
    assert target.local_stream(STREAM_URL) == "ws://127.0.0.1:8081/twilio/media"
    assert target.local_status(target.status_url) == "http://127.0.0.1:8082/twilio/status"
    plain = GatewayTarget(public_url=PUBLIC, auth_token="t", url=LOCAL)
    assert plain.local_stream(STREAM_URL) == "ws://127.0.0.1:8080/twilio/media"
    assert plain.local_status(plain.status_url) == LOCAL + "/twilio/status"
    with pytest.raises(ValueError, match="stream_url"):
        GatewayTarget(public_url=PUBLIC, auth_token="t", stream_url="ws://127.0.0.1:1")
    with pytest.raises(ValueError, match="status_callback_at_ms"):
        CallScenario(status_callback_at_ms=100, status_callback="never")

    gateway = FakeGateway(clock)
    gateway.target = replace(target, auth_token=AUTH_TOKEN)
    gateway.send_after_start(0.1, gw_media(STREAM_SID, TONE * 5))

    def close_the_stream(request: IRequest) -> bytes:  # the call's instance ends it
        assert gateway.socket is not None
        clock.callLater(0.04, gateway.socket.sendClose, 1000, "call ended: twilio-status")
        request.setResponseCode(204)
        return b""

    app = Klein()
    app.route("/twilio/voice", methods=["POST"])(gateway._voice)
    app.route("/twilio/status", methods=["POST"])(close_the_stream)
    app.route("/twilio/stream-status", methods=["POST"])(gateway._no_content)
    gateway.http = RecordingHttp(StubTreq(app.resource()))
    report = fake_call(gateway, replace(plan.scenario, duration_ms=2000, audio=None))
    calls = [(url, headers, body) for url, headers, body in gateway.http.requests
             if "stream-status" not in url]
    assert [url for url, _, _ in calls] == [
        LOCAL + "/twilio/voice", "http://127.0.0.1:8082/twilio/status"]
    (address,) = gateway.network.addresses
    assert (address.host, address.port) == ("127.0.0.1", 8081)
    (_, headers, body) = calls[1]
    assert parse_form_body(body)[b"CallStatus"] == [b"completed"]
    assert TwilioSignatureValidator(AUTH_TOKEN).check_form(
        PUBLIC + "/twilio/status", parse_form_body(body), headers["X-Twilio-Signature"]).ok
    assert (report.outcome, report.end.ended_by, report.end.close_code) == (
        "completed", "gateway", 1000), report.detail
    assert report.end.status_callbacks == [204]  # mid-call only, not again after it
    assert report.end.status_callback_to_close_ms is not None
    assert 40 <= report.end.status_callback_to_close_ms <= 45
    assert report.timing.duration_ms is not None and report.timing.duration_ms < 400
    assert "after the mid-call status callback" in render_text([report], summarize([report]))
