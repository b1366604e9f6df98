"""CPU per 20 ms frame through a call session, each direction, mu-law and PCM modes;
memory per active session; barge-in reaction time.

Uplink: a Twilio ``media`` JSON text frame → MediaStreamState → CallSession →
(transcode) → the Vapi link's send.  Downlink: a Vapi audio burst → CallSession →
(transcode) → PlayoutBuffer → per-tick frames → Twilio ``media`` JSON text.
The sockets are stand-ins that only count bytes, so the figures are the gateway's own
per-frame work (Autobahn's framing is not included).

Run:  .venv/bin/python bench/bench_bridge_frames.py
"""

from __future__ import annotations

import base64
import gc
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ini import minimal_ini
from twisted.internet.task import Clock

from gateway.admission import Admission
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.bridge.session import CallInfo, CallSession
from gateway.bridge.switchboard import Switchboard
from gateway.config import parse_settings
from gateway.logs import configure_structlog
from gateway.twilio.stream import MediaStreamState
from gateway.vapi.calls import CreatedCall, SocketUrl
from gateway.vapi.codec import UserInterrupted
from gateway.vapi.link import Open

FRAMES = 20_000


class CountingLink:
    state = Open(1)

    def __init__(self, owner: Any, created: Any) -> None:
        self.bytes = 0

    def start(self) -> None:
        pass

    def stop(self) -> Any:
        from twisted.internet.defer import succeed
        return succeed(None)

    def when_open(self) -> Any:
        from twisted.internet.defer import succeed
        return succeed(None)

    def send_audio(self, audio: bytes) -> bool:
        self.bytes += len(audio)
        return True

    def send_message(self, message: Any) -> bool:
        return True


class CountingSocket:
    """The media socket: encodes like the real one, counts bytes."""

    def __init__(self, state: MediaStreamState) -> None:
        self.state = state
        self.bytes = 0
        self.marks: list[str] = []

    def send_media(self, payload: bytes) -> None:
        self.bytes += len(self.state.media_frame(payload))

    def send_mark(self, name: str) -> None:
        self.bytes += len(self.state.mark_frame(name))
        self.marks.append(name)

    def send_clear(self) -> None:
        self.bytes += len(self.state.clear_frame())

    def close(self, code: int, reason: str) -> None:
        pass


class Vapi:
    def create_call(self, choice: Any, audio: Any, overrides: Any = None) -> Any:
        from twisted.internet.defer import succeed
        return succeed(CreatedCall("vapi-1", SocketUrl("ws://127.0.0.1:9/x/transport")))


def build(audio_format: str) -> tuple[Switchboard, Clock]:
    vapi = {"audio_format": audio_format,
            "sample_rate": "16000" if audio_format == "pcm_s16le" else "8000"}
    settings = parse_settings(minimal_ini(vapi=vapi, twilio={"idle_timeout": "3600"},
                                          bridge={"max_call_duration": "86400"}), "b.ini", {})
    clock = Clock()
    clock.advance(1000)
    registry = InMemoryCallRegistry()
    board = Switchboard(settings, registry, Admission(registry, 100000), clock, Vapi(),
                        CountingLink, None)
    return board, clock


def start_call(board: Switchboard, call_sid: str) -> tuple[CallSession, CountingSocket]:
    session = board.open_call(CallInfo(call_sid))
    state = MediaStreamState()
    state.receive_frame(json.dumps({"event": "connected", "protocol": "Call",
                                    "version": "1.0.0"}).encode())
    started = state.receive_frame(json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ" + call_sid,
        "start": {"accountSid": "AC1", "streamSid": "MZ" + call_sid, "callSid": call_sid,
                  "tracks": ["inbound"], "customParameters": {},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                  "channels": 1}}}).encode())
    socket = CountingSocket(state)
    board.attach_stream(socket, started)  # type: ignore[arg-type]
    return session, socket


def media_frames(n: int, stream_sid: str) -> list[bytes]:
    payload = base64.b64encode(bytes(range(160))).decode()
    return [json.dumps({"event": "media", "sequenceNumber": str(i + 2), "streamSid": stream_sid,
                        "media": {"track": "inbound", "chunk": str(i + 1),
                                  "timestamp": str(i * 20), "payload": payload}}).encode()
            for i in range(n)]


def bench_uplink(audio_format: str) -> float:
    board, _ = build(audio_format)
    session, socket = start_call(board, "CA-up")
    state = socket.state
    frames = media_frames(FRAMES, "MZCA-up")
    gc.collect()
    started = time.perf_counter_ns()
    for frame in frames:
        event = state.receive_frame(frame)
        session.on_stream_audio(event)  # type: ignore[arg-type]
    return (time.perf_counter_ns() - started) / FRAMES / 1000


def bench_downlink(audio_format: str) -> float:
    board, clock = build(audio_format)
    session, socket = start_call(board, "CA-down")
    pcm = audio_format == "pcm_s16le"
    burst = (b"\x00\x01" * 320 * 10) if pcm else (b"\x55" * 160 * 10)  # 200 ms bursts
    marks = socket.marks
    ripe: list[str] = []
    gc.collect()
    started = time.perf_counter_ns()
    for i in range(FRAMES):
        if i % 10 == 0:
            session.on_link_audio(burst)
        if i % 5 == 0:  # Twilio echoes each mark once played: here 100-200 ms after it
            for name in ripe:
                session.on_stream_mark(name)
            ripe = marks[:]
            marks.clear()
        clock.advance(0.02)
        session.tick(board.now_ns())
    assert session.playout.stats(board.now_ns()).frames_sent >= FRAMES - 10
    return (time.perf_counter_ns() - started) / FRAMES / 1000


def memory_per_session(n: int = 500) -> float:
    board, _ = build("mulaw")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        start_call(board, f"CA{i}")
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n / 1024


def barge_in_reaction() -> list[float]:
    board, clock = build("mulaw")
    reactions = []
    for i in range(200):
        session, _ = start_call(board, f"CA-b{i}")
        session.on_link_audio(b"\x55" * 160 * 50)
        clock.advance(0.02)
        session.tick(board.now_ns())
        session.on_link_event(UserInterrupted())
        reactions.append(session.counters.barge_in_reaction_us[-1])
        session.end("bench")
    return reactions


def main() -> None:
    configure_structlog("error")  # per-call log lines are not the per-frame cost
    print(f"python {sys.version.split()[0]}; {FRAMES} frames per figure")
    for fmt in ("mulaw", "pcm_s16le"):
        ups = [bench_uplink(fmt) for _ in range(5)]
        downs = [bench_downlink(fmt) for _ in range(5)]
        print(f"{fmt:10s} uplink   {min(ups):6.2f} us/frame (median {statistics.median(ups):.2f})")
        print(f"{fmt:10s} downlink {min(downs):6.2f} us/frame "
              f"(median {statistics.median(downs):.2f})")
    print(f"memory per active session (mulaw, Python heap): {memory_per_session():.1f} KiB")
    reactions = sorted(barge_in_reaction())
    print(f"barge-in reaction (signal handled -> clear written): "
          f"p50 {reactions[len(reactions) // 2]:.1f} us, "
          f"p99 {reactions[int(len(reactions) * 0.99)]:.1f} us")


if __name__ == "__main__":
    main()
