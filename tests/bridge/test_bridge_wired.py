"""The whole daemon in memory: ``build_gateway`` with a Twilio client and a Vapi server
on ``twisted.test.iosim`` sockets, all on one Clock.

Everything between the two sockets is the real thing: the Klein routes, the signed
webhook, the stream token, the Media Streams server, the switchboard and sessions,
the playout clock, Vapi call creation (over StubTreq) and the link driver.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import urlencode
from xml.etree import ElementTree

import known_secrets
import pytest
import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from ini import minimal_ini
from klein import Klein
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.iweb import IRequest

from gateway.config import parse_settings
from gateway.daemon import Gateway, build_gateway

PUBLIC = "http://127.0.0.1:8080"
CALL_SID = "CA" + "5" * 32
TXAIO: Any = txaio
FRAME = 160


class VapiSocket(WebSocketServerProtocol):
    """Vapi's side of one call socket: records what the gateway sends."""

    def onConnect(self, request: Any) -> None:
        self.authorization = request.headers.get("authorization")
        self.audio: list[bytes] = []
        self.texts: list[dict[str, Any]] = []
        self.closed: tuple[bool, int | None] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.audio.append(payload)
        else:
            self.texts.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code)

    def event(self, **fields: Any) -> None:
        self.sendMessage(json.dumps(fields).encode())


class FakeVapi:
    """POST /call over StubTreq, call sockets over iosim."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.sockets: list[VapiSocket] = []
        self.pumps: list[iosim.IOPump] = []
        self.created: list[dict[str, Any]] = []
        app = Klein()
        app.route("/call", methods=["POST"])(self._create)
        self.http: Any = StubTreq(app.resource())

    def _create(self, request: IRequest) -> bytes:
        assert request.content is not None
        self.created.append(json.loads(request.content.read()))
        call_id = f"vapi-{len(self.created)}"
        request.setResponseCode(201)
        return json.dumps({"id": call_id, "transport": {
            "websocketCallUrl": f"ws://127.0.0.1:9/{call_id}/transport"}}).encode()

    def connect(self, url: Any, factory: Any) -> Deferred[Any]:
        server_factory = WebSocketServerFactory("ws://127.0.0.1:9")
        server_factory.protocol = VapiSocket
        server = cast(VapiSocket, server_factory.buildProtocol(None))
        client = factory.buildProtocol(None)
        self.pumps.append(iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                                        client, iosim.FakeTransport(client, isServer=False),
                                        greet=False, clock=self.clock))
        self.sockets.append(server)
        return succeed(client)


class TwilioSocket(WebSocketClientProtocol):
    """Twilio's side of the media stream: sends like Twilio, records what it gets."""

    def onOpen(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.closed: tuple[bool, int | None] | None = None
        self.sequence = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert not isBinary
        self.received.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code)

    def send(self, event: str, **fields: Any) -> None:
        self.sequence += 1
        message = {"event": event, "sequenceNumber": str(self.sequence), **fields}
        if event != "connected":
            message["streamSid"] = "MZ1"
        self.sendMessage(json.dumps(message).encode())

    def media_out(self) -> list[bytes]:
        return [base64.b64decode(m["media"]["payload"]) for m in self.received
                if m["event"] == "media"]

    def events(self) -> list[str]:
        return [m["event"] for m in self.received]


