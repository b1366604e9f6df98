"""Call sessions under a Clock: both audio paths, barge-in, DTMF and every end cause.

Each scenario checks what is left behind: every Vapi call created was ended (its link
stopped exactly once, or an orphan link opened to end it), the registry is empty, and
no delayed call is left on the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from ini import minimal_ini
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.admission import Admission
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.bridge.session import SILENCE_FRAME, CallInfo, CallSession
from gateway.bridge.switchboard import Switchboard
from gateway.config import Settings, parse_settings
from gateway.twilio.stream import Audio, Started
from gateway.vapi.assistants import AssistantById
from gateway.vapi.calls import CreatedCall, SocketUrl, VapiUnavailableError
from gateway.vapi.codec import (
    AddMessage,
    EndOfCallReport,
    SpeechUpdate,
    StatusUpdate,
    UserInterrupted,
)
from gateway.vapi.link import (
    Closed,
    Connecting,
    LinkClosedReason,
    LinkFailure,
    LinkState,
    Open,
    Reconnecting,
)

FRAME = 160


@dataclass
class FakeLink:
    """A Vapi link whose state the test sets; records what the session sends."""

    owner: Any
    created: CreatedCall
    state: LinkState = field(default_factory=lambda: Connecting(0, 1))
    audio: list[bytes] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    stops: int = 0
    started: bool = False
    closed: Deferred[LinkClosedReason] = field(default_factory=Deferred)

    def start(self) -> None:
        self.started = True

    def open(self) -> None:
        old, self.state = self.state, Open(1)
        self.owner.on_link_transition(old, self.state)
        self.owner.on_link_open()

    def stop(self) -> Deferred[LinkClosedReason]:
        self.stops += 1
        was_open = isinstance(self.state, Open)
        self.state = Closed(LinkClosedReason.STOPPED)
        if was_open:
            self.messages.append("end-call")
        if not self.closed.called:
            self.closed.callback(LinkClosedReason.STOPPED)
            # like the real driver: the owner hears the close synchronously
            self.owner.on_link_closed(LinkClosedReason.STOPPED)
        return self.closed

    def when_open(self) -> Deferred[None]:
        return succeed(None)

    def send_audio(self, audio: bytes) -> bool:
        if not isinstance(self.state, Open):
            return False
        self.audio.append(audio)
        return True

    def send_message(self, message: Any) -> bool:
        if not isinstance(self.state, Open):
            return False
        self.messages.append(message)
        return True


class FakeVapi:
    """Vapi's REST side: each create_call is answered when the test says."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, Any, Any]] = []
        self.pending: list[Deferred[CreatedCall]] = []
        self.count = 0

    def create_call(self, choice: Any, audio: Any, overrides: Any = None
                    ) -> Deferred[CreatedCall]:
        self.requests.append((choice, audio, overrides))
        d: Deferred[CreatedCall] = Deferred()
        self.pending.append(d)
        return d

    def answer(self) -> CreatedCall:
        self.count += 1
        created = CreatedCall(f"vapi-call-{self.count}",
                              SocketUrl(f"ws://127.0.0.1:9/call-{self.count}/transport"))
        self.pending.pop(0).callback(created)
        return created


@dataclass
class FakeStream:
    """The Twilio media socket as the session sees it."""

    sent: list[tuple[str, Any]] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)

    def send_media(self, payload: bytes) -> None:
        assert len(payload) == FRAME
        self.sent.append(("media", payload))

    def send_mark(self, name: str) -> None:
        self.sent.append(("mark", name))

    def send_clear(self) -> None:
        self.sent.append(("clear", None))

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def media(self) -> list[bytes]:
        return [p for kind, p in self.sent if kind == "media"]


class FakeTwilioRest:
    def __init__(self) -> None:
        self.hung_up: list[str] = []

    def hang_up(self, call_sid: str) -> Deferred[Any]:
        self.hung_up.append(call_sid)
        return succeed("hung-up")


