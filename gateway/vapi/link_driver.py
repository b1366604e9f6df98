"""The thin Twisted shell around the link state machine: Autobahn client + driver.

:class:`LinkDriver` executes the commands of a :class:`~gateway.vapi.link.LinkMachine`
for one Vapi call socket: it opens sockets through an injected *connector*,
runs the machine's named timers on an injected ``IReactorTime`` clock, and
turns socket events and timer expiries back into machine inputs (one at a
time: inputs raised while commands run are queued, never re-entered). The
owner -- the call's bridge, a :class:`LinkOwner` -- hears about every
transition, the audio, the decoded events, and the end.

- Binary frames are audio: handed to the owner as bytes. Empty frames, and
  odd-length frames when the format is 16-bit PCM, are dropped and counted.
- Text frames are decoded with :mod:`gateway.vapi.codec`; bad frames and
  unknown event types are counted and logged, never raised into Twisted. A
  call-end event (status-update ended, end-of-call-report) tells the machine
  the coming close is expected.
- The heartbeat is the machine's (ping payload = 8-byte sequence number);
  Autobahn's auto-ping stays off.

:func:`tls_connector` is the production connector: ``wss://`` through
``wrapClientTLS(optionsForClientTLS(host), HostnameEndpoint(...))`` (the
certificate and host name are verified; ``connectWS`` would not), ``ws://``
only to loopback hosts (:class:`~gateway.vapi.calls.SocketUrl` refuses the
rest). The upgrade request carries ``Authorization: Bearer <api key>``.

Neither the socket URL nor the API key is ever logged: the Autobahn protocol's
own logger is pinned at ``info``, because at ``debug`` it writes the whole
upgrade request (path and ``Authorization`` header included).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from gateway.logs import get_logger, redactor
from gateway.vapi.calls import USER_AGENT, AudioFormat, SocketUrl
from gateway.vapi.codec import (
    CallEvent,
    CallMessageError,
    ControlMessage,
    EndCall,
    UnknownEvent,
    decode_event,
    encode_message,
    is_call_end,
)
from gateway.vapi.link import (
    TIMER_INPUTS,
    CancelTimer,
    Closed,
    CloseSocket,
    ConnectFailed,
    Connecting,
    Ending,
    Failed,
    LinkClosedReason,
    LinkCommand,
    LinkFailure,
    LinkInput,
    LinkMachine,
    LinkSettings,
    LinkState,
    NotifyClosed,
    NotifyFailed,
    NotifyOpen,
    NotifyTransition,
    Open,
    OpenSocket,
    PongReceived,
    RemoteEnded,
    SendEndCall,
    SendPing,
    SocketClosed,
    SocketOpened,
    Start,
    StartTimer,
    Stop,
    Timer,
)
from gateway.vapi.reactor_time import NS_PER_SECOND, DelayedCall, now_ns, reactor_time
from gateway.websocket_fastpath import FastFrames

__all__ = [
    "CallSocketFactory",
    "CallSocketProtocol",
    "Connector",
    "LinkCounters",
    "LinkDriver",
    "LinkNotOpenError",
    "LinkOwner",
    "tls_connector",
]

log = get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES: Final = 1 << 20
"""conversation-update carries the whole conversation: allow a large text message."""
CLOSE_HANDSHAKE_TIMEOUT_S: Final = 2
"""Whole seconds (txaio rounds down: fires after 1 to 2 s)."""
_PING_PAYLOAD_BYTES: Final = 8
_MAX_REASON_CHARS: Final = 200


class LinkOwner(Protocol):
    """What the bridge implements to hear from its link (all called on the reactor thread)."""

    def on_link_open(self) -> None:
        """The socket is open: audio may flow (again, after a reconnect)."""

    def on_link_audio(self, audio: bytes) -> None:
        """One binary frame of assistant audio, in the call's audio format."""

    def on_link_event(self, event: CallEvent) -> None:
        """One decoded Vapi event (unknown types are counted, not delivered)."""

    def on_link_transition(self, old: LinkState, new: LinkState) -> None:
        """The link's state changed kind."""

    def on_link_failed(self, failure: LinkFailure) -> None:
        """Reconnecting gave up: recreate the call or hang up (``failure.on_vapi_loss``),
        then call :meth:`LinkDriver.stop`."""

    def on_link_closed(self, reason: LinkClosedReason) -> None:
        """The link is over (the socket may still be finishing its close)."""


