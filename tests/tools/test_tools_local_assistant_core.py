"""The local assistant's sans-io parts: the script language, settings, clips, POST /call
validation, and one call's schedule (bursts, interrupt, stall, drop, echo, silence,
end-call, rejoin) driven with integer-nanosecond times and no reactor at all."""

from __future__ import annotations

import itertools
import json
import random
import struct
from typing import Any

import numpy as np
import pytest

from gateway.tools.local_assistant.call_request import (
    CallRequestError,
    call_answer,
    parse_call_request,
)
from gateway.tools.local_assistant.clips import (
    PACKAGED_CLIPS,
    ClipError,
    clip_audio,
    clip_path,
    read_wav,
)
from gateway.tools.local_assistant.script import FailCreate, ScriptError, parse_script
from gateway.tools.local_assistant.scripted_call import (
    AbortSocket,
    CallEnded,
    CallPlan,
    CallRecord,
    CloseSocket,
    Emit,
    Output,
    PlayAudio,
    ScriptedCall,
    SendAudio,
    SendEvent,
    SocketWentDark,
    UtteranceOver,
    audio_ns,
    plan_utterance,
)
from gateway.tools.local_assistant.settings import LocalAssistantSettings, settings_from_strings
from gateway.vapi.calls import AudioFormat

MS = 1_000_000
SECOND = 1_000_000_000
MULAW = AudioFormat("mulaw", 8000)
PCM16K = AudioFormat("pcm_s16le", 16000)
AGENT_MULAW = clip_audio("agent", MULAW)
AGENT_NS = audio_ns(MULAW, len(AGENT_MULAW))


# --- script language ---------------------------------------------------------------


def test_scripts_parse_with_their_arguments() -> None:
    script = parse_script("speak:agent,caller+interrupt:800+stall:1000:4000")
    assert script.speak and script.utterances == ("agent", "caller")
    assert script.interrupt and script.interrupt_at_ms == 800
    assert script.stall and (script.stall_at_ms, script.stall_ms) == (1000, 4000)
    assert parse_script("echo:250").echo_delay_ms == 250
    dropping = parse_script("drop:2000+refuse-reconnect")
    assert dropping.speak and dropping.drop_at_ms == 2000 and dropping.refuse_reconnect
    assert parse_script("interrupt").speak  # interrupt, stall and drop imply speak
    assert parse_script("fail-create").fail_create == FailCreate("status", 500, None)
    assert parse_script("fail-create:503*2+speak").fail_create == FailCreate("status", 503, 2)
    assert parse_script("fail-create:concurrency").fail_create == FailCreate("concurrency", 400)
    assert parse_script("fail-create:slow").fail_create == FailCreate("slow", 201)
    assert parse_script("fail-create:late*1").fail_create == FailCreate("late", 201, 1)
    later = parse_script("fail-create:503*2+speak").without_fail_create()
    assert later.text == "speak" and later.fail_create is None and later.speak
    assert parse_script("fail-create").without_fail_create().text == "silent"


def test_socket_behaviours_parse_with_their_socket_counts() -> None:
    flapping = parse_script("speak:agent,agent+flap:800*3")
    assert flapping.flap and flapping.flap_every_ms == 800 and flapping.flap_sockets == 3
    assert parse_script("flap").flap_every_ms is None and parse_script("flap").flap_sockets is None
    dark = parse_script("speak+no-pong:500*1")
    assert dark.no_pong and dark.no_pong_at_ms == 500 and dark.no_pong_sockets == 1
    assert parse_script("silent+no-pong+flap").no_pong  # they say nothing themselves
    assert not parse_script("no-pong").speak


@pytest.mark.parametrize("text", [
    "", "sing", "speak+speak", "echo:soon", "stall:1:2:3", "refuse-reconnect",
    "fail-create:404", "fail-create:later", "fail-create*0", "speak*2", "silent+speak",
    "speak:agent,,caller", "interrupt:99999999", "flap:0", "flap*0", "no-pong:1:2",
    "echo*2", "silent+speak+no-pong",
])
def test_bad_scripts_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ScriptError) as error:
        parse_script(text)
    assert str(error.value)


# --- settings ----------------------------------------------------------------------