class Harness:
    def __init__(self, **sections: dict[str, str]) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.settings: Settings = parse_settings(minimal_ini(**sections), "gw.ini", {})
        self.registry = InMemoryCallRegistry()
        self.admission = Admission(self.registry, self.settings.gateway.max_concurrent_calls)
        self.vapi = FakeVapi()
        self.links: list[FakeLink] = []
        self.rest = FakeTwilioRest() if self.settings.twilio.account_sid else None
        self.board = Switchboard(self.settings, self.registry, self.admission, self.clock,
                                 self.vapi, self._link, self.rest)

    def _link(self, owner: Any, created: CreatedCall) -> FakeLink:
        link = FakeLink(owner, created)
        self.links.append(link)
        return link

    def call(self, call_sid: str = "CA1", *, open_link: bool = True,
             stream: bool = True) -> tuple[CallSession, FakeStream]:
        session = self.board.open_call(CallInfo(call_sid, "+15550001111", "+15552223333"))
        sock = FakeStream()
        if open_link:
            self.vapi.answer()
            self.links[-1].open()
        if stream:
            self.attach(call_sid, sock)
        return session, sock

    def attach(self, call_sid: str, sock: FakeStream) -> CallSession | None:
        started = Started(call_sid, f"MZ-{call_sid}-{len(self.links)}", "AC1", {}, ("inbound",))
        return self.board.attach_stream(sock, started)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.clock.advance(0.02)
            self.board.tick()

    def assert_clean(self) -> None:
        assert len(self.registry) == 0
        assert self.board.sessions() == []
        assert self.clock.getDelayedCalls() == []
        assert self.vapi.pending == []
        for link in self.links:
            assert link.stops == 1, "every Vapi link is stopped exactly once"


def audio(payload: bytes = b"\x10" * FRAME, ts: int = 0, gap_frames: int = 0) -> Audio:
    return Audio(payload, ts, gap_frames * 20, gap_frames)


def test_vapi_call_is_created_at_the_webhook_with_routing_and_overrides() -> None:
    h = Harness(routing={"+15552223333": "asst-sales"})
    session, _ = h.call(stream=False, open_link=False)
    (choice, fmt, overrides), = h.vapi.requests
    assert choice == AssistantById("asst-sales")
    assert (fmt.encoding, fmt.sample_rate) == ("mulaw", 8000)
    assert overrides == {"variableValues": {"twilioCallSid": "CA1",
                                            "callerNumber": "+15550001111",
                                            "dialledNumber": "+15552223333"}}
    h.vapi.answer()
    assert h.links[0].started and session.vapi_call_id == "vapi-call-1"
    assert h.board.by_vapi_call("vapi-call-1") is session
    session.end("test")
    h.assert_clean()


def test_repeated_webhook_reuses_the_session() -> None:
    h = Harness()
    first, _ = h.call(stream=False)
    again = h.board.open_call(CallInfo("CA1"))
    assert again is first and len(h.vapi.requests) == 1
    first.end("test")
    h.assert_clean()


def test_uplink_forwards_each_frame_at_once_and_fills_gaps() -> None:
    h = Harness()
    session, _ = h.call()
    link = h.links[0]
    session.on_stream_audio(audio(b"\x01" * FRAME, 0))
    assert link.audio == [b"\x01" * FRAME]  # same turn: no batching delay
    session.on_stream_audio(audio(b"\x02" * FRAME, 80, gap_frames=3))
    assert link.audio[1:] == [SILENCE_FRAME] * 3 + [b"\x02" * FRAME]
    assert session.counters.gap_fill_frames == 3
    assert session.counters.first_uplink_ms == 0
    session.end("test")
    h.assert_clean()


