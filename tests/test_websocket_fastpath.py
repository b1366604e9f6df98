"""The WebSocket fast path (gateway.websocket_fastpath) against plain Autobahn: the same
messages in, the same bytes out, Autobahn's own handling of everything else."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from typing import Any

import pytest
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]
from twisted.internet.testing import StringTransport

from gateway.websocket_fastpath import FastFrames, write_now, xor_mask


class Transport(StringTransport):
    """StringTransport, lenient about a producer Autobahn unregisters when it fails."""

    def unregisterProducer(self) -> None:
        self.producer = None


class _Recording:
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code)


class PlainServer(_Recording, WebSocketServerProtocol):  # type: ignore[misc]
    pass


class FastServer(_Recording, FastFrames, WebSocketServerProtocol):  # type: ignore[misc]
    pass


class PlainClient(_Recording, WebSocketClientProtocol):  # type: ignore[misc]
    pass


class FastClient(_Recording, FastFrames, WebSocketClientProtocol):  # type: ignore[misc]
    pass


def open_server(cls: Any, max_size: int = 4096) -> Any:
    factory = WebSocketServerFactory("ws://127.0.0.1:9")
    factory.setProtocolOptions(maxMessagePayloadSize=max_size, maxFramePayloadSize=max_size,
                               autoPingInterval=0)
    factory.protocol = cls
    protocol: Any = factory.buildProtocol(None)
    protocol.makeConnection(Transport())
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.dataReceived(
        ("GET / HTTP/1.1\r\nHost: 127.0.0.1:9\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert protocol.state == protocol.STATE_OPEN
    protocol.transport.clear()
    return protocol


def open_client(cls: Any) -> Any:
    factory = WebSocketClientFactory("ws://127.0.0.1:9/")
    factory.setProtocolOptions(autoPingInterval=0)
    factory.protocol = cls
    protocol: Any = factory.buildProtocol(None)
    protocol.makeConnection(Transport())
    request = protocol.transport.value().decode()
    key = next(line.split(": ", 1)[1] for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    protocol.transport.clear()
    protocol.dataReceived(
        ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    assert protocol.state == protocol.STATE_OPEN
    return protocol


def frame(payload: bytes, opcode: int = 1, fin: bool = True, masked: bool = True) -> bytes:
    """One client-to-server (masked) or server-to-client frame."""
    header = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length <= 125:
        header += bytes([mask_bit | length])
    elif length <= 0xFFFF:
        header += bytes([mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header += bytes([mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + xor_mask(mask, payload)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 400, 1024, 1025, 5000])
def test_masking_matches_autobahns(size: int) -> None:
    mask, data = os.urandom(4), os.urandom(size)
    expected = create_xor_masker(mask, size).process(data) if size else b""
    assert xor_mask(mask, data) == expected
    assert xor_mask(mask, xor_mask(mask, data)) == data


STREAMS = [
    # whole small frames, several per read
    [frame(b'{"event":"media"}'), frame(b"x" * 300), frame(b"\x00\x01", opcode=2)],
    # a frame cut across reads, then whole ones
    [frame(b"a" * 200)[:50], frame(b"a" * 200)[50:] + frame(b"b" * 10)],
    # non-ASCII text (Autobahn validates it), a ping in between, a fragmented message
    [frame("héllo".encode()), frame(b"p", opcode=9), frame(b"one", fin=False),
     frame(b"two", opcode=0)],
    # invalid UTF-8: Autobahn fails the connection (1007)
    [frame(b"ok"), frame(b"\xff\xfe")],
    # over the size limit: Autobahn fails the connection (1009)
    [frame(b"ok"), frame(b"z" * 5000)],
    # an unmasked client frame: a protocol error
    [frame(b"ok"), frame(b"bad", masked=False)],
]


@pytest.mark.parametrize("reads", STREAMS)
def test_the_server_fast_path_receives_what_autobahn_receives(reads: list[bytes]) -> None:
    plain, fast = open_server(PlainServer), open_server(FastServer)
    for data in reads:
        plain.dataReceived(data)
        fast.dataReceived(data)
    assert fast.messages == plain.messages
    assert fast.state == plain.state
    assert fast.transport.value() == plain.transport.value()  # pongs, close frames
    assert fast.trafficStats.incomingWebSocketMessages == \
        plain.trafficStats.incomingWebSocketMessages


def test_the_client_fast_path_takes_unmasked_frames_and_refuses_masked_ones() -> None:
    plain, fast = open_client(PlainClient), open_client(FastClient)
    data = frame(b"\x55" * 160, opcode=2, masked=False) * 3 + frame(b"{}", masked=False)
    plain.dataReceived(data)
    fast.dataReceived(data)
    assert fast.messages == plain.messages and len(fast.messages) == 4
    assert fast.fast_frames_in == 4
    bad = frame(b"masked", opcode=2, masked=True)
    plain.dataReceived(bad)
    fast.dataReceived(bad)
    assert fast.state == plain.state != plain.STATE_OPEN


def unmask_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each frame in ``data``, unmasked."""
    frames = []
    while data:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        masked = data[1] & 0x80
        mask = data[at:at + 4] if masked else b""
        at += 4 if masked else 0
        payload = data[at:at + length]
        frames.append((data[0], xor_mask(mask, payload) if masked else payload))
        data = data[at + length:]
    return frames


@pytest.mark.parametrize("size", [0, 10, 125, 126, 400, 2000])
def test_sent_frames_decode_as_autobahns_do(size: int) -> None:
    payload = os.urandom(size)
    for plain_cls, fast_cls, opener in ((PlainServer, FastServer, open_server),
                                        (PlainClient, FastClient, open_client)):
        plain, fast = opener(plain_cls), opener(fast_cls)
        plain.transport.clear()
        fast.transport.clear()
        for protocol in (plain, fast):
            protocol.sendMessage(payload, isBinary=True)
            protocol.sendMessage(b'{"event":"mark"}')
        assert unmask_frames(fast.transport.value()) == unmask_frames(plain.transport.value())
        assert fast.fast_frames_out == 2
        if opener is open_client:  # a fresh mask per frame
            assert fast.transport.value()[2:6] != plain.transport.value()[2:6]


def test_cork_holds_messages_for_one_write_in_order() -> None:
    server = open_server(FastServer)
    server.cork()
    server.sendMessage(b"media")
    server.sendMessage(b"mark")
    assert server.transport.value() == b""
    server.uncork()
    assert unmask_frames(server.transport.value()) == [(0x81, b"media"), (0x81, b"mark")]
    server.uncork()  # nothing held: nothing more
    server.transport.clear()
    server.cork()
    server.sendMessage(b"held")
    server.sendClose(1000)  # Autobahn's own write: not held back
    server.uncork()
    assert unmask_frames(server.transport.value())[-1][1] == b"held"


def test_write_now_sends_straight_to_an_idle_tcp_socket() -> None:
    from twisted.internet import tcp

    left, right = socket.socketpair()
    try:
        transport: Any = object.__new__(tcp.Server)  # write_now checks the exact type
        transport.socket = left
        transport.connected = True
        transport.disconnecting = False
        transport._writeDisconnected = False
        transport.dataBuffer = b""
        transport._tempDataBuffer = []
        written: list[bytes] = []
        transport.write = written.append
        write_now(transport, b"hello")
        assert right.recv(16) == b"hello" and written == []
        transport._tempDataBuffer = [b"queued"]  # something buffered: keep the order
        write_now(transport, b"later")
        assert written == [b"later"]
        write_now(StringTransport(), b"x")  # any other transport: its own write
    finally:
        left.close()
        right.close()