class Rig:
    def __init__(self, **sections: dict[str, str]) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        merged: dict[str, dict[str, str]] = {"gateway": {"public_url": PUBLIC},
                                             "vapi": {"api_url": "http://127.0.0.1:9"}}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        settings = parse_settings(minimal_ini(**merged), "gw.ini", {})
        self.vapi = FakeVapi(self.clock)
        self.gateway: Gateway = build_gateway(settings, self.clock, {},
                                              http_client=self.vapi.http,
                                              link_connector=self.vapi.connect)
        self.gateway.service.privilegedStartService()
        self.gateway.service.startService()
        self.clock.run()
        self.web: Any = StubTreq(self.gateway.site.resource)
        self.twilio: list[TwilioSocket] = []
        self.pumps: list[iosim.IOPump] = []
        self.seq = 0

    def flush(self) -> None:
        """Pump every socket until nothing moves (a frame may cause others)."""
        while [True for pump in self.vapi.pumps + self.pumps if pump.pump()]:
            pass

    def advance(self, seconds: float, step: float = 0.02) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.flush()

    def voice_webhook(self) -> dict[str, str]:
        params = {"CallSid": CALL_SID, "AccountSid": "AC" + "0" * 32,
                  "From": "+15550001111", "To": "+15552223333", "CallStatus": "ringing"}
        signature = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(
            PUBLIC + "/twilio/voice", params)
        response = self.web.post(PUBLIC + "/twilio/voice", data=urlencode(params).encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded",
                                          "X-Twilio-Signature": signature}).result
        assert response.code == 200
        root = ElementTree.fromstring(self.web.content(response).result)
        stream = root.find("Connect/Stream")
        assert stream is not None
        self.flush()
        return {"url": stream.attrib["url"],
                **{p.attrib["name"]: p.attrib["value"] for p in stream}}

    def open_stream(self, twiml: dict[str, str]) -> TwilioSocket:
        url = twiml["url"]
        signature = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(url, {})
        factory = WebSocketClientFactory(url, headers={"X-Twilio-Signature": signature})
        factory.protocol = TwilioSocket
        client = cast(TwilioSocket, factory.buildProtocol(None))
        server = self.gateway.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        self.pumps.append(iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                                        client, iosim.FakeTransport(client, isServer=False),
                                        greet=False, clock=self.clock))
        self.flush()
        client.send("connected", protocol="Call", version="1.0.0")
        params = {k: v for k, v in twiml.items() if k != "url"}
        client.send("start", start={
            "accountSid": "AC" + "0" * 32, "streamSid": "MZ1", "callSid": CALL_SID,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})
        self.flush()
        self.twilio.append(client)
        return client

    def caller_frame(self, client: TwilioSocket, index: int, byte: int = 0x11) -> None:
        payload = base64.b64encode(bytes([byte]) * FRAME).decode()
        client.send("media", media={"track": "inbound", "chunk": str(index + 1),
                                    "timestamp": str(index * 20), "payload": payload})

    def stop(self) -> None:
        stopping = self.gateway.service.stopService()
        self.flush()
        assert stopping.called
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()


def drop(protocol: Any) -> None:
    """Lose the TCP connection under a protocol, with no close frame."""
    protocol.transport.loseConnection()


@pytest.fixture(autouse=True)
def txaio_on_clock() -> Iterator[None]:
    saved = TXAIO.config.loop
    yield
    TXAIO.config.loop = saved


def test_a_whole_call_through_the_composed_daemon() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    twiml = rig.voice_webhook()
    # the Vapi call was created at the webhook, before any stream
    (body,) = rig.vapi.created
    assert body["assistantId"] == "asst-test-0001"
    assert body["transport"]["audioFormat"] == {"format": "mulaw", "container": "raw",
                                                "sampleRate": 8000}
    assert body["assistantOverrides"]["variableValues"]["twilioCallSid"] == CALL_SID
    (vapi,) = rig.vapi.sockets
    assert vapi.authorization == f"Bearer {known_secrets.VAPI_API_KEY}"

    twilio = rig.open_stream(twiml)
    session = rig.gateway.switchboard.get(CALL_SID)
    assert session is not None and session.stream_sid == "MZ1"

    # uplink: each caller frame reaches Vapi in the same turn
    for i in range(5):
        rig.caller_frame(twilio, i)
        rig.flush()
        assert len(vapi.audio) == i + 1
    assert vapi.audio[-1] == b"\x11" * FRAME

    # downlink: a 2 s burst is paced out, 80 ms ahead, no gaps
    vapi.event(type="speech-update", status="started", role="assistant")
    vapi.sendMessage(b"\x22" * FRAME * 100, isBinary=True)
    rig.flush()
    assert len(twilio.media_out()) == 4
    # (no mark echoes yet: stay under [bridge] max_unconfirmed_ms, 1 s, which would hold)
    rig.advance(0.8)
    sent = len(twilio.media_out())
    assert 42 <= sent <= 46  # ~50 frames per second plus the lead
    assert all(frame == b"\x22" * FRAME for frame in twilio.media_out())
    marks = [m["mark"]["name"] for m in twilio.received if m["event"] == "mark"]
    assert marks
    for name in marks[:-1]:  # Twilio echoes marks as playback reaches them
        twilio.send("mark", mark={"name": name})
    rig.flush()

    # barge-in: clear goes out in the same turn; nothing of that utterance after it
    vapi.event(type="user-interrupted")
    rig.flush()
    assert twilio.events()[-1] == "clear"
    before = len(twilio.media_out())
    rig.advance(0.5)
    assert len(twilio.media_out()) == before

    # the caller hangs up: Vapi gets end-call, both sockets close, nothing is left
    twilio.send("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": CALL_SID})
    rig.advance(0.1)
    assert [t["type"] for t in vapi.texts] == ["end-call"]
    assert session.cause == "twilio-stop"
    assert len(rig.gateway.registry) == 0
    assert twilio.closed is not None and vapi.closed is not None
    stats = session.playout.stats(rig.gateway.switchboard.now_ns())
    assert stats.underruns == 0
    rig.stop()