def test_uplink_keepalive_sends_silence_while_twilio_stalls_and_no_double_fill() -> None:
    h = Harness()
    session, _ = h.call()
    link = h.links[0]
    session.on_stream_audio(audio(ts=0))
    h.tick(2)
    assert len(link.audio) == 1  # 40 ms: not yet a stall
    h.tick(3)  # 100 ms without media: silence catches the uplink up
    sent = len(link.audio) - 1
    assert sent >= 3 and link.audio[1:] == [SILENCE_FRAME] * sent
    # Twilio resumes; its timestamp gap (4 frames) is partly covered by keep-alive
    session.on_stream_audio(audio(b"\x03" * FRAME, 100, gap_frames=4))
    fill = link.audio[1 + sent:-1]
    assert len(fill) == max(0, 4 - sent)
    assert link.audio[-1] == b"\x03" * FRAME
    session.end("test")
    h.assert_clean()


def test_caller_audio_is_dropped_not_replayed_while_vapi_reconnects() -> None:
    h = Harness()
    session, _ = h.call()
    link = h.links[0]
    link.state = Reconnecting(1, 1)
    for i in range(50):
        session.on_stream_audio(audio(bytes([i]) * FRAME, i * 20))
    assert link.audio == []
    assert session.counters.uplink_dropped_frames == 50
    link.open()
    assert link.audio == []  # nothing stale replayed (reconnect_audio_ms = 0)
    session.on_stream_audio(audio(b"\x09" * FRAME, 1000))
    assert link.audio == [b"\x09" * FRAME]
    session.end("test")
    h.assert_clean()


def test_a_small_amount_of_audio_can_be_kept_across_a_reconnect() -> None:
    h = Harness(bridge={"reconnect_audio_ms": "60"})
    session, _ = h.call()
    link = h.links[0]
    link.state = Reconnecting(1, 1)
    for i in range(10):
        session.on_stream_audio(audio(bytes([i]) * FRAME, i * 20))
    link.open()
    assert link.audio == [bytes([i]) * FRAME for i in (7, 8, 9)]
    session.end("test")
    h.assert_clean()


def test_bursty_vapi_audio_is_paced_to_twilio_with_a_bounded_lead() -> None:
    h = Harness()
    session, sock = h.call()
    session.on_link_event(SpeechUpdate(status="started", role="assistant"))
    session.on_link_audio(b"\x20" * FRAME * 50)  # one second in one burst
    lead_frames = len(sock.media())
    assert lead_frames == 4  # the 80 ms lead goes out at once, not the whole second
    h.tick(10)
    assert len(sock.media()) == lead_frames + 10  # then one frame per 20 ms tick
    assert session.counters.first_downlink_ms == 0
    marks = [name for kind, name in sock.sent if kind == "mark"]
    assert marks and all(name.startswith("g") for name in marks)
    session.end("test")
    h.assert_clean()


def test_audio_before_the_stream_plays_once_it_starts() -> None:
    h = Harness()
    session, sock = h.call(stream=False)
    session.on_link_audio(b"\x20" * FRAME * 10)
    assert h.attach("CA1", sock) is session
    assert len(sock.media()) == 4
    session.end("test")
    h.assert_clean()


def test_barge_in_clears_in_the_same_turn_and_drops_the_old_generation() -> None:
    h = Harness()
    session, sock = h.call()
    session.on_link_audio(b"\x20" * FRAME * 100)
    h.tick(5)
    sock.sent.clear()
    session.on_link_event(UserInterrupted())
    assert sock.sent == [("clear", None)]  # synchronously, nothing before it
    assert session.counters.barge_ins == 1
    assert len(session.counters.barge_in_reaction_us) == 1
    assert session.counters.barge_in_queued_ms[0] <= 80
    session.on_link_event(SpeechUpdate(status="started", role="user"))  # same barge-in
    assert session.counters.barge_ins == 1
    h.tick(10)
    assert sock.media() == []  # nothing from the old utterance after the clear
    session.on_link_audio(b"\x30" * FRAME * 3)  # the assistant's next answer plays
    assert sock.media()[0] == b"\x30" * FRAME
    session.end("test")
    h.assert_clean()


