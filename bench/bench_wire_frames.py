"""CPU per WebSocket message through Autobahn, with and without the gateway's fast path
(:mod:`gateway.websocket_fastpath`), on in-memory transports (no syscalls: the kernel's
share of a real socket comes on top).

The three messages of a call's hot path, each on the side of the gateway that
handles it:

- **receive** a Twilio ``media`` frame: a masked ~400-byte JSON text frame into a
  server protocol, up to ``onMessage``;
- **send** Vapi audio: a 160-byte binary frame from a client protocol (masked);
- **send** a Twilio ``media`` frame: a ~300-byte JSON text frame from a server protocol.

Run:  .venv/bin/python bench/bench_wire_frames.py
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.testing import StringTransport

from gateway.websocket_fastpath import FastFrames, xor_mask

MESSAGES = 20_000


class _Counting:
    received = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        self.received += 1


class PlainServer(_Counting, WebSocketServerProtocol):  # type: ignore[misc]
    pass


class FastServer(_Counting, FastFrames, WebSocketServerProtocol):  # type: ignore[misc]
    pass


class PlainClient(_Counting, WebSocketClientProtocol):  # type: ignore[misc]
    pass


class FastClient(_Counting, FastFrames, WebSocketClientProtocol):  # type: ignore[misc]
    pass


def open_server(cls: Any) -> Any:
    factory = WebSocketServerFactory("ws://127.0.0.1:9")
    factory.setProtocolOptions(maxMessagePayloadSize=65536, maxFramePayloadSize=65536,
                               autoPingInterval=0)
    factory.protocol = cls
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.dataReceived(
        ("GET / HTTP/1.1\r\nHost: 127.0.0.1:9\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert protocol.state == protocol.STATE_OPEN, transport.value()
    transport.clear()
    return protocol


def open_client(cls: Any) -> Any:
    factory = WebSocketClientFactory("ws://127.0.0.1:9/")
    factory.setProtocolOptions(autoPingInterval=0)
    factory.protocol = cls
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    request = transport.value().decode()
    key = next(line.split(": ", 1)[1] for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key"))
    import hashlib
    accept = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    transport.clear()
    protocol.dataReceived(
        ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    assert protocol.state == protocol.STATE_OPEN
    return protocol


def twilio_media_frame() -> bytes:
    payload = json.dumps({
        "event": "media", "sequenceNumber": "42", "streamSid": "MZ" + "0" * 32,
        "media": {"track": "inbound", "chunk": "41", "timestamp": "820",
                  "payload": base64.b64encode(bytes(range(160))).decode()}},
        separators=(",", ":")).encode()
    mask = os.urandom(4)
    return b"\x81" + bytes([0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + \
        xor_mask(mask, payload)


def receive(protocol: Any, frame: bytes) -> None:
    for _ in range(MESSAGES):
        protocol.dataReceived(frame)
    protocol.transport.clear()


def send_binary(protocol: Any, payload: bytes) -> None:
    for _ in range(MESSAGES):
        protocol.sendMessage(payload, isBinary=True)
    protocol.transport.clear()


def send_text(protocol: Any, payload: bytes) -> None:
    for _ in range(MESSAGES):
        protocol.sendMessage(payload)
    protocol.transport.clear()


def per_message_us(run: Any, protocol: Any, data: bytes) -> float:
    best = []
    for _ in range(5):
        started = time.process_time_ns()
        run(protocol, data)
        best.append((time.process_time_ns() - started) / MESSAGES / 1000)
    return statistics.median(best)


def main() -> None:
    frame = twilio_media_frame()
    audio = b"\x55" * 160
    media = b'{"event":"media","streamSid":"MZ' + b"0" * 32 + b'","media":{"payload":"' + \
        base64.b64encode(b"\x55" * 160) + b'"}}'
    print(f"python {sys.version.split()[0]}; {MESSAGES} messages per figure, "
          "CPU time (median of 5)")
    for name, server_cls, client_cls in (("autobahn", PlainServer, PlainClient),
                                         ("fast path", FastServer, FastClient)):
        server = open_server(server_cls)
        client = open_client(client_cls)
        sender = open_server(server_cls)
        print(f"{name:10s} receive Twilio media {per_message_us(receive, server, frame):6.2f} us"
              f"   send Vapi audio (masked) {per_message_us(send_binary, client, audio):6.2f} us"
              f"   send Twilio media {per_message_us(send_text, sender, media):6.2f} us")
        assert server.received >= MESSAGES


if __name__ == "__main__":
    main()