def test_the_caller_dropping_the_socket_ends_the_vapi_call() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    (vapi,) = rig.vapi.sockets
    rig.caller_frame(twilio, 0)
    rig.flush()
    drop(twilio)
    rig.advance(0.1)
    assert [t["type"] for t in vapi.texts] == ["end-call"]
    assert len(rig.gateway.registry) == 0
    rig.advance(6)  # Autobahn's close handshake timers run out
    rig.stop()


def test_a_terminal_status_callback_ends_a_live_call() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    (vapi,) = rig.vapi.sockets
    params = {"CallSid": CALL_SID, "CallStatus": "completed", "SequenceNumber": "2"}
    signature = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(
        PUBLIC + "/twilio/status", params)
    for _ in range(2):  # a duplicate callback is harmless
        response = rig.web.post(PUBLIC + "/twilio/status", data=urlencode(params).encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded",
                                         "X-Twilio-Signature": signature}).result
        assert response.code == 204
    rig.advance(0.1)
    assert [t["type"] for t in vapi.texts] == ["end-call"]
    assert twilio.closed is not None
    assert len(rig.gateway.registry) == 0
    rig.advance(6)
    rig.stop()


def test_vapi_ending_the_call_closes_the_twilio_stream() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    (vapi,) = rig.vapi.sockets
    vapi.event(type="status-update", status="ended", endedReason="assistant-ended-call")
    rig.advance(0.1)
    session_gone = rig.gateway.switchboard.get(CALL_SID) is None
    assert session_gone and twilio.closed is not None
    rig.advance(6)
    rig.stop()


def test_drain_ends_remaining_calls_after_the_timeout() -> None:
    rig = Rig(gateway={"drain_timeout": "2"})
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    (vapi,) = rig.vapi.sockets
    stopping = rig.gateway.service.stopService()
    for i in range(50):  # the call goes on during the drain
        rig.caller_frame(twilio, i)
        rig.advance(0.02)
    assert not stopping.called and len(vapi.audio) == 50
    rig.advance(1.2)
    assert [t["type"] for t in vapi.texts] == ["end-call"]
    rig.advance(6)
    assert stopping.called
    assert rig.clock.getDelayedCalls() == []


def test_a_dropped_vapi_socket_is_rejoined_and_audio_resumes() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    first = rig.vapi.sockets[0]
    drop(first)  # abrupt: no close frame
    rig.flush()
    for i in range(10):  # during the backoff, caller audio is dropped, not queued
        rig.caller_frame(twilio, i)
        rig.advance(0.02)
    rig.advance(1.2)  # first reconnect after 1 s
    assert len(rig.vapi.sockets) == 2 and len(rig.vapi.created) == 1  # same Vapi call
    second = rig.vapi.sockets[1]
    rig.caller_frame(twilio, 80)
    rig.flush()
    assert second.audio[-1] == b"\x11" * FRAME
    session = rig.gateway.switchboard.get(CALL_SID)
    assert session is not None and session.counters.reconnects == 1
    assert session.counters.uplink_dropped_frames >= 10
    twilio.send("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": CALL_SID})
    rig.advance(0.1)
    assert [t["type"] for t in second.texts] == ["end-call"]
    rig.advance(6)
    rig.stop()