def test_barge_in_signals_are_configurable() -> None:
    h = Harness(bridge={"barge_in_signals": "user-interrupted"})
    session, sock = h.call()
    session.on_link_audio(b"\x20" * FRAME * 20)
    session.on_link_event(SpeechUpdate(status="started", role="user"))
    assert ("clear", None) not in sock.sent
    session.on_link_event(UserInterrupted())
    assert ("clear", None) in sock.sent
    session.end("test")
    h.assert_clean()


def test_marks_echoed_after_clear_are_not_counted_as_played() -> None:
    h = Harness()
    session, sock = h.call()
    session.on_link_audio(b"\x20" * FRAME * 20)
    marks = [name for kind, name in sock.sent if kind == "mark"]
    session.on_link_event(UserInterrupted())
    for name in marks:  # Twilio echoes every pending mark on clear
        session.on_stream_mark(name)
    stats = session.playout.stats(h.board.now_ns())
    assert stats.frames_played == 0 and stats.stale_mark_echoes == len(marks)
    session.end("test")
    h.assert_clean()


# -- back-pressure ---------------------------------------------------------------------


def marks_sent(sock: FakeStream) -> list[str]:
    return [name for kind, name in sock.sent if kind == "mark"]


def test_without_mark_echoes_at_most_max_unconfirmed_ms_is_sent() -> None:
    h = Harness()  # [bridge] max_unconfirmed_ms = 1000 by default
    session, sock = h.call()
    session.on_link_audio(b"\x20" * FRAME * 150)  # 3 s of speech
    h.tick(100)  # 2 s: Twilio reads nothing, echoes nothing
    assert len(sock.media()) == 50
    traffic = session.traffic(h.board.now_ns())
    assert traffic["unconfirmed_ms"] == 1000
    assert traffic["unconfirmed_holds"] == 1 and traffic["held_ms"] > 0
    assert traffic["buffered_ms"] == 2000  # the rest waits here, clearable
    for name in marks_sent(sock):  # Twilio reads and plays it: echoes come back
        session.on_stream_mark(name)
    h.tick(1)
    assert len(sock.media()) > 50
    assert session.playout.stats(h.board.now_ns()).underruns == 0
    session.end("test")
    h.assert_clean()


def test_a_paused_media_socket_gets_no_frames_until_it_drains() -> None:
    h = Harness()
    session, sock = h.call()
    session.on_link_audio(b"\x20" * FRAME * 100)
    assert len(sock.media()) == 4
    session.on_stream_paused(sock, True)  # the transport's write buffer is full
    session.on_link_audio(b"\x21" * FRAME * 10)
    h.tick(20)
    assert len(sock.media()) == 4 and marks_sent(sock) == []
    assert session.counters.stream_pauses == 1
    traffic = session.traffic(h.board.now_ns())
    assert traffic["paused_holds"] == 1 and traffic["unconfirmed_holds"] == 0
    session.on_stream_paused(sock, False)
    h.tick(1)
    assert len(sock.media()) == 8  # the lead again at once, then one frame a tick
    session.end("test")
    h.assert_clean()


def test_barge_in_while_paused_still_clears_at_once() -> None:
    h = Harness()
    session, sock = h.call()
    session.on_link_audio(b"\x20" * FRAME * 100)
    session.on_stream_paused(sock, True)
    h.tick(5)
    sock.sent.clear()
    session.on_link_event(UserInterrupted())
    assert sock.sent == [("clear", None)]
    stats = session.playout.stats(h.board.now_ns())
    assert stats.unconfirmed_ms == 0 and stats.buffered_ms == 0
    assert not session.playout.held
    session.on_stream_paused(sock, False)
    session.on_link_audio(b"\x30" * FRAME * 3)
    assert sock.media() == [b"\x30" * FRAME] * 3
    session.end("test")
    h.assert_clean()


@dataclass
class PausedStream(FakeStream):
    writing_paused: bool = True