def test_settings_parse_from_strings_and_check_bounds() -> None:
    settings = settings_from_strings({"script": "echo", "echo-delay-ms": "300",
                                      "speed_min": "1.5", "utterances": "agent, caller"})
    assert settings.script == "echo" and settings.echo_delay_ms == 300
    assert settings.speed_min == 1.5 and settings.utterances == ("agent", "caller")
    with pytest.raises(ValueError, match="unknown setting"):
        settings_from_strings({"colour": "blue"})
    with pytest.raises(ValueError, match="not a valid int"):
        settings_from_strings({"seed": "x"})
    with pytest.raises(ValueError, match="script"):
        LocalAssistantSettings(script="sing")
    with pytest.raises(ValueError, match="speed_max"):
        LocalAssistantSettings(speed_min=3, speed_max=2)
    with pytest.raises(ValueError, match="burst_max_ms"):
        LocalAssistantSettings(burst_min_ms=300, burst_max_ms=100)


# --- clips -------------------------------------------------------------------------


def test_packaged_clips_exist_and_are_small() -> None:
    sizes = {name: clip_path(name).stat().st_size for name in PACKAGED_CLIPS}
    assert sum(sizes.values()) < 200_000
    assert 10 * SECOND < AGENT_NS < 12 * SECOND


def test_clips_convert_to_pcm_at_the_call_rate_with_the_same_length() -> None:
    pcm = clip_audio("agent", PCM16K)
    assert len(pcm) == len(AGENT_MULAW) * 2 * 2
    assert audio_ns(PCM16K, len(pcm)) == AGENT_NS
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    assert np.sqrt(np.mean(samples ** 2)) > 500  # speech, not silence
    assert clip_audio("agent", MULAW) is AGENT_MULAW  # straight from the file, cached


def _wav(tag: int, bits: int, rate: int, data: bytes, channels: int = 1) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * bits // 8, bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_reader_reads_pcm_and_refuses_what_it_cannot_play() -> None:
    clip = read_wav(_wav(1, 16, 24000, b"\x01\x00\x02\x00"))
    assert (clip.encoding, clip.sample_rate, clip.data) == ("pcm_s16le", 24000, b"\x01\x00\x02\x00")
    for bad in (b"nope", _wav(1, 16, 8000, b"", channels=2), _wav(3, 32, 8000, b""),
                _wav(1, 16, 96000, b"")):
        with pytest.raises(ClipError):
            read_wav(bad)
    with pytest.raises(ClipError, match="unknown clip"):
        clip_path("song")


# --- POST /call validation ---------------------------------------------------------