def test_vapi_loss_with_hangup_policy_closes_the_stream_for_the_fallback() -> None:
    rig = Rig(vapi={"on_vapi_loss": "hangup", "reconnect_attempts": "0"})
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    drop(rig.vapi.sockets[0])
    rig.advance(0.1)
    assert twilio.closed is not None  # Twilio then plays the fallback and hangs up
    assert len(rig.gateway.registry) == 0
    rig.advance(6)
    rig.stop()


def scrape(rig: Rig) -> dict[str, float]:
    """GET /metrics on the admin app, parsed with prometheus_client's own parser."""
    admin: Any = StubTreq(rig.gateway.admin_app.resource())
    response = admin.get("http://127.0.0.1:9464/metrics").result
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = admin.content(response).result.decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_after_a_scripted_call() -> None:
    rig = Rig(gateway={"max_concurrent_calls": "1"})
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    (vapi,) = rig.vapi.sockets
    for i in range(25):
        rig.caller_frame(twilio, i)
        rig.advance(0.02)
    vapi.sendMessage(b"\x22" * FRAME * 50, isBinary=True)
    rig.advance(0.5)
    during = scrape(rig)
    assert during["vapi_gateway_calls_active"] == 1
    keepalive = during["vapi_gateway_uplink_keepalive_frames_total"]
    assert keepalive > 0  # Twilio's media paused: silence kept Vapi's uplink flowing
    assert during["vapi_gateway_frames_total{direction=uplink}"] == 25 + keepalive
    assert during["vapi_gateway_playout_lead_ms{stat=max}"] > 0
    vapi.event(type="user-interrupted")
    rig.flush()
    twilio.send("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": CALL_SID})
    rig.advance(0.2)
    # a second call while the first is ending would be refused at capacity 1: none here
    after = scrape(rig)
    assert after["vapi_gateway_calls_active"] == 0
    assert after["vapi_gateway_calls_started_total"] == 1
    assert after["vapi_gateway_calls_ended_total{cause=twilio-stop}"] == 1
    assert after["vapi_gateway_call_duration_seconds_count"] == 1
    assert after["vapi_gateway_frames_total{direction=uplink}"] >= 25 + keepalive
    assert after["vapi_gateway_frames_total{direction=downlink}"] == \
        during["vapi_gateway_frames_total{direction=downlink}"]
    assert after["vapi_gateway_bytes_total{direction=uplink}"] == \
        after["vapi_gateway_frames_total{direction=uplink}"] * FRAME
    assert after["vapi_gateway_barge_ins_total"] == 1
    assert after["vapi_gateway_barge_in_reaction_seconds_count"] == 1
    assert after["vapi_gateway_vapi_call_create_seconds_count"] == 1
    assert after["vapi_gateway_webhook_requests_total{route=twilio-voice,status=200}"] == 1
    assert after["vapi_gateway_reactor_lag_seconds_count"] > 5
    assert after["vapi_gateway_downlink_underruns_total"] == 0
    rig.advance(6)
    rig.stop()