def test_a_stream_already_paused_when_it_attaches_gets_nothing_until_it_drains() -> None:
    h = Harness()
    session, _ = h.call(stream=False)
    sock = PausedStream()
    h.attach("CA1", sock)
    session.on_link_audio(b"\x20" * FRAME * 10)
    h.tick(3)
    assert sock.media() == []
    session.on_stream_paused(sock, False)
    h.tick(1)
    assert len(sock.media()) == 4
    session.end("test")
    h.assert_clean()


def test_pauses_of_a_replaced_stream_change_nothing() -> None:
    h = Harness()
    session, first = h.call()
    second = FakeStream()
    h.attach("CA1", second)
    session.on_stream_paused(first, True)  # the old socket backs up as it closes
    session.on_link_audio(b"\x20" * FRAME * 5)
    assert len(second.media()) == 4 and session.counters.stream_pauses == 0
    session.end("test")
    h.assert_clean()


def test_dtmf_becomes_an_add_message() -> None:
    h = Harness()
    session, _ = h.call()
    session.on_stream_dtmf("5")
    (message,) = h.links[0].messages
    assert isinstance(message, AddMessage)
    assert "5" in message.message.content and message.trigger_response_enabled
    session.end("test")
    h.assert_clean()


def test_dtmf_can_be_ignored() -> None:
    h = Harness(bridge={"dtmf": "ignore"})
    session, _ = h.call()
    session.on_stream_dtmf("5")
    assert h.links[0].messages == [] and session.counters.dtmf_digits == 1
    session.end("test")
    h.assert_clean()


def test_pcm_mode_transcodes_both_ways() -> None:
    h = Harness(vapi={"audio_format": "pcm_s16le", "sample_rate": "16000"})
    session, sock = h.call()
    session.on_stream_audio(audio(b"\xff" * FRAME))
    assert len(h.links[0].audio[0]) == 640  # 20 ms of 16 kHz 16-bit PCM
    session.on_link_audio(b"\x00\x00" * 320 * 10)  # 200 ms of PCM silence
    assert len(sock.media()) == 4
    session.end("test")
    h.assert_clean()


def test_second_stream_replaces_the_first_with_one_vapi_call() -> None:
    h = Harness()
    session, first = h.call()
    second = FakeStream()
    assert h.attach("CA1", second) is session
    assert first.closes and first.closes[0][0] == 1000
    session.on_stream_closed(first)  # the old socket's close does not end the call
    assert not session.ended and len(h.vapi.requests) == 1
    session.on_link_audio(b"\x20" * FRAME * 5)
    assert second.media() and not first.media()
    session.end("test")
    h.assert_clean()


END_CAUSES = [
    ("twilio-stop", lambda h, s, sock: s.on_stream_stopped()),
    ("twilio-socket-closed", lambda h, s, sock: s.on_stream_closed(sock)),
    ("twilio-status", lambda h, s, sock: h.board.call_status("CA1", "completed")),
    ("twilio-stream-error", lambda h, s, sock: h.board.end_call("CA1", "twilio-stream-error")),
    ("vapi-ended", lambda h, s, sock: s.on_link_event(StatusUpdate(status="ended"))),
    ("vapi-ended", lambda h, s, sock: s.on_link_event(EndOfCallReport())),
    ("vapi-ended", lambda h, s, sock: h.board.vapi_call_ended("vapi-call-1")),
    ("drain-timeout", lambda h, s, sock: h.registry.end_all("drain-timeout")),
    ("admin-hangup", lambda h, s, sock: h.board.end_call("CA1", "admin-hangup")),
]


@pytest.mark.parametrize(("cause", "trigger"), END_CAUSES)
def test_each_end_cause_ends_both_legs_once(cause: str, trigger: Any) -> None:
    h = Harness()
    session, sock = h.call()
    trigger(h, session, sock)
    assert session.ended and session.cause == cause
    link = h.links[0]
    assert link.messages.count("end-call") == 1  # Vapi always gets end-call
    assert len(sock.closes) == (0 if cause == "twilio-socket-closed" else 1)
    trigger(h, session, sock)  # a second signal changes nothing
    session.end("again")
    assert session.cause == cause and link.stops == 1
    h.assert_clean()


