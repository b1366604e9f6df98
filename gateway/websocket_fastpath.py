"""A fast path through Autobahn for the small, whole data frames that make up a call.

Every 20 ms of a call is a few small WebSocket messages on each leg: Twilio's ``media``
JSON (about 400 bytes), Vapi's binary audio, the gateway's ``media``/``mark`` JSON.
Autobahn handles each of them in a long chain of generic Python (frame state machine,
one XOR masker object per frame, per-message futures for observers, debug-log argument
formatting, statistics), which is most of the gateway's CPU per call.  The
:class:`FastFrames` mixin takes the common case off that chain and leaves everything
else to Autobahn, unchanged:

- **receive**: while the socket is open and Autobahn holds no partial frame or message,
  each complete, unfragmented, uncompressed text or binary frame of at most 65535
  bytes in a chunk read from TCP is parsed here (header, the peer's mask, size limits)
  and handed straight to ``onMessage``.  A text frame takes this path only if it is
  ASCII (a subset of UTF-8: nothing for Autobahn's validator to find).  The first frame
  that is anything else (a control frame, a fragment, a frame cut by the end of the
  read, a frame over a size limit, the wrong masking for the side, non-ASCII text, a
  reserved bit ...) and everything after it go through Autobahn exactly as before, so
  its checks, close codes and errors are those Autobahn gives.
- **send**: ``sendMessage`` of a whole message while open, with no fragmentation,
  compression, send queue or frame logging configured, builds the frame in one join
  (client frames masked with a fresh random key, as Autobahn masks them) and writes
  it to the transport -- on a plain TCP connection with nothing buffered, straight to
  the socket (:func:`write_now`), or, between ``cork()`` and ``uncork()``, holds it
  to write several messages in one ``send``; anything else is Autobahn's
  ``sendMessage``.

Masking small payloads uses one big-integer XOR (about 1 µs for 400 bytes, against
3-5 µs for Autobahn's per-frame NVX masker object); payloads over
:data:`_INT_XOR_MAX` bytes use Autobahn's NVX masker.  Autobahn's traffic statistics
are kept the same on both paths.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Final, cast

from autobahn.websocket import xormasker
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import tcp

__all__ = ["FastFrames", "no_delay", "write_now", "xor_mask"]

_OPEN: Final = WebSocketProtocol.STATE_OPEN
_GROUND: Final = WebSocketProtocol.SEND_STATE_GROUND
_TEXT_FIN: Final = 0x81
_BINARY_FIN: Final = 0x82
_MASKED: Final = 0x80
_LEN16: Final = 126
_LEN64: Final = 127
_INT_XOR_MAX: Final = 1024
"""Up to this size the big-integer XOR is faster than Autobahn's NVX masker."""
_getrandbits = random.getrandbits
_DIRECT_TRANSPORTS: Final = frozenset({tcp.Server, tcp.Client})
_create_xor_masker: Any = xormasker.create_xor_masker  # type: ignore[attr-defined]