DEFAULT = parse_script("speak")
TRANSPORT = {"provider": "vapi.websocket",
             "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000}}


def _parse(body: Any) -> Any:
    return parse_call_request(json.dumps(body).encode(), DEFAULT)


def test_a_gateway_body_parses_and_the_script_is_chosen_by_precedence() -> None:
    request = _parse({"assistantId": "local:echo", "transport": TRANSPORT})
    assert request.audio == MULAW and request.script.text == "echo"
    overridden = _parse({"assistantId": "local:echo", "transport": TRANSPORT,
                         "assistantOverrides": {"variableValues": {"localScript": "speak+stall"},
                                                "firstMessage": "Hello again"}})
    assert overridden.script.text == "speak+stall"
    assert overridden.first_message == "Hello again"
    inline = _parse({"assistant": {"metadata": {"localScript": "drop"},
                                   "silenceTimeoutSeconds": 12}, "transport": TRANSPORT})
    assert inline.script.drop and inline.silence_timeout_s == 12
    plain = _parse({"assistantId": "5f1c0d8e", "transport": {"provider": "vapi.websocket"}})
    assert plain.script is DEFAULT
    assert plain.audio == PCM16K  # Vapi's default format


@pytest.mark.parametrize(("body", "fragment"), [
    ([], "JSON object"),
    ({"assistantId": "a"}, "transport must be given"),
    ({"assistantId": "a", "transport": {"provider": "twilio"}}, "transport.provider"),
    ({"assistantId": "a", "transport": {"provider": "vapi.websocket",
                                        "audioFormat": {"format": "opus"}}}, "format"),
    ({"assistantId": "a", "transport": {"provider": "vapi.websocket",
                                        "audioFormat": {"sampleRate": 4000}}}, "sampleRate"),
    ({"assistantId": "a", "transport": {"provider": "vapi.websocket",
                                        "audioFormat": {"container": "wav"}}}, "container"),
    ({"assistantId": "a", "phoneNumberId": "p", "transport": TRANSPORT}, "phoneNumberId"),
    ({"assistantId": "a", "assistant": {}, "transport": TRANSPORT}, "exactly one"),
    ({"transport": TRANSPORT}, "exactly one"),
    ({"assistantId": "a", "colour": 1, "transport": TRANSPORT}, "colour should not exist"),
    ({"assistantId": "local:sing", "transport": TRANSPORT}, "unknown behaviour"),
    ({"assistantId": "a", "transport": TRANSPORT,
      "assistantOverrides": {"silenceTimeoutSeconds": 1}}, "silenceTimeoutSeconds"),
])
def test_bad_bodies_are_refused_with_vapi_style_messages(body: Any, fragment: str) -> None:
    with pytest.raises(CallRequestError) as error:
        _parse(body)
    assert any(fragment in message for message in error.value.messages), error.value.messages


def test_not_json_is_refused() -> None:
    with pytest.raises(CallRequestError, match="JSON"):
        parse_call_request(b"{nope", DEFAULT)


def test_the_call_answer_carries_the_socket_url_or_not() -> None:
    request = _parse({"assistantId": "local:echo", "transport": TRANSPORT})
    answer = call_answer("c1", request, "ws://127.0.0.1:9/c1/transport", 0.0)
    assert answer["id"] == "c1" and answer["status"] == "queued"
    assert answer["transport"]["websocketCallUrl"] == "ws://127.0.0.1:9/c1/transport"
    assert answer["createdAt"] == "1970-01-01T00:00:00.000Z"
    assert "websocketCallUrl" not in call_answer("c1", request, None, 0.0)["transport"]


# --- one utterance's plan ----------------------------------------------------------


def _plan(script: str, **settings: Any) -> CallPlan:
    return CallPlan.resolve(parse_script(script), LocalAssistantSettings(**settings))


def _audio_times(steps: list[tuple[int, Any]]) -> list[tuple[int, bytes]]:
    return [(at, step.payload) for at, step in steps if isinstance(step, PlayAudio)]


def _events(steps: list[tuple[int, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(at, step.event) for at, step in steps if isinstance(step, Emit)]


def test_an_utterance_comes_in_bursts_faster_than_real_time() -> None:
    steps = plan_utterance(AGENT_MULAW, MULAW, _plan("speak"), random.Random(1),
                           turn=0, clip="agent", cut=True)
    audio = _audio_times(steps)
    assert b"".join(payload for _, payload in audio) == AGENT_MULAW  # all of it, in order
    assert all(len(payload) == 160 for _, payload in audio[:-1])
    bursts: dict[int, int] = {}
    for at, payload in audio:
        bursts[at] = bursts.get(at, 0) + len(payload)
    times = sorted(bursts)
    sizes_ms = [bursts[t] // 8 for t in times]
    assert all(100 <= size <= 300 for size in sizes_ms[:-1])
    assert len(times) >= AGENT_NS // (300 * MS)
    # each burst follows the previous one sooner than the previous one's audio lasts,
    # at 2 to 5 times real time (within the 10 ms jitter)
    for (t0, t1), size in zip(itertools.pairwise(times), sizes_ms, strict=False):
        assert t1 - t0 <= size * MS / 2 + 20 * MS
        assert t1 - t0 >= size * MS / 5 - 20 * MS
    assert times[-1] < AGENT_NS / 2
    events = _events(steps)
    assert events[0] == (0, {"type": "speech-update", "status": "started", "role": "assistant",
                             "turn": 0})
    stopped_at, stopped = events[-2]
    assert stopped == {"type": "speech-update", "status": "stopped", "role": "assistant",
                       "turn": 0}
    assert stopped_at >= AGENT_NS and stopped_at > times[-1]  # when a real-time listener is done
    assert events[-1][1]["type"] == "transcript"
    assert isinstance(steps[-1][1], UtteranceOver)


def test_the_plan_is_the_same_for_the_same_seed() -> None:
    def plan(seed: int) -> list[tuple[int, Any]]:
        return plan_utterance(AGENT_MULAW, MULAW, _plan("speak"), random.Random(seed), turn=0,
                              clip="agent", cut=True)

    assert plan(5) == plan(5)
    assert [at for at, _ in plan(5)] != [at for at, _ in plan(6)]


def test_interrupt_stops_the_audio_and_sends_both_signals() -> None:
    steps = plan_utterance(AGENT_MULAW, MULAW, _plan("speak+interrupt:1500"), random.Random(1),
                           turn=0, clip="agent", cut=True)
    audio = _audio_times(steps)
    assert audio[-1][0] < 1500 * MS  # nothing after the barge-in
    sent = sum(len(payload) for _, payload in audio)
    assert 1500 * 8 < sent < len(AGENT_MULAW)  # ahead of real time, but not all of it
    at_interrupt = [event for at, event in _events(steps) if at == 1500 * MS]
    assert at_interrupt[:3] == [
        {"type": "user-interrupted", "turnId": "0"},
        {"type": "speech-update", "status": "started", "role": "user", "turn": 0},
        {"type": "speech-update", "status": "stopped", "role": "assistant", "turn": 0},
    ]
    assert (2500 * MS, {"type": "speech-update", "status": "stopped", "role": "user",
                        "turn": 0}) in _events(steps)
    assert steps[-1] == (2500 * MS, UtteranceOver())
    untouched = plan_utterance(AGENT_MULAW, MULAW, _plan("speak+interrupt:1500"),
                               random.Random(1), turn=1, clip="agent", cut=False)
    assert b"".join(p for _, p in _audio_times(untouched)) == AGENT_MULAW


def test_stall_pauses_the_audio_then_continues() -> None:
    plain = plan_utterance(AGENT_MULAW, MULAW, _plan("speak"), random.Random(3), turn=0,
                           clip="agent", cut=True)
    steps = plan_utterance(AGENT_MULAW, MULAW, _plan("speak+stall:1000:3000"), random.Random(3),
                           turn=0, clip="agent", cut=True)
    times = sorted({at for at, _ in _audio_times(steps)})
    gaps = [(b - a, a) for a, b in itertools.pairwise(times)]
    longest, before = max(gaps)
    assert longest >= 3000 * MS and before < 1000 * MS <= before + longest
    assert b"".join(p for _, p in _audio_times(steps)) == AGENT_MULAW
    assert (2000 * MS, {"type": "hang"}) in _events(steps)
    # a real-time listener hears the end later, by the part of the pause the audio
    # already sent ahead could not cover
    assert plain[-1][0] < steps[-1][0] < plain[-1][0] + 3000 * MS


def test_drop_cuts_the_utterance_with_an_abort() -> None:
    steps = plan_utterance(AGENT_MULAW, MULAW, _plan("speak+drop:1200"), random.Random(1),
                           turn=0, clip="agent", cut=True)
    assert steps[-1][0] == 1200 * MS and type(steps[-1][1]).__name__ == "DropSocket"
    assert all(at < 1200 * MS for at, _ in steps[1:-1])


# --- a whole call ------------------------------------------------------------------


class CallRun:
    """Drives a ScriptedCall through time, collecting its outputs with their times."""

    def __init__(self, script: str, audio: AudioFormat = MULAW, **settings: Any) -> None:
        values = LocalAssistantSettings(**settings)
        self.record = CallRecord("call-1", script, audio, {}, created_at_ns=0)
        self.call = ScriptedCall(self.record, CallPlan.resolve(parse_script(script), values),
                                 random.Random(0), lambda clip: clip_audio(clip, audio))
        self.now = 0
        self.outputs: list[tuple[int, Output]] = []

    def run_until(self, at_ns: int) -> None:
        while True:
            due = self.call.next_due_ns()
            if due is None or due > at_ns:
                break
            self.now = max(self.now, due)
            self.outputs += [(self.now, out) for out in self.call.due(self.now)]
        self.now = at_ns

    def step(self) -> None:
        self.outputs += [(self.now, out) for out in self.call.due(self.now)]

    def events(self) -> list[dict[str, Any]]:
        return [out.event for _, out in self.outputs if isinstance(out, SendEvent)]

    def audio(self) -> list[tuple[int, SendAudio]]:
        return [(at, out) for at, out in self.outputs if isinstance(out, SendAudio)]


def test_speak_says_the_first_message_after_the_socket_opens() -> None:
    run = CallRun("speak")
    assert run.call.connect(0) == 1
    run.run_until(20 * SECOND)
    events = run.events()
    assert events[0] == {"type": "status-update", "status": "in-progress"}
    assert events[1]["type"] == "speech-update" and events[1]["status"] == "started"
    first_audio = run.audio()[0][0]
    assert first_audio == 200 * MS  # first_message_delay_ms
    assert run.record.downlink_bytes == len(AGENT_MULAW)
    assert run.record.open  # the assistant then waits (no more utterances)


def test_echo_returns_the_callers_audio_after_the_delay() -> None:
    run = CallRun("echo")
    connection = run.call.connect(0)
    assert connection is not None
    for n in range(3):
        run.run_until(n * 20 * MS)
        run.call.audio_received(run.now, connection, bytes([n]) * 160)
        run.step()
    run.run_until(SECOND)
    assert [(at, out.payload[:1]) for at, out in run.audio()] == [
        (200 * MS, b"\x00"), (220 * MS, b"\x01"), (240 * MS, b"\x02")]
    assert run.record.uplink_frames == 3 and bytes(run.record.uplink_audio[:1]) == b"\x00"


def test_end_call_sends_ended_and_the_report_then_closes() -> None:
    run = CallRun("speak")
    connection = run.call.connect(0)
    assert connection is not None
    run.run_until(SECOND)
    assert run.call.text_received(run.now, connection, b'{"type":"end-call"}') == "end-call"
    run.step()
    tail = [out for _, out in run.outputs][-4:]
    assert tail == [
        SendEvent(1, {"type": "status-update", "status": "ended",
                      "endedReason": "customer-ended-call"}),
        SendEvent(1, {"type": "end-of-call-report", "endedReason": "customer-ended-call",
                      "durationSeconds": 1.0}),
        CloseSocket(1, 1000, "call ended"),
        CallEnded("customer-ended-call"),
    ]
    assert run.record.end_call_received and not run.record.open
    assert run.call.next_due_ns() is None  # nothing more: the utterance was cancelled
    run.call.disconnected(run.now, connection, True, 1000)
    assert run.record.close_codes == [1000]
    assert run.call.connect(run.now) is None and run.record.refused_connections == 1


def test_control_messages_are_recorded_and_unknown_ones_ignored() -> None:
    run = CallRun("silent")
    connection = run.call.connect(0)
    assert connection is not None
    kinds = [run.call.text_received(0, connection, frame) for frame in (
        b'{"type":"say","content":"hi"}',
        b'{"type":"add-message","message":{"role":"system","content":"key 5"}}',
        b'{"type":"mystery"}', b"[1]", b"{bad")]
    assert kinds == ["control", "control", "ignored", "invalid", "invalid"]
    assert run.record.message_types() == ["say", "add-message"]
    assert run.record.ignored_messages == ["mystery"] and run.record.invalid_messages == 2
    assert run.record.open


def test_silence_ends_the_call_unless_audio_keeps_coming() -> None:
    run = CallRun("silent", silence_timeout_s=5)
    connection = run.call.connect(0)
    assert connection is not None
    for n in range(400):  # 8 s of uplink
        run.run_until(n * 20 * MS)
        run.call.audio_received(run.now, connection, b"\xff" * 160)
    run.run_until(12 * SECOND)
    assert run.record.open
    run.run_until(13 * SECOND)
    assert run.record.ended_reason == "silence-timed-out"
    assert run.record.ended_at_ns == 399 * 20 * MS + 5 * SECOND
    assert run.events()[-1]["type"] == "end-of-call-report"


def test_a_call_never_joined_ends_on_silence_too() -> None:
    run = CallRun("speak", silence_timeout_s=30)
    run.run_until(31 * SECOND)
    assert run.record.ended_reason == "silence-timed-out"
    assert [out for _, out in run.outputs] == [CallEnded("silence-timed-out")]


def test_drop_then_rejoin_goes_on_with_the_next_utterance() -> None:
    run = CallRun("speak:agent,caller+drop:1000", utterance_gap_ms=500)
    assert run.call.connect(0) == 1
    run.run_until(1200 * MS + 1)
    assert (1200 * MS, AbortSocket(1)) in run.outputs  # 200 ms first-message delay + 1000
    assert run.record.drops == 1 and run.call.connection is None and run.record.open
    run.call.disconnected(run.now, 1, False, None)  # the abort, as the server sees it
    assert run.call.connect(run.now) == 2  # rejoin allowed
    run.run_until(30 * SECOND)
    second = [out for _, out in run.audio() if out.connection == 2]
    assert b"".join(out.payload for out in second) == clip_audio("caller", MULAW)
    assert run.record.connections == 2


def test_drop_with_refuse_reconnect_ends_the_call() -> None:
    run = CallRun("speak+drop:1000+refuse-reconnect")
    run.call.connect(0)
    run.run_until(2 * SECOND)
    assert run.record.ended_reason == "local-assistant-dropped-socket"
    assert [out for _, out in run.outputs][-2:] == [AbortSocket(1),
                                                    CallEnded("local-assistant-dropped-socket")]
    assert run.call.connect(run.now) is None


def test_a_clean_close_by_the_client_ends_the_call_and_a_lost_one_does_not() -> None:
    run = CallRun("speak")
    run.call.connect(0)
    run.call.disconnected(0, 1, False, None)
    assert run.record.open
    assert run.call.connect(0) == 2
    run.call.disconnected(0, 2, True, 1000)
    assert run.record.ended_reason == "customer-ended-call"


def test_a_second_socket_supersedes_the_first() -> None:
    run = CallRun("silent")
    run.call.connect(0)
    assert run.call.connect(0) == 2
    run.step()
    assert AbortSocket(1) in [out for _, out in run.outputs]
    run.call.disconnected(0, 1, False, None)  # the old socket's close changes nothing
    assert run.call.connection == 2 and run.record.open


def test_pcm_calls_get_640_byte_frames() -> None:
    run = CallRun("speak", audio=PCM16K)
    run.call.connect(0)
    run.run_until(20 * SECOND)
    sizes = {len(out.payload) for _, out in run.audio()[:-1]}
    assert sizes == {640}
    assert run.record.downlink_bytes == len(clip_audio("agent", PCM16K))


def test_flap_aborts_each_socket_after_it_opens_for_the_first_n() -> None:
    run = CallRun("speak:agent,agent,agent+flap:700*2", utterance_gap_ms=100)
    assert run.call.connect(0) == 1
    run.run_until(700 * MS)
    assert (700 * MS, AbortSocket(1)) in run.outputs and run.call.connection is None
    run.call.disconnected(run.now, 1, False, None)
    assert run.call.connect(SECOND) == 2
    run.run_until(SECOND + 700 * MS)
    assert (SECOND + 700 * MS, AbortSocket(2)) in run.outputs
    run.call.disconnected(run.now, 2, False, None)
    assert run.call.connect(2 * SECOND) == 3  # the third socket is left alone
    run.run_until(20 * SECOND)
    assert run.record.drops == 2 and run.call.connection == 3 and run.record.open
    assert [out for _, out in run.outputs].count(AbortSocket(3)) == 0
    assert any(out.connection == 3 for _, out in run.audio())


def test_no_pong_leaves_a_socket_open_silent_and_unanswered() -> None:
    run = CallRun("speak:agent,agent+no-pong:500*1", utterance_gap_ms=100)
    assert run.call.connect(0) == 1
    run.run_until(400 * MS)
    assert run.call.ping_received(1) is True and run.record.pings == 1
    run.run_until(500 * MS)
    assert (500 * MS, SocketWentDark(1)) in run.outputs
    sent = len(run.outputs)
    assert run.call.ping_received(1) is False and run.record.pings_unanswered == 1
    assert run.call.audio_received(run.now, 1, b"\xff" * 160) is False  # ignored
    run.run_until(5 * SECOND)
    assert len(run.outputs) == sent  # nothing more on the dark socket, and no close
    assert run.record.open and run.record.dark_connections == 1
    assert run.call.connect(5 * SECOND) == 2  # the client gave up on it and rejoined
    run.run_until(8 * SECOND)
    assert run.call.ping_received(2) is True
    assert any(out.connection == 2 for _, out in run.audio())  # the next utterance
