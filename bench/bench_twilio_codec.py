"""Benchmark of the Media Streams hot paths: µs per inbound and per outbound media message.

Run from the repository root::

    PYTHONPATH=. python bench/bench_twilio_codec.py [--messages N] [--repeat R]

Inbound: a JSON text frame as Autobahn delivers it (``bytes``) through
``MediaStreamState.receive_frame`` to an ``Audio`` event with the decoded 160-byte
payload (timestamps advance by 20 ms, so the gap logic runs as on a live call).
Outbound: 160 bytes of mu-law to the JSON frame bytes. Each figure is the best of
``R`` timed passes over ``N`` messages (timeit-style: the minimum is the least
disturbed run). A stdlib ``json`` + ``base64`` decode is timed for comparison.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import timeit
from collections.abc import Callable

import msgspec

from gateway.twilio.codec import MediaStreamDecoder, OutboundEncoder
from gateway.twilio.stream import Audio, MediaStreamState, Started

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
PAYLOAD = bytes(range(160))


def inbound_frames(count: int) -> list[bytes]:
    payload = base64.b64encode(PAYLOAD).decode()
    return [
        json.dumps(
            {
                "event": "media",
                "sequenceNumber": str(index + 2),
                "streamSid": STREAM_SID,
                "media": {
                    "track": "inbound",
                    "chunk": str(index + 1),
                    "timestamp": str(index * 20),
                    "payload": payload,
                },
            },
            separators=(",", ":"),
        ).encode()
        for index in range(count)
    ]


def started_state() -> MediaStreamState:
    state = MediaStreamState()
    state.receive_frame(b'{"event":"connected","protocol":"Call","version":"1.0.0"}')
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": STREAM_SID,
        "start": {
            "accountSid": "AC1",
            "streamSid": STREAM_SID,
            "callSid": "CA1",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {},
        },
    }
    if not isinstance(state.receive_frame(json.dumps(start).encode()), Started):
        raise SystemExit("the benchmark stream did not start")
    return state


def best_microseconds(run: Callable[[], None], messages: int, repeat: int) -> float:
    timer = timeit.Timer(run)
    return min(timer.repeat(repeat=repeat, number=1)) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    options = parser.parse_args()
    count: int = options.messages
    repeat: int = options.repeat

    frames = inbound_frames(count)
    decoder = MediaStreamDecoder()
    encoder = OutboundEncoder(STREAM_SID)

    def inbound_through_state() -> None:
        state = started_state()
        receive = state.receive_frame
        for frame in frames:
            receive(frame)

    def inbound_codec_only() -> None:
        decode = decoder.decode
        for frame in frames:
            decode(frame)

    def inbound_stdlib() -> None:
        for frame in frames:
            message = json.loads(frame)
            base64.b64decode(message["media"]["payload"])
            int(message["media"]["timestamp"])
            int(message["sequenceNumber"])

    def outbound_encoder() -> None:
        media = encoder.media
        for _ in range(count):
            media(PAYLOAD)

    def outbound_through_state() -> None:
        media = state_for_outbound.media_frame
        for _ in range(count):
            media(PAYLOAD)

    state_for_outbound = started_state()

    # Sanity: the figures measure real work with the right result.
    check = started_state()
    event = check.receive_frame(frames[0])
    if not (isinstance(event, Audio) and event.payload == PAYLOAD):
        raise SystemExit("inbound path did not produce the payload")
    if base64.b64decode(json.loads(encoder.media(PAYLOAD))["media"]["payload"]) != PAYLOAD:
        raise SystemExit("outbound path did not round-trip")

    print(
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"msgspec {msgspec.__version__}, {platform.machine()}; "
        f"{count} messages, best of {repeat}"
    )
    for label, run in (
        ("inbound  media JSON -> Audio (MediaStreamState)", inbound_through_state),
        ("inbound  media JSON -> MediaMessage (codec only)", inbound_codec_only),
        ("inbound  stdlib json.loads + b64decode (reference)", inbound_stdlib),
        ("outbound 160 B -> media JSON (OutboundEncoder)", outbound_encoder),
        ("outbound 160 B -> media JSON (MediaStreamState)", outbound_through_state),
    ):
        print(f"  {label:52s} {best_microseconds(run, count, repeat):6.2f} µs/msg")


if __name__ == "__main__":
    main()