def xor_mask(mask: bytes, data: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``mask`` (RFC 6455 masking and unmasking)."""
    n = len(data)
    if n > _INT_XOR_MAX:
        masked: bytes = _create_xor_masker(mask, n).process(data)
        return masked
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport`` -- straight to the socket when it can.

    Twisted's TCP ``write`` only buffers: the bytes go out later in the reactor turn,
    after two ``epoll_ctl`` calls (register for writability, and unregister once sent)
    and a ``doWrite`` dispatch.  For a plain TCP connection whose buffer is empty, this
    sends at once instead (one ``send``); whatever the socket does not take, and any
    error, goes to ``transport.write`` as before, so order and error handling are
    Twisted's.  Any other transport (TLS, in-memory) gets ``transport.write``.
    """
    if (
        type(transport) in _DIRECT_TRANSPORTS
        and not transport._tempDataBuffer
        and not transport.dataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error Twisted's own write will then report
            sent = 0
        if sent < len(data):
            transport.write(data[sent:] if sent else data)
        return
    transport.write(data)


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP (or TLS-over-TCP) transport, if it is one.

    Autobahn means to (its ``tcpNoDelay`` option defaults to true), but its
    ``connectionMade`` reads the option before copying it from the factory, so the
    attempt fails quietly and every WebSocket connection keeps Nagle on: a small frame
    written while an earlier one is unacknowledged then waits for the peer's ACK.
    """
    with contextlib.suppress(Exception):  # not a TCP transport (e.g. in-memory tests)
        transport.setTcpNoDelay(True)


class FastFrames:
    """Mix in before Autobahn's Twisted protocol class (see the module docstring)::

        class MediaStreamProtocol(FastFrames, WebSocketServerProtocol): ...

    Only for protocols that implement ``onMessage`` and none of the frame-level hooks
    (``onMessageBegin``, ``onMessageFrame*``), and that register no ``message``
    observers (``on("message", ...)``); otherwise every frame takes Autobahn's path.
    """

    fast_frames_in = 0
    """Messages received on the fast path (class default; counted per protocol)."""
    fast_frames_out = 0
    """Messages sent on the fast path."""
    _fast_in: tuple[int, int, int, bool] | None = None
    """Once open: (mask bit expected, frame limit, message limit, validate UTF-8), or
    None when the connection's options rule the fast receive path out."""
    _fast_out: tuple[bool, int] | None = None
    """Once open: (mask, message limit), or None when the options rule the fast send
    path out."""
    _fast_checked = False
    _corked: list[bytes] | None = None

    def connectionMade(self) -> None:
        cast(Any, super()).connectionMade()
        no_delay(cast(Any, self).transport)

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's Twisted adapter formats a debug log line's arguments for every read
        # (its logger is pinned at info here, so the line is never written).
        self._dataReceived(data)

    def _check_fast(self) -> None:
        """Which fast paths this open connection's options allow (fixed once open:
        extensions are negotiated and options copied before)."""
        ws: Any = self
        self._fast_checked = True
        plain = (ws._perMessageCompress is None and not ws.logOctets and not ws.logFrames
                 and not ws.trackedTimings)
        if not plain:
            return
        server = bool(ws.factory.isServer)
        self._fast_in = (_MASKED if server else 0, ws.maxFramePayloadSize,
                         ws.maxMessagePayloadSize, bool(ws.utf8validateIncoming))
        if server:
            mask = False
            allowed = not ws.maskServerFrames
        else:
            mask = allowed = bool(ws.maskClientFrames and ws.applyMask)
        if allowed and not ws.autoFragmentSize:
            self._fast_out = (mask, ws.maxMessagePayloadSize)

    def _dataReceived(self, data: bytes) -> None:
        ws: Any = self  # an Autobahn protocol (Autobahn's attributes are untyped here)
        if ws.state != _OPEN:
            cast(Any, super())._dataReceived(data)
            return
        if not self._fast_checked:
            self._check_fast()
        config = self._fast_in
        listeners = ws._listeners
        if (
            config is None
            or ws.data
            or ws.current_frame is not None
            or ws.inside_message
            or ws.failedByMe
            or ws.autoPingTimeoutCall is not None
            or (listeners and listeners.get("message"))
        ):
            cast(Any, super())._dataReceived(data)
            return
        want_mask, max_frame, max_message, validate = config
        stats = ws.trafficStats
        stats.incomingOctetsWireLevel += len(data)
        on_message = ws._onMessage
        end = len(data)
        pos = 0
        done = 0
        while end - pos >= 2:
            b0 = data[pos]
            if b0 == _TEXT_FIN:
                binary = False
            elif b0 == _BINARY_FIN:
                binary = True
            else:
                break
            b1 = data[pos + 1]
            masked = b1 & _MASKED
            if masked != want_mask:
                break
            length = b1 & 0x7F
            start = pos + 2
            if length == _LEN16:
                if end - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < _LEN16:
                    break
                start += 2
            elif length == _LEN64:
                break
            if (0 < max_frame < length) or (0 < max_message < length):
                break
            if masked:
                start += 4
            stop = start + length
            if stop > end:
                break
            if masked:
                payload = xor_mask(data[start - 4 : start], data[start:stop])
            else:
                payload = data[start:stop]
            if not binary and validate and not payload.isascii():
                break
            pos = stop
            done += 1
            stats.incomingOctetsWebSocketLevel += length
            stats.incomingOctetsAppLevel += length
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            on_message(payload, binary)
            if ws.state != _OPEN:
                break
        self.fast_frames_in += done
        if pos < end:
            # Autobahn's own _dataReceived tail, for the rest (wire octets counted above)
            ws.data = data[pos:] if pos else data
            ws.consumeData()

    def sendMessage(self, payload: bytes, isBinary: bool = False,  # noqa: N803
                    fragmentSize: int | None = None, sync: bool = False,  # noqa: N803
                    doNotCompress: bool = False) -> None:  # noqa: N803
        if fragmentSize is not None or sync or not self._send_fast(payload, isBinary):
            self.uncork()  # Autobahn writes at once: what was held goes first
            cast(Any, super()).sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)

    def cork(self) -> None:
        """Hold the messages sent from now on until :meth:`uncork`, which writes them in
        one ``send`` (e.g. the ``media`` and ``mark`` of one playout tick)."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Write what :meth:`cork` held, in order."""
        frames, self._corked = self._corked, None
        if frames:
            write_now(cast(Any, self).transport, b"".join(frames))

    def _send_fast(self, payload: bytes, is_binary: bool) -> bool:
        """Send one whole message on the fast path; False: it is Autobahn's to send."""
        ws: Any = self
        if ws.state != _OPEN or ws.send_queue or ws.send_state != _GROUND:
            return False
        if not self._fast_checked:
            self._check_fast()
        config = self._fast_out
        if config is None or type(payload) is not bytes or type(is_binary) is not bool:
            return False
        mask, max_message = config
        length = len(payload)
        if length > 0xFFFF or 0 < max_message < length:
            return False
        first = b"\x82" if is_binary else b"\x81"
        if not mask:
            if length <= 125:
                frame = b"".join((first, length.to_bytes(1, "big"), payload))
            else:
                frame = b"".join((first, b"\x7e", length.to_bytes(2, "big"), payload))
        else:
            key = _getrandbits(32).to_bytes(4, "big")
            if length <= 125:
                header = first + (length | _MASKED).to_bytes(1, "big")
            else:
                header = first + b"\xfe" + length.to_bytes(2, "big")
            frame = b"".join((header, key, xor_mask(key, payload)))
        stats = ws.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingOctetsAppLevel += length
        stats.outgoingOctetsWebSocketLevel += length
        stats.outgoingWebSocketFrames += 1
        stats.outgoingOctetsWireLevel += len(frame)
        self.fast_frames_out += 1
        corked = self._corked
        if corked is not None:
            corked.append(frame)
        else:
            write_now(ws.transport, frame)
        return True