def test_metrics_show_back_pressure_drops_and_the_reactors_timers() -> None:
    rig = Rig(bridge={"buffer_seconds": "2"})
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    (vapi,) = rig.vapi.sockets
    media = rig.pumps[-1].serverIO.protocol  # the gateway's end of the media socket
    session = rig.gateway.switchboard.get(CALL_SID)
    assert session is not None
    vapi.sendMessage(b"\x22" * FRAME * 150, isBinary=True)  # 3 s into a 2 s buffer
    rig.advance(1.5)  # Twilio plays nothing and echoes no mark
    values = scrape(rig)
    assert len(twilio.media_out()) == 50  # [bridge] max_unconfirmed_ms = 1000
    assert values["vapi_gateway_downlink_frames_dropped_total"] == 50  # the oldest second
    assert values["vapi_gateway_downlink_holds_total{cause=unconfirmed}"] == 1
    assert values["vapi_gateway_downlink_holds_total{cause=transport}"] == 0
    assert values["vapi_gateway_downlink_held_ms_total"] > 500
    assert values["vapi_gateway_unconfirmed_ms{stat=max}"] == 1000
    timers = values["vapi_gateway_reactor_delayed_calls"]
    assert timers == len(rig.clock.getDelayedCalls()) > 0
    for name in [m["mark"]["name"] for m in twilio.received if m["event"] == "mark"]:
        twilio.send("mark", mark={"name": name})  # Twilio reads and plays it all
    rig.flush()
    rig.advance(0.02)
    assert len(twilio.media_out()) == 54  # released: the lead again
    media.pauseProducing()  # as Twisted does when the socket's write buffer is full
    rig.advance(0.2)
    assert len(twilio.media_out()) == 54
    media.resumeProducing()
    rig.advance(0.02)
    assert len(twilio.media_out()) > 54
    values = scrape(rig)
    assert values["vapi_gateway_downlink_holds_total{cause=transport}"] == 1
    assert session.counters.stream_pauses == 1
    twilio.send("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": CALL_SID})
    rig.advance(0.2)
    after = scrape(rig)  # ended calls' figures stay in the totals
    assert after["vapi_gateway_downlink_frames_dropped_total"] == 50
    assert after["vapi_gateway_downlink_holds_total{cause=transport}"] == 1
    rig.advance(6)
    rig.stop()
    assert scrape(rig)["vapi_gateway_reactor_delayed_calls"] == 0


def test_metrics_count_refusals_and_auth_failures() -> None:
    rig = Rig()
    rig.gateway.admission.draining = True
    params = {"CallSid": CALL_SID, "From": "+1", "To": "+2"}
    for signature in ("forged", None):
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signature:
            headers["X-Twilio-Signature"] = signature
        response = rig.web.post(PUBLIC + "/twilio/voice", data=urlencode(params).encode(),
                                headers=headers).result
        assert response.code == 403
    signature = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(
        PUBLIC + "/twilio/voice", params)
    busy = rig.web.post(PUBLIC + "/twilio/voice", data=urlencode(params).encode(),
                        headers={"Content-Type": "application/x-www-form-urlencoded",
                                 "X-Twilio-Signature": signature}).result
    assert busy.code == 200
    values = scrape(rig)
    assert values["vapi_gateway_auth_failures_total{route=twilio-voice}"] == 2
    assert values["vapi_gateway_webhook_requests_total{route=twilio-voice,status=403}"] == 2
    assert values["vapi_gateway_admissions_refused_total{reason=draining}"] == 1
    rig.stop()


def test_metrics_count_twilio_protocol_violations() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    twilio = rig.open_stream(rig.voice_webhook())
    twilio.sendMessage(b"{not json")
    twilio.send("media", media={"payload": "***"})  # bad base64
    rig.flush()
    twilio.send("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": CALL_SID})
    rig.advance(0.2)
    values = scrape(rig)
    assert values["vapi_gateway_protocol_violations_total{kind=malformed-json,leg=twilio}"] == 1
    assert values["vapi_gateway_protocol_violations_total{kind=bad-base64,leg=twilio}"] == 1
    assert values["vapi_gateway_protocol_violations_total{kind=bad-frame,leg=vapi}"] == 0
    rig.advance(6)
    rig.stop()


def test_a_refused_upgrade_counts_as_an_auth_failure() -> None:
    rig = Rig()
    TXAIO.config.loop = rig.clock
    factory = WebSocketClientFactory(PUBLIC.replace("http", "ws") + "/twilio/media",
                                     headers={"X-Twilio-Signature": "forged="})
    factory.protocol = TwilioSocket
    client = factory.buildProtocol(None)
    server = rig.gateway.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5556))
    rig.pumps.append(iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                                   client, iosim.FakeTransport(client, isServer=False),
                                   greet=False, clock=rig.clock))
    rig.advance(0.1)
    values = scrape(rig)
    assert values["vapi_gateway_auth_failures_total{route=twilio-media}"] == 1
    rig.advance(6)
    rig.stop()