def test_non_terminal_status_does_not_end_the_call() -> None:
    h = Harness()
    session, _ = h.call()
    assert h.board.call_status("CA1", "in-progress") is False
    assert not session.ended
    assert h.board.call_status("CA-unknown", "completed") is False
    session.end("test")
    h.assert_clean()


def test_vapi_link_loss_with_hangup_policy_ends_the_call() -> None:
    h = Harness(vapi={"on_vapi_loss": "hangup"})
    session, sock = h.call()
    session.on_link_failed(LinkFailure("no pong", 3, "hangup"))
    assert session.cause == "vapi-lost" and sock.closes
    h.assert_clean()


def test_vapi_link_loss_with_recreate_policy_creates_a_new_call() -> None:
    h = Harness()
    session, _sock = h.call()
    h.links[0].state = Closed(LinkClosedReason.STOPPED)
    session.on_link_failed(LinkFailure("refused", 3, "recreate"))
    assert not session.ended
    (_, _, overrides) = h.vapi.requests[1]
    assert overrides["firstMessage"].startswith("Sorry, I lost you")
    lost, orphan = h.links  # the lost Vapi call is ended over a socket of its own
    assert orphan.created is lost.created and orphan.started and orphan.stops == 1
    h.vapi.answer()
    replacement = h.links[2]
    replacement.open()
    session.on_stream_audio(audio(b"\x04" * FRAME))
    assert replacement.audio == [b"\x04" * FRAME]
    assert h.board.vapi_call_ended("vapi-call-1") is False  # the lost call's end is no news
    assert not session.ended
    session.end("test")
    assert replacement.messages == ["end-call"]
    assert lost.messages == []  # the lost link could not send end-call
    h.assert_clean()


def test_a_stream_for_a_call_that_already_ended_is_refused() -> None:
    h = Harness()
    session, _ = h.call(stream=False)
    h.board.call_status("CA1", "completed")  # the status callback beat the stream
    assert session.ended
    assert h.attach("CA1", FakeStream()) is None  # no second call for a finished one
    assert len(h.vapi.requests) == 1
    h.assert_clean()


def test_stream_never_arriving_ends_the_vapi_call() -> None:
    h = Harness(bridge={"stream_wait_timeout": "2"})
    session, _ = h.call(stream=False)
    h.tick(99)
    assert not session.ended
    h.tick(2)
    assert session.cause == "stream-never-arrived"
    assert h.links[0].messages == ["end-call"]
    h.assert_clean()


def test_idle_stream_ends_the_call() -> None:
    h = Harness(twilio={"idle_timeout": "1"})
    session, _ = h.call()
    h.tick(49)
    assert not session.ended
    h.tick(2)
    assert session.cause == "idle-timeout"
    h.assert_clean()


def test_max_call_duration_ends_the_call() -> None:
    h = Harness(bridge={"max_call_duration": "10"}, twilio={"idle_timeout": "60"})
    session, _ = h.call()
    h.clock.advance(9.9)
    h.board.tick()
    assert not session.ended
    h.clock.advance(0.2)
    h.board.tick()
    assert session.cause == "max-duration"
    h.assert_clean()


def test_vapi_call_created_after_the_call_ended_is_ended_too() -> None:
    h = Harness()
    session, _ = h.call(open_link=False, stream=False)
    session.end("twilio-status")
    created = h.vapi.answer()  # Vapi answers late
    (orphan,) = h.links
    assert orphan.created is created and orphan.started and orphan.stops == 1
    assert h.board.orphans_ended == 1
    h.assert_clean()


def test_vapi_creation_failure_ends_the_call() -> None:
    h = Harness()
    session, _ = h.call(open_link=False, stream=False)
    h.vapi.pending.pop(0).errback(Failure(VapiUnavailableError(3, "HTTP 503")))
    assert session.cause == "vapi-create-failed"
    assert h.links == []
    h.assert_clean()


