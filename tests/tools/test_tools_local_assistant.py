"""The local assistant's Twisted shell under a Clock: POST /call through StubTreq, call
sockets through twisted.test.iosim (Autobahn on both sides, in memory), each behaviour's
events and audio on the wire, end-call, the silence timeout, stop(); the interop with
the gateway's own CallCreator and LinkDriver (in memory, then once over real loopback);
and the command line in a subprocess (URL on stdout, SIGTERM exits 0)."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import known_secrets
import pytest
import pytest_twisted  # type: ignore[import-untyped]
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from inmemory import debug_log_events, pipe, result_of, txaio_on
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool

from gateway.tools.local_assistant.clips import clip_audio
from gateway.tools.local_assistant.server import AssistantSocketProtocol, LocalAssistant
from gateway.tools.local_assistant.settings import LocalAssistantSettings
from gateway.vapi.assistants import AssistantById
from gateway.vapi.calls import (
    AudioFormat,
    BadCallAnswerError,
    CallCreator,
    CallRejectedError,
    SocketUrl,
    VapiApiSettings,
    VapiUnavailableError,
)
from gateway.vapi.codec import (
    AddMessage,
    CallEvent,
    MessageToAdd,
    SpeechUpdate,
    StatusUpdate,
    UserInterrupted,
)
from gateway.vapi.link import Failed, LinkClosedReason, LinkFailure, LinkSettings, LinkState, Open
from gateway.vapi.link_driver import CallSocketFactory, LinkDriver, tls_connector

API_KEY = known_secrets.VAPI_API_KEY
BASE = "http://127.0.0.1:8800"
TXAIO: Any = txaio
MULAW = AudioFormat("mulaw", 8000)
AGENT = clip_audio("agent", MULAW)
TRANSPORT = {"provider": "vapi.websocket",
             "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000}}


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    with txaio_on(clock):
        yield clock


class RecordingClient(WebSocketClientProtocol):
    """The client side of a call socket: records what the assistant sends, with times."""

    log = TXAIO.make_logger(level="info")
    clock: Clock

    def __init__(self) -> None:
        super().__init__()
        self.audio: list[tuple[float, bytes]] = []
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.opened = False
        self.closed: tuple[bool, int | None] | None = None
        self.pongs = 0

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.audio.append((self.clock.seconds(), payload))
        else:
            self.events.append((self.clock.seconds(), json.loads(payload)))

    def onPong(self, payload: bytes) -> None:
        self.pongs += 1

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code)

    def types(self) -> list[str]:
        return [event["type"] for _, event in self.events]

    def audio_bytes(self) -> bytes:
        return b"".join(payload for _, payload in self.audio)


class Rig:
    """A LocalAssistant on a Clock, reached through StubTreq and iosim."""

    def __init__(self, clock: Clock, api_key: str = API_KEY, **settings: Any) -> None:
        self.clock = clock
        numbers = iter(range(1, 1000))
        self.assistant = LocalAssistant(
            clock, None, api_key=api_key, settings=LocalAssistantSettings(**settings),
            call_ids=lambda: f"call-{next(numbers)}")
        self.http: Any = StubTreq(self.assistant.resource())
        self.pumps: list[iosim.IOPump] = []

    def post(self, body: Any, key: str | None = API_KEY) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        response = self._finish(self.http.post(BASE + "/call", data=json.dumps(body).encode(),
                                               headers=headers))
        content = self._finish(response.content())
        return response.code, json.loads(content)

    def get(self, path: str) -> tuple[int, Any]:
        response = self._finish(self.http.get(BASE + path,
                                              headers={"Authorization": f"Bearer {API_KEY}"}))
        return response.code, json.loads(self._finish(response.content()))

    def _finish(self, d: Deferred[Any]) -> Any:
        self.http.flush()
        return result_of(d)

    def create(self, script: str, audio: dict[str, Any] | None = None,
               key: str = API_KEY) -> str:
        transport = {"provider": "vapi.websocket", "audioFormat": audio or TRANSPORT["audioFormat"]}
        status, answer = self.post({"assistantId": f"local:{script}", "transport": transport},
                                   key=key)
        assert status == 201, answer
        return cast(str, answer["transport"]["websocketCallUrl"])

    def _pipe(self, client: Any) -> None:
        server = self.assistant.site.buildProtocol(None)
        self.pumps.append(pipe(server, client, self.clock))

    def connect(self, url: str, key: str | None = API_KEY) -> RecordingClient:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        factory = WebSocketClientFactory(url, headers=headers)
        factory.protocol = RecordingClient
        client = cast(RecordingClient, factory.buildProtocol(None))
        client.clock = self.clock
        self._pipe(client)
        self.flush()
        return client

    def connector(self, url: SocketUrl, factory: CallSocketFactory) -> Deferred[Any]:
        """A gateway LinkDriver connector that reaches this assistant in memory."""
        client = factory.buildProtocol(None)
        self._pipe(client)
        return succeed(client)

    def flush(self) -> None:
        self.http.flush()
        for pump in self.pumps:
            pump.flush()

    def run_until(self, at: float) -> None:
        """Advance to ``at``, stopping at every delayed call on the way (exact times)."""
        while True:
            self.flush()
            pending = [c.getTime() for c in self.clock.getDelayedCalls()
                       if c.getTime() <= at]
            if not pending:
                break
            self.clock.advance(max(0.0, min(pending) - self.clock.seconds()))
        self.clock.advance(max(0.0, at - self.clock.seconds()))
        self.flush()

    def record(self, call_id: str = "call-1") -> Any:
        return self.assistant.calls[call_id]


def _burst_times(client: RecordingClient) -> list[float]:
    return sorted({at for at, _ in client.audio})


# --- POST /call --------------------------------------------------------------------


def test_post_call_answers_201_with_a_loopback_socket_url(clock: Clock) -> None:
    rig = Rig(clock)
    status, answer = rig.post({"assistantId": "local:speak", "transport": TRANSPORT})
    assert status == 201
    assert answer["id"] == "call-1" and answer["status"] == "queued"
    assert answer["transport"]["websocketCallUrl"] == "ws://127.0.0.1:8800/call-1/transport"
    assert answer["transport"]["audioFormat"] == TRANSPORT["audioFormat"]
    SocketUrl(answer["transport"]["websocketCallUrl"])  # the gateway accepts it
    assert rig.record().script == "speak" and rig.record().open
    assert vars(rig.assistant.counts()) == {"created": 1, "ended": 0, "open": 1}
    status, fetched = rig.get("/call/call-1")
    assert status == 200 and fetched["id"] == "call-1" and fetched["status"] == "queued"
    assert rig.get("/call/call-9")[0] == 404


def test_post_call_needs_the_bearer_key(clock: Clock) -> None:
    rig = Rig(clock)
    body = {"assistantId": "local:speak", "transport": TRANSPORT}
    for key in (None, "wrong-key-0000", API_KEY + "x"):
        status, answer = rig.post(body, key=key)
        assert status == 401 and answer["statusCode"] == 401 and answer["message"]
    assert rig.assistant.calls == {} and rig.assistant.creates_refused == 3


def test_post_call_validates_the_body_like_vapi(clock: Clock) -> None:
    rig = Rig(clock)
    status, answer = rig.post({"assistantId": "local:speak"})
    assert status == 400 and answer["error"] == "Bad Request"
    assert answer["message"] == ["transport must be given (provider vapi.websocket)"]
    status, answer = rig.post({"assistantId": "a", "transport": {
        "provider": "vapi.websocket", "audioFormat": {"format": "opus"}}})
    assert status == 400 and "format" in answer["message"][0]
    status, answer = rig.post({"assistantId": "local:speak:nope", "transport": TRANSPORT})
    assert status == 400 and "packaged clips" in answer["message"][0]
    assert rig.assistant.calls == {}


def test_the_concurrency_limit_answers_400_like_vapi(clock: Clock) -> None:
    rig = Rig(clock, max_concurrent_calls=1)
    rig.create("silent")
    status, answer = rig.post({"assistantId": "local:silent", "transport": TRANSPORT})
    assert status == 400 and answer["message"] == "Over Concurrency Limit."
    assert answer["subscriptionLimits"]["concurrencyBlocked"] is True
    assert rig.assistant.counts().created == 1


# --- fail-create, through the gateway's own CallCreator ----------------------------


def _creator(rig: Rig, retries: int = 2) -> CallCreator:
    return CallCreator(VapiApiSettings(api_key=API_KEY, api_url=BASE, retries=retries,
                                       request_timeout_ns=4_000_000_000,
                                       retry_backoff_ns=500_000_000), rig.http, rig.clock)


def _create(rig: Rig, script: str, retries: int = 2, until: float = 30.0) -> Any:
    creating = _creator(rig, retries).create_call(AssistantById(f"local:{script}"), MULAW)
    rig.run_until(rig.clock.seconds() + until)
    rig.http.flush()
    return result_of(creating)


def test_fail_create_with_5xx_makes_the_gateway_retry_then_give_up(clock: Clock) -> None:
    rig = Rig(clock)
    with pytest.raises(VapiUnavailableError, match="HTTP 500"):
        _create(rig, "fail-create")
    assert rig.assistant.create_requests == 3 and rig.assistant.calls == {}


def test_fail_create_for_the_first_requests_only(clock: Clock) -> None:
    rig = Rig(clock)
    created = _create(rig, "fail-create:503*2+speak")
    assert rig.assistant.create_requests == 3
    assert rig.record(created.call_id).script == "speak"


def test_fail_create_concurrency_is_a_final_400(clock: Clock) -> None:
    rig = Rig(clock)
    with pytest.raises(CallRejectedError) as error:
        _create(rig, "fail-create:concurrency")
    assert error.value.status == 400 and error.value.messages == ("Over Concurrency Limit.",)
    assert error.value.subscription_limits is not None
    assert rig.assistant.create_requests == 1


def test_fail_create_without_a_socket_url(clock: Clock) -> None:
    rig = Rig(clock)
    with pytest.raises(BadCallAnswerError, match="websocketCallUrl"):
        _create(rig, "fail-create:no-socket-url")
    assert rig.assistant.calls == {}


def test_fail_create_slow_answers_after_the_gateways_timeout(clock: Clock) -> None:
    rig = Rig(clock, create_delay_ms=10_000)
    with pytest.raises(VapiUnavailableError, match="no answer within 4 s"):
        _create(rig, "fail-create:slow", retries=0, until=5)
    created = _create(rig, "fail-create:slow*1+echo", retries=1, until=5)  # slow once only
    assert rig.record(created.call_id).script == "echo"
    assert rig.assistant.create_requests == 3


def test_a_slow_create_abandoned_by_its_client_creates_no_call(clock: Clock) -> None:
    # StubTreq does not tell the server a cancelled request's client went away; a real
    # connection (here in memory) does.
    rig = Rig(clock, create_delay_ms=10_000)
    body = json.dumps({"assistantId": "local:fail-create:slow", "transport": TRANSPORT})
    server = rig.assistant.site.buildProtocol(None)
    transport = iosim.FakeTransport(server, isServer=True)
    server.makeConnection(transport)
    server.dataReceived(
        f"POST /call HTTP/1.1\r\nHost: 127.0.0.1:8800\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    clock.advance(4)
    assert transport.getOutBuffer() is None  # no answer yet
    server.connectionLost(Failure(ConnectionDone("the client gave up")))
    assert rig.assistant.creates_abandoned == 1
    clock.advance(10)
    assert rig.assistant.calls == {} and transport.getOutBuffer() is None


def test_a_late_create_has_made_the_call_whether_or_not_its_client_waits(
        clock: Clock) -> None:
    rig = Rig(clock, create_delay_ms=10_000)
    body = json.dumps({"assistantId": "local:fail-create:late", "transport": TRANSPORT})
    server = rig.assistant.site.buildProtocol(None)
    transport = iosim.FakeTransport(server, isServer=True)
    server.makeConnection(transport)
    server.dataReceived(
        f"POST /call HTTP/1.1\r\nHost: 127.0.0.1:8800\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    assert rig.assistant.counts().created == 1  # at once, like Vapi's
    clock.advance(4)
    assert transport.getOutBuffer() is None  # the answer is late
    server.connectionLost(Failure(ConnectionDone("the client gave up")))
    assert rig.assistant.creates_abandoned == 1
    (record,) = rig.assistant.calls.values()
    assert record.open and record.script == "silent"  # left for its silence timeout


def test_a_late_answer_within_the_timeout_carries_the_call(clock: Clock) -> None:
    rig = Rig(clock, create_delay_ms=1_500)
    created = _create(rig, "fail-create:late+speak", retries=0, until=5)
    assert rig.record(created.call_id).open and rig.assistant.counts().created == 1


def test_a_slow_answer_within_the_timeout_creates_the_call(clock: Clock) -> None:
    rig = Rig(clock, create_delay_ms=1_500)
    created = _create(rig, "fail-create:slow+speak", retries=0)
    assert rig.record(created.call_id).open and rig.assistant.creates_abandoned == 0


# --- the call socket ---------------------------------------------------------------


def test_the_socket_needs_the_bearer_key_and_a_live_call(clock: Clock) -> None:
    rig = Rig(clock)
    url = rig.create("silent")
    for key in (None, "wrong-key-0000"):
        refused = rig.connect(url, key=key)
        assert not refused.opened and refused.closed is not None
    assert rig.record().connections == 0
    unknown = rig.connect("ws://127.0.0.1:8800/call-99/transport")
    assert not unknown.opened
    client = rig.connect(url)
    assert client.opened and rig.record().connections == 1
    assert client.types() == ["status-update"]
    client.sendMessage(b'{"type":"end-call"}')
    rig.flush()
    again = rig.connect(url)  # the call has ended: 404
    assert not again.opened and rig.record().refused_connections == 1


def test_refused_upgrades_answer_401_and_404(clock: Clock) -> None:
    rig = Rig(clock)
    url = rig.create("silent")
    answers = []
    for target, key in ((url, "wrong-key-0000"), (url.replace("call-1", "call-9"), API_KEY)):
        server = rig.assistant.site.buildProtocol(None)
        transport = iosim.FakeTransport(server, isServer=True)
        server.makeConnection(transport)
        path = target.split("8800", 1)[1]
        server.dataReceived(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8800\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        answers.append(transport.getOutBuffer().split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 404 Not Found"]


def test_speak_sends_bursts_faster_than_real_time_inside_speech_updates(clock: Clock) -> None:
    rig = Rig(clock)
    client = rig.connect(rig.create("speak"))
    rig.run_until(15.0)
    assert client.audio_bytes() == AGENT
    times = _burst_times(client)
    started_at = next(at for at, e in client.events if e.get("status") == "started")
    stopped_at = next(at for at, e in client.events if e.get("status") == "stopped")
    assert started_at == pytest.approx(0.2) and started_at <= times[0]
    assert times[-1] - started_at < len(AGENT) / 8000 / 2  # all of it sent at >2x real time
    assert stopped_at >= started_at + len(AGENT) / 8000 > times[-1]
    assert client.types() == ["status-update", "speech-update", "speech-update", "transcript"]
    assert {len(payload) for _, payload in client.audio[:-1]} == {160}


def test_pcm_calls_get_pcm_at_the_requested_rate(clock: Clock) -> None:
    rig = Rig(clock)
    url = rig.create("speak", {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000})
    client = rig.connect(url)
    rig.run_until(15.0)
    assert client.audio_bytes() == clip_audio("agent", AudioFormat("pcm_s16le", 16000))
    assert {len(payload) for _, payload in client.audio[:-1]} == {640}


def test_interrupt_stops_the_audio_and_sends_both_barge_in_signals(clock: Clock) -> None:
    rig = Rig(clock)
    client = rig.connect(rig.create("speak+interrupt:1500"))
    rig.run_until(15.0)
    interrupted_at = next(at for at, e in client.events if e["type"] == "user-interrupted")
    assert interrupted_at == pytest.approx(0.2 + 1.5)
    assert all(at < interrupted_at for at, _ in client.audio)
    assert 1.5 * 8000 < len(client.audio_bytes()) < len(AGENT)
    after = [e for at, e in client.events if at >= interrupted_at]
    assert after[:2] == [{"type": "user-interrupted", "turnId": "0"},
                         {"type": "speech-update", "status": "started", "role": "user",
                          "turn": 0}]


def test_stall_pauses_the_audio_and_says_hang(clock: Clock) -> None:
    rig = Rig(clock)
    client = rig.connect(rig.create("speak+stall:1000:3000"))
    rig.run_until(20.0)
    assert client.audio_bytes() == AGENT
    times = _burst_times(client)
    gap, before = max((b - a, a) for a, b in itertools.pairwise(times))
    assert gap >= 3.0 and before < 0.2 + 1.0
    hang_at = next(at for at, e in client.events if e["type"] == "hang")
    assert before < hang_at < before + gap


def test_echo_returns_the_callers_audio_after_its_delay(clock: Clock) -> None:
    rig = Rig(clock)
    client = rig.connect(rig.create("echo:200"))
    sent = [bytes([n]) * 160 for n in range(5)]
    for n, frame in enumerate(sent):
        rig.run_until(1.0 + n * 0.02)
        client.sendMessage(frame, isBinary=True)
    rig.run_until(2.0)
    assert [payload for _, payload in client.audio] == sent
    assert [at for at, _ in client.audio] == pytest.approx([1.2 + n * 0.02 for n in range(5)])
    assert bytes(rig.record().uplink_audio) == b"".join(sent)


def test_drop_aborts_without_a_close_frame_and_allows_a_rejoin(clock: Clock) -> None:
    rig = Rig(clock)
    url = rig.create("speak+drop:1000")
    client = rig.connect(url)
    rig.run_until(5.0)
    assert client.closed is not None and client.closed[0] is False  # no close handshake
    assert all(at <= 1.2 for at, _ in client.audio)
    record = rig.record()
    assert record.drops == 1 and record.open and record.close_codes == [1006]
    again = rig.connect(url)
    assert again.opened and record.connections == 2


def test_drop_with_refuse_reconnect_refuses_the_same_url(clock: Clock) -> None:
    rig = Rig(clock)
    url = rig.create("speak+drop:1000+refuse-reconnect")
    rig.connect(url)
    rig.run_until(5.0)
    again = rig.connect(url)
    assert not again.opened
    assert rig.record().ended_reason == "local-assistant-dropped-socket"
    assert rig.assistant.counts().open == 0


def test_end_call_gets_ended_and_the_report_then_a_1000_close(clock: Clock) -> None:
    rig = Rig(clock)
    client = rig.connect(rig.create("speak"))
    rig.run_until(1.0)
    client.sendMessage(b'{"type":"say","content":"One moment."}')
    client.sendMessage(b'{"type":"end-call"}')
    rig.run_until(5.0)
    ended = client.events[-2:]
    assert [e for _, e in ended] == [
        {"type": "status-update", "status": "ended", "endedReason": "customer-ended-call"},
        {"type": "end-of-call-report", "endedReason": "customer-ended-call",
         "durationSeconds": 1.0}]
    assert client.closed == (True, 1000)
    record = rig.record()
    assert record.end_call_received and record.message_types() == ["say", "end-call"]
    assert record.close_codes == [1000] and not record.open
    assert vars(rig.assistant.counts()) == {"created": 1, "ended": 1, "open": 0}
    assert clock.getDelayedCalls() == []


def test_silence_ends_the_call_with_silence_timed_out(clock: Clock) -> None:
    rig = Rig(clock, silence_timeout_s=10)
    client = rig.connect(rig.create("silent"))
    for n in range(250):  # 5 s of uplink, then nothing
        rig.run_until(n * 0.02)
        client.sendMessage(b"\xff" * 160, isBinary=True)
    rig.run_until(14.9)
    assert rig.record().open
    rig.run_until(20.0)
    assert rig.record().ended_reason == "silence-timed-out"
    assert client.events[-1][1]["endedReason"] == "silence-timed-out"
    assert client.closed == (True, 1000)


def test_pings_are_answered_and_counted(clock: Clock) -> None:
    rig = Rig(clock)
    client = rig.connect(rig.create("silent"))
    client.sendPing(b"12345678")
    rig.flush()
    assert client.pongs == 1 and rig.record().pings == 1


def test_stop_ends_every_open_call_and_closes_their_sockets(clock: Clock) -> None:
    rig = Rig(clock)
    first = rig.connect(rig.create("speak"))
    rig.create("silent")  # never joined
    rig.run_until(1.0)
    stopped = rig.assistant.stop()
    rig.flush()
    result_of(stopped)
    assert first.closed == (True, 1000)
    assert {r.ended_reason for r in rig.assistant.calls.values()} == {"local-assistant-stopped"}
    assert clock.getDelayedCalls() == []


def _debug_logged_call(clock: Clock, api_key: str) -> str:
    """A refused POST, a call and its socket with txaio at debug; the log text."""
    with debug_log_events() as events:
        rig = Rig(clock, api_key=api_key)
        rig.post({"assistantId": "local:speak"}, key="wrong-key-0000")
        client = rig.connect(rig.create("speak", key=api_key), key=api_key)
        client.sendMessage(b'{"type":"end-call"}')
        rig.run_until(clock.seconds() + 3.0)
    return repr(events)


def test_the_key_never_reaches_a_log_even_at_debug(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Control: Autobahn's server logger left at debug writes the upgrade request, with
    # the Authorization header (a throwaway key, so the suite's secret scan stays clean).
    with monkeypatch.context() as unpinned:
        unpinned.setattr(AssistantSocketProtocol, "log", TXAIO.make_logger())
        control = _debug_logged_call(clock, "throwaway-control-key")
    assert "throwaway-control-key" in control
    text = _debug_logged_call(clock, API_KEY)
    assert "local assistant call created" in text and API_KEY not in text


def test_it_listens_only_on_loopback(clock: Clock) -> None:
    public = LocalAssistant(clock, MemoryReactor(), api_key=API_KEY,
                            listen="tcp:0:interface=0.0.0.0")
    with pytest.raises(ValueError, match="not a loopback address"):
        result_of(public.start())
    assert public.base_url is None
    broken = LocalAssistant(clock, MemoryReactor(), api_key=API_KEY, listen="carrier-pigeon:")
    with pytest.raises(ValueError, match="bad listen"):
        result_of(broken.start())


def test_per_call_scripts_may_name_only_known_clips(clock: Clock) -> None:
    rig = Rig(clock, utterances=("agent",))
    status, answer = rig.post({"assistantId": "local:speak:/etc/secret.wav",
                               "transport": TRANSPORT})
    assert status == 400 and "packaged clips" in answer["message"][0]
    assert rig.post({"assistantId": "local:speak:caller,interrupt",
                     "transport": TRANSPORT})[0] == 201


def test_only_the_latest_ended_calls_are_kept(clock: Clock) -> None:
    rig = Rig(clock, keep_ended_calls=1, silence_timeout_s=1)
    for _ in range(3):
        rig.create("silent")
        rig.run_until(clock.seconds() + 2)
    assert list(rig.assistant.calls) == ["call-2", "call-3"]
    rig.create("silent")
    assert list(rig.assistant.calls) == ["call-3", "call-4"]
    assert vars(rig.assistant.counts()) == {"created": 4, "ended": 3, "open": 1}


# --- interop with the gateway's own Vapi client ------------------------------------


@dataclass
class RecordingOwner:
    """A gateway LinkOwner that writes everything down."""

    audio: list[bytes] = field(default_factory=list)
    events: list[CallEvent] = field(default_factory=list)
    failures: list[LinkFailure] = field(default_factory=list)
    closed: list[LinkClosedReason] = field(default_factory=list)
    first_audio: Deferred[None] = field(default_factory=Deferred)

    def on_link_open(self) -> None:
        pass

    def on_link_audio(self, audio: bytes) -> None:
        self.audio.append(audio)
        if not self.first_audio.called:
            self.first_audio.callback(None)

    def on_link_event(self, event: CallEvent) -> None:
        self.events.append(event)

    def on_link_transition(self, old: LinkState, new: LinkState) -> None:
        pass

    def on_link_failed(self, failure: LinkFailure) -> None:
        self.failures.append(failure)

    def on_link_closed(self, reason: LinkClosedReason) -> None:
        self.closed.append(reason)


def _link(rig: Rig, created: Any, owner: RecordingOwner, **settings: Any) -> LinkDriver:
    return LinkDriver(url=created.socket_url, api_key=API_KEY, audio=MULAW, owner=owner,
                      clock=rig.clock, connector=rig.connector,
                      settings=LinkSettings(**settings))


def test_interop_the_gateways_clients_run_a_whole_call(clock: Clock) -> None:
    rig = Rig(clock)
    created = _create(rig, "speak+interrupt:3000", until=0)
    assert created.call_id == "call-1"
    owner = RecordingOwner()
    driver = _link(rig, created, owner)
    driver.start()
    rig.flush()
    assert isinstance(driver.state, Open)
    for n in range(1, 751):  # 15 s of caller audio, 20 ms frames
        driver.send_audio(b"\xff" * 160)
        if n == 100:
            driver.send_message(AddMessage(MessageToAdd("system", "The caller pressed 5")))
        rig.run_until(n * 0.02)
    assert isinstance(driver.state, Open)  # heartbeat pings were answered
    record = rig.record()
    assert record.pings >= 1 and record.uplink_frames == 750
    assert 3 * 8000 < sum(map(len, owner.audio)) < len(AGENT)
    kinds = [(type(e).__name__, getattr(e, "role", None), getattr(e, "status", None))
             for e in owner.events]
    assert kinds[:2] == [("StatusUpdate", None, "in-progress"),
                         ("SpeechUpdate", "assistant", "started")]
    assert ("UserInterrupted", None, None) in kinds
    assert ("SpeechUpdate", "user", "started") in kinds
    closed = driver.stop()
    rig.run_until(clock.seconds() + 3)
    assert result_of(closed) == LinkClosedReason.STOPPED
    assert record.end_call_received and record.message_types() == ["add-message", "end-call"]
    assert record.close_codes == [1000] and record.ended_reason == "customer-ended-call"
    assert rig.assistant.counts().open == 0
    assert clock.getDelayedCalls() == []


def test_interop_the_link_rejoins_after_a_drop(clock: Clock) -> None:
    rig = Rig(clock)
    created = _create(rig, "speak:agent,caller+drop:1000", until=0)
    owner = RecordingOwner()
    driver = _link(rig, created, owner)
    driver.start()
    for n in range(1, 501):
        driver.send_audio(b"\xff" * 160)
        rig.run_until(n * 0.02)
    record = rig.record()
    assert record.drops == 1 and record.connections == 2 and isinstance(driver.state, Open)
    assert driver.counters.reconnects == 1
    driver.stop()
    rig.run_until(clock.seconds() + 3)
    assert record.end_call_received and rig.assistant.counts().open == 0


def test_interop_a_refused_rejoin_makes_the_link_fail(clock: Clock) -> None:
    rig = Rig(clock)
    created = _create(rig, "speak+drop:1000+refuse-reconnect", until=0)
    owner = RecordingOwner()
    driver = _link(rig, created, owner, reconnect_attempts=2)
    driver.start()
    rig.run_until(10.0)
    assert isinstance(driver.state, Failed) and len(owner.failures) == 1
    assert rig.record().refused_connections == 2
    driver.stop()
    rig.run_until(clock.seconds() + 3)
    assert rig.assistant.counts().open == 0


def test_interop_vapi_ending_the_call_on_silence_closes_the_link(clock: Clock) -> None:
    rig = Rig(clock, silence_timeout_s=10)
    created = _create(rig, "silent", until=0)
    owner = RecordingOwner()
    driver = _link(rig, created, owner)
    driver.start()
    rig.run_until(12.0)
    assert owner.closed == [LinkClosedReason.REMOTE_ENDED]
    assert any(isinstance(e, StatusUpdate) and e.ended_reason == "silence-timed-out"
               for e in owner.events)
    assert not any(isinstance(e, SpeechUpdate | UserInterrupted) for e in owner.events)


# --- real loopback: the reactor, TCP, treq and the gateway's connector -------------


def _within(d: Deferred[Any], seconds: float) -> Deferred[Any]:
    """``d``, cancelled after ``seconds`` so a broken test fails instead of hanging."""
    timer = global_reactor.callLater(seconds, d.cancel)  # type: ignore[attr-defined]

    def done(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return d.addBoth(done)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_real_loopback_call_with_the_gateways_own_clients() -> None:
    assistant = LocalAssistant(global_reactor, global_reactor, api_key=API_KEY,
                               settings=LocalAssistantSettings(script="echo:50"))
    pool = HTTPConnectionPool(global_reactor, persistent=False)
    try:
        assistant.startService()  # as a child of the daemon's services
        base = await assistant.start()  # the same port: it binds once
        assert base.startswith("http://127.0.0.1:") and assistant.running
        creator = CallCreator(VapiApiSettings(api_key=API_KEY, api_url=base),
                              cast(Any, HTTPClient(Agent(global_reactor, pool=pool))),
                              global_reactor)
        created = await _within(creator.create_call(AssistantById("local"), MULAW), 10)
        owner = RecordingOwner()
        driver = LinkDriver(url=created.socket_url, api_key=API_KEY, audio=MULAW, owner=owner,
                            clock=global_reactor, connector=tls_connector(global_reactor),
                            settings=LinkSettings(reconnect_attempts=0))
        driver.start()
        await _within(driver.when_open(), 10)
        driver.send_audio(b"\x01" * 160)
        await _within(owner.first_audio, 10)
        assert owner.audio == [b"\x01" * 160]
        assert await _within(driver.stop(), 10) == LinkClosedReason.STOPPED
    finally:
        await _within(assistant.stopService(), 10)
        await pool.closeCachedConnections()
    record = assistant.calls[created.call_id]
    assert record.end_call_received and record.uplink_frames == 1
    assert record.close_codes == [1000] and not record.open


# --- the command line --------------------------------------------------------------


def _lines(stream: Any) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_the_command_line_prints_its_url_and_exits_0_on_sigterm(
    log_capture_path: Any, tmp_path: Any
) -> None:
    env = {**os.environ, "LOCAL_ASSISTANT_KEY": API_KEY}
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.tools.local_assistant", "--port", "0",
             "--api-key", "env:LOCAL_ASSISTANT_KEY", "--script", "speak+interrupt",
             "--log-format", "json", "--log-level", "debug"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        assert process.stdout is not None
        url = _lines(process.stdout).get(timeout=30)
        assert url is not None and url.startswith("http://127.0.0.1:"), url
        url = url.strip()
        request = urllib.request.Request(
            url + "/call", method="POST",
            data=json.dumps({"assistantId": "x", "transport": TRANSPORT}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        assert response.status == 201
        port = url.rsplit(":", 1)[1]
        assert answer["transport"]["websocketCallUrl"].startswith(f"ws://127.0.0.1:{port}/")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    errors = stderr_path.read_text(encoding="utf-8")
    with open(log_capture_path, "a", encoding="utf-8") as capture:
        capture.write(errors)  # the session's secret scan covers the child's log too
    assert "local assistant call created" in errors and "local assistant stopped" in errors
    assert API_KEY not in errors


def test_the_command_line_refuses_a_public_interface() -> None:
    from gateway.tools.local_assistant.cli import main

    assert main(["--interface", "0.0.0.0", "--api-key", "k"]) == 2
    assert main(["--set", "colour=blue", "--api-key", "k"]) == 2