class LinkNotOpenError(Exception):
    """The link ended or gave up before it ever opened."""


@dataclass
class LinkCounters:
    """What happened on one link, for metrics and the end-of-call log line."""

    audio_frames_in: int = 0
    audio_bytes_in: int = 0
    audio_frames_out: int = 0
    audio_dropped_not_open: int = 0
    messages_out: int = 0
    messages_dropped_not_open: int = 0
    events_in: int = 0
    events_unknown: int = 0
    frames_bad_text: int = 0
    frames_empty: int = 0
    frames_odd_length: int = 0
    frames_stale: int = 0
    pongs_unexpected: int = 0
    owner_errors: int = 0
    reconnects: int = 0


class CallSocketProtocol(FastFrames, WebSocketClientProtocol):  # type: ignore[misc]
    """One connection attempt to the call socket; reports everything to its driver."""

    # At debug, Autobahn logs the upgrade request: URL path and Authorization.
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    driver: LinkDriver
    socket_id: int

    def onOpen(self) -> None:
        self.driver._socket_opened(self.socket_id)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        self.driver._frame_received(self.socket_id, payload, isBinary)

    def onPong(self, payload: bytes) -> None:
        self.driver._pong_received(self.socket_id, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        self.driver._socket_closed(self.socket_id, wasClean, code, reason or "")


class CallSocketFactory(WebSocketClientFactory):
    """Builds the protocol for one connection attempt, tagged with its socket id."""

    protocol = CallSocketProtocol
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def __init__(
        self,
        driver: LinkDriver,
        socket_id: int,
        url: SocketUrl,
        api_key: str,
        connect_timeout_ns: int,
        max_message_bytes: int,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            url=url.reveal(),
            useragent=USER_AGENT,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            autoPingInterval=0,
            # Backstop only: the machine's CONNECT timer fires first.
            openHandshakeTimeout=math.ceil(connect_timeout_ns / NS_PER_SECOND) + 1,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT_S,
            serverConnectionDropTimeout=CLOSE_HANDSHAKE_TIMEOUT_S,
            maxMessagePayloadSize=max_message_bytes,
            maxFramePayloadSize=max_message_bytes,
        )
        self._driver = driver
        self._socket_id = socket_id

    def __repr__(self) -> str:
        return f"<CallSocketFactory socket {self._socket_id}>"

    def buildProtocol(self, addr: IAddress | None) -> CallSocketProtocol:
        protocol = cast(CallSocketProtocol, super().buildProtocol(addr))
        protocol.driver = self._driver
        protocol.socket_id = self._socket_id
        self._driver._protocol_built(self._socket_id, protocol)
        return protocol


Connector = Callable[[SocketUrl, CallSocketFactory], Deferred[Any]]
"""Connect ``factory`` to the URL's host; fires when the transport is connected."""


def tls_connector(reactor: Any, trust_root: Any = None) -> Connector:
    """The production connector: TLS with certificate and host name checks.

    ``trust_root`` (an ``IOpenSSLTrustRoot``) replaces the platform's CAs; tests
    use it, production leaves it ``None``.
    """

    def connect(url: SocketUrl, factory: CallSocketFactory) -> Deferred[Any]:
        # Typed Any: zope interfaces need the mypy-zope plugin to type-check.
        endpoint: Any = HostnameEndpoint(reactor, url.host, url.port)
        if url.secure:
            options = optionsForClientTLS(url.host, trustRoot=trust_root)
            endpoint = wrapClientTLS(options, endpoint)
        # else: SocketUrl allows plain ws:// to loopback hosts only
        connecting: Deferred[Any] = endpoint.connect(factory)
        return connecting

    return connect


@dataclass
class _Socket:
    """A connection attempt: its pending connect, then its protocol."""

    connecting: Deferred[Any] | None = None
    protocol: CallSocketProtocol | None = None
    closing: bool = False


class LinkDriver:
    """Runs one Vapi call socket for its owner (see the module docstring)."""

    def __init__(
        self,
        *,
        url: SocketUrl,
        api_key: str,
        audio: AudioFormat,
        owner: LinkOwner,
        clock: IReactorTime,
        connector: Connector,
        settings: LinkSettings | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        log_context: dict[str, str] | None = None,
    ) -> None:
        self._url = url
        self._api_key = api_key
        # Whatever logs it (a peer's error text, a traceback), the capability is
        # blanked in every log line while this link lives.
        self._capabilities = (url.reveal(), urlsplit(url.reveal()).path)
        redactor.add(*self._capabilities)
        self._odd_frames_invalid = audio.encoding == "pcm_s16le"
        self._owner = owner
        self._clock = reactor_time(clock)
        self._connector = connector
        self._machine = LinkMachine(settings or LinkSettings())
        self._max_message_bytes = max_message_bytes
        self._log = log.bind(**(log_context or {}))
        self.counters = LinkCounters()

        self._inbox: deque[tuple[LinkInput, int]] = deque()
        self._running = False
        self._timers: dict[Timer, DelayedCall] = {}
        self._sockets: dict[int, _Socket] = {}
        self._open_protocol: CallSocketProtocol | None = None
        self._open_waiters: list[Deferred[None]] = []
        self._closed_waiters: list[Deferred[LinkClosedReason]] = []

    # --- the owner's side ----------------------------------------------------

    @property
    def state(self) -> LinkState:
        """The machine's current state."""
        return self._machine.state

    def start(self) -> None:
        """Connect (a second call does nothing)."""
        self._feed(Start())

    def stop(self) -> Deferred[LinkClosedReason]:
        """End the link: end-call if open, close, cancel timers. Fires like :meth:`when_closed`."""
        self._feed(Stop())
        return self.when_closed()

    def when_open(self) -> Deferred[None]:
        """Fires when the socket is open; fails with :class:`LinkNotOpenError` if it
        fails or closes first."""
        state = self._machine.state
        if isinstance(state, Open):
            return succeed(None)
        if isinstance(state, (Closed, Failed)):
            return fail(LinkNotOpenError(f"link is {type(state).__name__.lower()}"))
        waiter: Deferred[None] = Deferred()
        self._open_waiters.append(waiter)
        return waiter

    def when_closed(self) -> Deferred[LinkClosedReason]:
        """Fires with the reason once the link is closed and no socket is left."""
        state = self._machine.state
        if isinstance(state, Closed) and not self._sockets:
            return succeed(state.reason)
        waiter: Deferred[LinkClosedReason] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def send_audio(self, audio: bytes) -> bool:
        """Send one binary frame of caller audio; ``False`` (dropped) unless open."""
        if not _send(self._open_protocol, audio, is_binary=True):
            self.counters.audio_dropped_not_open += 1
            return False
        self.counters.audio_frames_out += 1
        return True

    def send_message(self, message: ControlMessage) -> bool:
        """Send a control message; ``False`` (dropped) unless open."""
        if not _send(self._open_protocol, encode_message(message), is_binary=False):
            self.counters.messages_dropped_not_open += 1
            return False
        self.counters.messages_out += 1
        return True

    # --- the machine loop ----------------------------------------------------

    def _feed(self, event: LinkInput) -> None:
        self._inbox.append((event, now_ns(self._clock)))
        if self._running:
            return
        self._running = True
        try:
            while self._inbox:
                queued, at_ns = self._inbox.popleft()
                for command in self._machine.handle(queued, at_ns):
                    try:
                        self._execute(command, at_ns)
                    except Exception:
                        self._log.error("link command failed", command=type(command).__name__,
                                        exc_info=True)
        finally:
            self._running = False
        self._maybe_closed()

    def _execute(self, command: LinkCommand, at_ns: int) -> None:
        match command:
            case OpenSocket(socket_id=sid):
                self._open_socket(sid)
            case CloseSocket(socket_id=sid, abort=abort):
                self._close_socket(sid, abort)
            case SendPing(socket_id=sid, seq=seq):
                protocol = self._protocol(sid)
                if protocol is not None:
                    protocol.sendPing(seq.to_bytes(_PING_PAYLOAD_BYTES, "big"))
            case SendEndCall(socket_id=sid):
                _send(self._protocol(sid), encode_message(EndCall()), is_binary=False)
            case StartTimer(timer=timer, deadline_ns=deadline_ns):
                self._cancel_timer(timer)
                delay_s = max(0, deadline_ns - at_ns) / NS_PER_SECOND
                self._timers[timer] = self._clock.callLater(delay_s, self._timer_fired, timer)
            case CancelTimer(timer=timer):
                self._cancel_timer(timer)
            case NotifyTransition(old=old, new=new):
                self._transitioned(old, new)
            case NotifyOpen():
                self._notify_open()
            case NotifyFailed(failure=failure):
                self._notify_failed(failure)
            case NotifyClosed(reason=reason):
                self._notify_closed(reason)

    def _transitioned(self, old: LinkState, new: LinkState) -> None:
        self._open_protocol = self._protocol(new.socket_id) if isinstance(new, Open) else None
        if isinstance(new, Open) and isinstance(old, Connecting) and old.attempt > 0:
            self.counters.reconnects += 1
        self._log.info("vapi link state", old=_label(old), new=_label(new))
        self._tell_owner("on_link_transition", self._owner.on_link_transition, old, new)

    def _notify_open(self) -> None:
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._tell_owner("on_link_open", self._owner.on_link_open)

    def _notify_failed(self, failure: LinkFailure) -> None:
        self._log.warning("vapi link gave up", reason=failure.reason, attempts=failure.attempts,
                          on_vapi_loss=failure.on_vapi_loss)
        self._fail_open_waiters(f"link failed: {failure.reason}")
        self._tell_owner("on_link_failed", self._owner.on_link_failed, failure)

    def _notify_closed(self, reason: LinkClosedReason) -> None:
        self._fail_open_waiters(f"link closed: {reason.value}")
        self._log.info("vapi link closed", reason=reason.value, **vars(self.counters))
        self._tell_owner("on_link_closed", self._owner.on_link_closed, reason)

    def _fail_open_waiters(self, why: str) -> None:
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.errback(LinkNotOpenError(why))

    def _tell_owner(self, what: str, callback: Callable[..., object], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            self.counters.owner_errors += 1
            self._log.error("link owner raised", callback=what, exc_info=True)

    def _maybe_closed(self) -> None:
        """Once closed with no socket left: forget the URL and wake the waiters."""
        state = self._machine.state
        if not isinstance(state, Closed) or self._sockets:
            return
        redactor.discard(*self._capabilities)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(state.reason)

    def _loggable(self, text: str) -> str:
        """A peer's or Twisted's error text, clipped, without the socket URL or its path."""
        for capability in self._capabilities:
            if capability:
                text = text.replace(capability, "<socket url>")
        return text[:_MAX_REASON_CHARS]

    # --- timers --------------------------------------------------------------

    def _cancel_timer(self, timer: Timer) -> None:
        call = self._timers.pop(timer, None)
        if call is not None and call.active():
            call.cancel()

    def _timer_fired(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self._feed(TIMER_INPUTS[timer])

    # --- sockets -------------------------------------------------------------

    def _protocol(self, socket_id: int) -> CallSocketProtocol | None:
        socket = self._sockets.get(socket_id)
        return socket.protocol if socket is not None else None

    def _open_socket(self, socket_id: int) -> None:
        socket = self._sockets[socket_id] = _Socket()
        factory = CallSocketFactory(
            self, socket_id, self._url, self._api_key,
            self._machine.settings.connect_timeout_ns, self._max_message_bytes,
        )
        try:
            connecting = self._connector(self._url, factory)
        except Exception as error:
            self._log.error("connector raised", exc_info=True)
            connecting = fail(error)
        socket.connecting = connecting
        connecting.addCallbacks(
            lambda _: self._connected(socket_id),
            lambda failure: self._connect_failed(socket_id, failure),
        )

    def _protocol_built(self, socket_id: int, protocol: CallSocketProtocol) -> None:
        socket = self._sockets.get(socket_id)
        if socket is not None:
            socket.protocol = protocol

    def _connected(self, socket_id: int) -> None:
        socket = self._sockets.get(socket_id)
        if socket is not None:
            socket.connecting = None

    def _connect_failed(self, socket_id: int, failure: Failure) -> None:
        socket = self._sockets.pop(socket_id, None)
        if socket is None:
            return
        if socket.closing and isinstance(failure.value, CancelledError):
            self._maybe_closed()
            return
        self._feed(ConnectFailed(socket_id, self._loggable(_failure_text(failure))))

    def _close_socket(self, socket_id: int, abort: bool) -> None:
        socket = self._sockets.get(socket_id)
        if socket is None:
            return
        socket.closing = True
        if socket.connecting is not None:
            socket.connecting.cancel()
        protocol = socket.protocol
        if protocol is None:
            return
        if not abort and protocol.state == WebSocketProtocol.STATE_OPEN:
            protocol.sendClose(code=1000)
        else:
            protocol.dropConnection(abort=True)

    def _socket_opened(self, socket_id: int) -> None:
        self._feed(SocketOpened(socket_id))

    def _socket_closed(self, socket_id: int, clean: bool, code: int | None, reason: str) -> None:
        self._sockets.pop(socket_id, None)
        self._feed(SocketClosed(socket_id, clean, code, self._loggable(reason)))

    def _pong_received(self, socket_id: int, payload: bytes) -> None:
        if len(payload) != _PING_PAYLOAD_BYTES:
            self.counters.pongs_unexpected += 1
            return
        self._feed(PongReceived(socket_id, int.from_bytes(payload, "big")))

    def _frame_received(self, socket_id: int, payload: bytes, is_binary: bool) -> None:
        state = self._machine.state
        if not isinstance(state, (Open, Ending)) or state.socket_id != socket_id:
            self.counters.frames_stale += 1
            return
        if is_binary:
            self._audio_received(payload)
        else:
            self._text_received(socket_id, payload)

    def _audio_received(self, payload: bytes) -> None:
        if not payload:
            self.counters.frames_empty += 1
            return
        if self._odd_frames_invalid and len(payload) % 2:
            self.counters.frames_odd_length += 1
            if _worth_logging(self.counters.frames_odd_length):
                self._log.warning("odd-length PCM frames dropped",
                                  count=self.counters.frames_odd_length)
            return
        self.counters.audio_frames_in += 1
        self.counters.audio_bytes_in += len(payload)
        self._tell_owner("on_link_audio", self._owner.on_link_audio, payload)

    def _text_received(self, socket_id: int, payload: bytes) -> None:
        try:
            event = decode_event(payload)
        except CallMessageError as error:
            self.counters.frames_bad_text += 1
            if _worth_logging(self.counters.frames_bad_text):
                self._log.warning("bad text frame from vapi", kind=error.kind,
                                  detail=error.detail, count=self.counters.frames_bad_text)
            return
        if isinstance(event, UnknownEvent):
            self.counters.events_unknown += 1
            self._log.debug("unknown vapi event", type=event.type[:64])
            return
        self.counters.events_in += 1
        self._tell_owner("on_link_event", self._owner.on_link_event, event)
        if is_call_end(event):
            self._feed(RemoteEnded(socket_id))


def _send(protocol: CallSocketProtocol | None, payload: bytes, *, is_binary: bool) -> bool:
    """Send one message if the websocket is open. Autobahn raises ``Disconnected``
    once Vapi's close frame has arrived, before ``onClose`` tells the machine."""
    if protocol is None or protocol.state != WebSocketProtocol.STATE_OPEN:
        return False
    protocol.sendMessage(payload, isBinary=is_binary)  # type: ignore[no-untyped-call]
    return True


def _label(state: LinkState) -> str:
    attempt = getattr(state, "attempt", None)
    name = type(state).__name__.lower()
    return f"{name}({attempt})" if attempt is not None else name


def _failure_text(failure: Failure) -> str:
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {message}" if message else name


def _worth_logging(count: int) -> bool:
    """Log the 1st, 10th, 100th ... occurrence of a repeated problem."""
    while count % 10 == 0:
        count //= 10
    return count == 1