def test_normal_end_uses_rest_hangup_when_available() -> None:
    h = Harness(twilio={"account_sid": "AC" + "0" * 32})
    session, _sock = h.call()
    session.on_link_event(StatusUpdate(status="ended", ended_reason="assistant-ended-call"))
    assert h.rest is not None and h.rest.hung_up == ["CA1"]
    h.assert_clean()


def test_caller_hangup_needs_no_rest_hangup() -> None:
    h = Harness(twilio={"account_sid": "AC" + "0" * 32, "hangup_via": "rest"})
    session, _ = h.call()
    session.on_stream_stopped()
    assert h.rest is not None and h.rest.hung_up == []
    h.assert_clean()


def test_a_stream_for_an_unknown_call_opens_it_when_admitted() -> None:
    h = Harness(gateway={"max_concurrent_calls": "1"})
    sock = FakeStream()
    session = h.attach("CA9", sock)
    assert session is not None and session.stream is sock
    assert h.attach("CA10", FakeStream()) is None  # at capacity: refused
    assert session is not None
    session.end("test")
    h.vapi.answer()  # its Vapi call arrives after the end: ended as an orphan
    h.assert_clean()


def test_a_failing_session_tick_ends_only_that_call() -> None:
    h = Harness()
    bad, _ = h.call("CA1")
    good, _ = h.call("CA2")

    def boom(now: int) -> None:
        raise RuntimeError("boom")

    bad.tick = boom  # type: ignore[method-assign]
    h.tick()
    assert bad.cause == "internal-error" and not good.ended
    good.end("test")
    h.assert_clean()


class FakeRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def caller(self, payload: bytes, at_ns: int, timestamp_ms: int | None = None) -> None:
        self.events.append(("caller", (at_ns, timestamp_ms)))

    def assistant(self, payload: bytes, play_at_ns: int) -> None:
        self.events.append(("assistant", play_at_ns))

    def cleared(self, at_ns: int) -> None:
        self.events.append(("cleared", at_ns))

    def tick(self, now_ns: int) -> None:
        pass

    def close(self, at_ns: int | None = None) -> Deferred[None]:
        self.events.append(("close", at_ns))
        return succeed(None)


class FakeRecordings:
    def __init__(self) -> None:
        self.recorders: list[FakeRecorder] = []

    def recorder(self, call_sid: str, call_log: Any = None) -> FakeRecorder:
        self.recorders.append(FakeRecorder())
        return self.recorders[-1]


def test_recording_sees_caller_frames_assistant_play_times_clears_and_the_end() -> None:
    h = Harness()
    recordings = FakeRecordings()
    h.board._recordings = recordings  # type: ignore[assignment]
    session, _ = h.call()
    (rec,) = recordings.recorders
    now = h.board.now_ns()
    session.on_stream_audio(audio(ts=40))
    last: Any = rec.events[-1]
    assert last == ("caller", (now, 40))
    session.on_link_audio(b"\x20" * FRAME * 10)
    plays = [at for kind, at in rec.events if kind == "assistant"]
    # the lead goes out at once and plays back to back from now
    assert plays == [now + i * 20_000_000 for i in range(4)]
    session.on_link_event(UserInterrupted())
    last = rec.events[-1]
    assert last == ("cleared", now)
    session.end("test")
    last = rec.events[-1]
    assert last[0] == "close"
    h.assert_clean()


@pytest.mark.parametrize("state", [Connecting(0, 1), Reconnecting(2, 1)])
def test_ending_while_the_link_is_not_open_still_ends_the_vapi_call(state: LinkState) -> None:
    h = Harness()
    session, _ = h.call(open_link=False, stream=False)
    h.vapi.answer()
    h.links[0].state = state
    session.end("twilio-status")
    original, orphan = h.links
    assert original.messages == []  # it could not send end-call
    assert orphan.created is original.created and orphan.started  # so a socket of its own
    assert h.board.orphans_ended == 1
    h.assert_clean()
