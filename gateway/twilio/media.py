"""The Twilio Media Streams WebSocket server: one :class:`MediaStreamProtocol` per stream.

A thin Autobahn shell around :class:`gateway.twilio.stream.MediaStreamState`:

- **upgrade** (:meth:`MediaStreamProtocol.onConnect`): the request path must be
  ``media_path`` (404 otherwise) and ``X-Twilio-Signature`` must sign the public
  ``wss://`` URL (:func:`gateway.twilio.routes.stream_url`); a bad or missing one is
  refused with HTTP 403 before any WebSocket frame (``validate_signatures = false``
  skips the check and logs a warning per connection).  No subprotocol is selected
  unless the client offers one (then the first).
- **sockets awaiting start**: at most ``[twilio] max_pending_streams`` accepted
  sockets may be waiting for a valid ``start`` at once (the upgrade signature is the
  same for every call, so it is no proof of a call); another upgrade is refused with
  HTTP 503 (:meth:`MediaStreamFactory.awaiting_start`).
- **start**: the ``start`` message must come within ``start_timeout`` seconds
  (:data:`START_TIMEOUT_SECONDS` unless the factory is given another; timed on the
  injected clock) and carry a stream token (:mod:`gateway.twilio.token`) issued for
  its ``callSid`` by the voice webhook, unused and unexpired, and, when
  ``[twilio] account_sid`` is set, that account.  Then
  :meth:`~gateway.twilio.routes.CallControl.attach_stream` joins it to its call; a
  stream that fails any of this is closed with 4008.
- **outbound start**: a ``start`` carrying ``outboundRef`` (an outbound call placed by
  the admin API, see :mod:`gateway.bridge.outbound`) is checked against the pending
  outbound calls instead: the reference must be pending, unexpired and placed as this
  ``callSid``, and the stream token must have been issued for the reference.  Then
  :meth:`OutboundStreams.attach_stream` consumes the reference and opens the call with
  the assistant chosen when it was placed.  Anything else closes with 4008 (so does any
  ``outboundRef`` when the factory has no outbound calls).
- **frames**: caller audio, DTMF, mark echoes and ``stop`` go to the call's
  :class:`~gateway.twilio.routes.StreamSession`; protocol violations are counted
  (and logged: the first few, then every 100th) until ``max_violations`` closes the
  socket.  ``stop`` closes it with 1000 after telling the session.
- **sending**: the protocol is the session's
  :class:`~gateway.bridge.session.MediaSocket` — ``send_media``, ``send_mark``,
  ``send_clear`` (Twilio's JSON text frames) and ``close``.  Sends on a socket that
  is not open are dropped silently (and counted).
- **back-pressure**: the protocol registers itself as its transport's streaming
  producer (taking the place of the HTTP channel that served the upgrade).  When
  Twisted's write buffer fills, ``pauseProducing`` sets :attr:`writing_paused` and
  tells the session (``on_stream_paused(stream, True)``), which then sends no audio
  frames -- they wait in its bounded playout buffer -- until ``resumeProducing``.
  Autobahn unregisters it when it drops the connection, so a paused producer never
  holds Twisted's clean close back.

Nothing raises into Twisted: an exception from a session is logged with its
traceback and the socket closed with 4011 (the application-range twin of 1011;
Autobahn only sends 1000 or 3000-4999).  When the socket closes, for any reason,
the session hears :meth:`~gateway.twilio.routes.StreamSession.on_stream_closed`
exactly once, and the protocol's timer is cancelled.

The daemon serves the factory on its one public port through Autobahn's
``WebSocketResource`` at ``media_path``: :meth:`MediaStreamFactory.register` adds
that route to the Klein app.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from klein import Klein
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.web.iweb import IRequest
from zope.interface import implementer

from gateway.bridge.session import MediaSocket
from gateway.config import Settings
from gateway.logs import get_logger
from gateway.twilio.routes import CallControl, StreamSession, stream_url
from gateway.twilio.signature import TwilioSignatureValidator
from gateway.twilio.stream import (
    Audio,
    CloseCode,
    CloseStream,
    Dtmf,
    MarkEcho,
    MediaStreamState,
    Started,
    Stopped,
    StreamEvent,
    Violation,
)
from gateway.twilio.token import StreamTokens
from gateway.twilio.twiml import OUTBOUND_REF_PARAMETER, STREAM_TOKEN_PARAMETER
from gateway.websocket_fastpath import FastFrames

__all__ = [
    "CLOSE_HANDSHAKE_TIMEOUT_SECONDS",
    "OPEN_HANDSHAKE_TIMEOUT_SECONDS",
    "START_TIMEOUT_SECONDS",
    "MediaStreamFactory",
    "MediaStreamProtocol",
    "OutboundStreams",
    "media_stream_factory",
]

log = get_logger("gateway.twilio.media")

START_TIMEOUT_SECONDS: Final = 5.0
"""Seconds from the socket opening to a valid ``start`` (Twilio sends it at once)."""
OPEN_HANDSHAKE_TIMEOUT_SECONDS: Final = 10
"""Autobahn's opening-handshake limit (whole seconds: txaio rounds its timers down)."""
CLOSE_HANDSHAKE_TIMEOUT_SECONDS: Final = 5
"""How long a close we sent waits for Twilio's reply before the TCP is dropped."""

_LOGGED_VIOLATIONS_FIRST: Final = 3
_LOGGED_VIOLATIONS_EVERY: Final = 100
_MAX_LOGGED_CHARS: Final = 200
_OPEN: Final = WebSocketProtocol.STATE_OPEN
_CONNECTING: Final = WebSocketProtocol.STATE_CONNECTING
_SIGNATURE_HEADER: Final = "x-twilio-signature"  # Autobahn lowercases header names


class OutboundStreams(Protocol):
    """The pending outbound calls (:class:`gateway.bridge.outbound.OutboundCalls`)."""

    def check(self, reference: str, call_sid: str, now: float) -> str | None:
        """Why a stream of ``call_sid`` may not claim ``reference`` now; None if it may."""
        ...

    def attach_stream(
        self, reference: str, stream: MediaSocket, started: Started, now: float
    ) -> StreamSession | None:
        """Consume ``reference``, open its call and join the stream; None refuses it."""
        ...


@implementer(IPushProducer)
class MediaStreamProtocol(FastFrames, WebSocketServerProtocol):  # type: ignore[misc]
    """One Twilio Media Streams socket (see the module docstring)."""

    # Autobahn's own logger: at debug it would log the upgrade headers (the signature).
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def __init__(self, server: MediaStreamFactory) -> None:
        super().__init__()
        self._server = server
        self._stream = MediaStreamState(
            max_violations=server.max_violations, max_message_bytes=server.max_message_size
        )
        self._session: StreamSession | None = None
        self._closing = False
        self._opened = False
        self._start_timer: IDelayedCall | None = None
        self._call_log = log
        self.dropped_sends = 0
        """Frames the session tried to send after the socket stopped being open."""
        self.ignored_frames = 0
        """Frames Twilio sent after this side decided to close."""
        self.writing_paused = False
        """True while the transport's write buffer is full (Twisted paused this producer)."""
        self.write_pauses = 0
        """Times the transport paused this producer."""

    # -- the session's MediaSocket (the per-frame path: no logging, no copies) --------

    def send_media(self, payload: bytes) -> None:
        """Send caller-bound mu-law (whole 160-byte frames preferred) as a ``media`` frame."""
        if self.state != _OPEN:
            self.dropped_sends += 1
            return
        self.sendMessage(self._stream.media_frame(payload))

    def send_mark(self, name: str) -> None:
        """Send a ``mark``; Twilio echoes it when the audio before it has played."""
        if self.state != _OPEN:
            self.dropped_sends += 1
            return
        self.sendMessage(self._stream.mark_frame(name))

    def send_clear(self) -> None:
        """Send ``clear``: Twilio drops its buffered audio and echoes pending marks."""
        if self.state != _OPEN:
            self.dropped_sends += 1
            return
        self.sendMessage(self._stream.clear_frame())

    def close(self, code: int, reason: str) -> None:
        """Close the socket (1000 or 3000-4999); later calls and sends do nothing."""
        if self._closing:
            return
        self._closing = True
        self._cancel_start_timer()
        state = self.state
        if state == _OPEN:
            self._call_log.info("closing the media socket", code=int(code), reason=reason)
            try:
                # Autobahn insists on a plain int (not an IntEnum) in 1000 or 3000-4999.
                self.sendClose(int(code), reason)
            except Exception:
                self._call_log.error("bad close code; dropping the media socket", exc_info=True)
                self.dropConnection(abort=True)
        elif state == _CONNECTING:
            self.dropConnection(abort=True)

    # -- back-pressure: the transport's streaming producer ----------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport  # an IConsumer (TCP, TLS or in-memory)
        try:
            transport.registerProducer(self, True)
        except RuntimeError:
            # the HTTP channel that served the upgrade is still registered; the socket
            # is this protocol's now
            transport.unregisterProducer()
            transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """Twisted's write buffer is full: the session holds its audio frames."""
        if not self.writing_paused:
            self.writing_paused = True
            self.write_pauses += 1
            self._tell_session(True)

    def resumeProducing(self) -> None:
        """Twisted's write buffer has drained: audio may flow again."""
        if self.writing_paused:
            self.writing_paused = False
            self._tell_session(False)

    def stopProducing(self) -> None:
        """The transport is gone (Twisted unregisters this producer itself)."""

    def _tell_session(self, paused: bool) -> None:
        session = self._session
        if session is None:
            return  # a session reads writing_paused when its stream attaches
        # optional in StreamSession: CallSession implements it
        note = getattr(session, "on_stream_paused", None)
        if note is None:
            return
        try:
            note(self, paused)
        except Exception:
            self._call_log.error("session failed on back-pressure; closing the socket",
                                 exc_info=True)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    # -- Autobahn callbacks ----------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:
        server = self._server
        self._call_log = log.bind(peer=str(request.peer))
        if request.path != server.media_path:
            self._call_log.warning(
                "media socket refused: wrong path", path=request.path[:_MAX_LOGGED_CHARS]
            )
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "not found")
        if server.validate_signatures:
            check = server.validator.check_websocket(
                server.public_stream_url, request.headers.get(_SIGNATURE_HEADER)
            )
            if not check.ok:
                self._call_log.warning("media socket refused: bad signature", reason=check.reason)
                if server.count_auth_failure is not None:
                    server.count_auth_failure("twilio-media")
                raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "forbidden")
        else:
            self._call_log.warning(
                "twilio signature validation is disabled: media socket accepted unchecked"
            )
        pending = server.awaiting_start()
        if pending >= server.max_pending_streams:
            self._call_log.warning(
                "media socket refused: too many sockets awaiting their start message",
                awaiting_start=pending, max_pending_streams=server.max_pending_streams,
            )
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "service unavailable")
        server.track_pending(self)
        return request.protocols[0] if request.protocols else None

    @property
    def awaiting_start(self) -> bool:
        """Accepted, not closing, and no stream attached yet (counts toward
        ``max_pending_streams``)."""
        return self._session is None and not self._closing

    def onOpen(self) -> None:
        self._opened = True
        if not self._closing:
            server = self._server
            self._start_timer = server.clock.callLater(server.start_timeout, self._start_timed_out)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        if self._closing:
            self.ignored_frames += 1
            return
        event = self._stream.receive_frame(payload, isBinary)
        if event is None:
            return
        try:
            if type(event) is Audio:
                session = self._session
                if session is not None:
                    session.on_stream_audio(event)
            else:
                self._dispatch(event)
        except Exception:
            self._call_log.error("media stream event failed; closing the socket", exc_info=True)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        self._closing = True
        self._cancel_start_timer()
        count = self._server.count_violations
        if count is not None:
            for kind, n in self._stream.stats.violations.items():
                count(kind.value, n)
        session, self._session = self._session, None
        if self._opened:
            self._call_log.info(
                "media socket closed",
                was_clean=wasClean,
                code=code,
                reason=(reason or "")[:_MAX_LOGGED_CHARS],
                attached=session is not None,
                dropped_sends=self.dropped_sends,
                ignored_frames=self.ignored_frames,
                write_pauses=self.write_pauses,
                stream=self._stream.stats.as_dict(),
            )
        if session is not None:
            try:
                session.on_stream_closed(self)
            except Exception:
                self._call_log.error("session failed on media socket close", exc_info=True)

    # -- events ------------------------------------------------------------------------

    def _dispatch(self, event: StreamEvent) -> None:
        session = self._session
        if isinstance(event, Started):
            self._started(event)
        elif isinstance(event, Dtmf):
            if session is not None:
                session.on_stream_dtmf(event.digit)
        elif isinstance(event, MarkEcho):
            if session is not None:
                session.on_stream_mark(event.name)
        elif isinstance(event, Stopped):
            self._call_log.info("twilio stopped the media stream")
            if session is not None:
                session.on_stream_stopped()
            self.close(CloseCode.NORMAL, "stream stopped")
        elif isinstance(event, Violation):
            total = event.total
            if total <= _LOGGED_VIOLATIONS_FIRST or total % _LOGGED_VIOLATIONS_EVERY == 0:
                self._call_log.warning(
                    "media stream protocol violation",
                    kind=event.kind.value,
                    detail=event.detail,
                    total=total,
                )
        elif isinstance(event, CloseStream):
            self._call_log.warning(
                "media stream protocol violations: closing the socket",
                kind=event.kind.value,
                code=event.code,
                reason=event.reason,
                violations=sum(self._stream.stats.violations.values()),
            )
            self.close(event.code, event.reason)

    def _started(self, started: Started) -> None:
        server = self._server
        self._call_log = self._call_log.bind(
            call_sid=started.call_sid, stream_sid=started.stream_sid
        )
        if server.account_sid and started.account_sid != server.account_sid:
            self._call_log.warning(
                "media stream refused: wrong account",
                account_sid=started.account_sid[:_MAX_LOGGED_CHARS],
            )
            self.close(CloseCode.POLICY_VIOLATION, "wrong account")
            return
        reference = started.custom_parameters.get(OUTBOUND_REF_PARAMETER)
        if reference is not None:
            self._started_outbound(started, reference)
            return
        check = server.tokens.verify(
            started.custom_parameters.get(STREAM_TOKEN_PARAMETER),
            started.call_sid,
            server.clock.seconds(),
        )
        if not check.ok:
            self._call_log.warning("media stream refused: bad stream token", reason=check.reason)
            self.close(CloseCode.POLICY_VIOLATION, f"stream token {check.reason}")
            return
        self._joined(started, server.calls.attach_stream(self, started))

    def _started_outbound(self, started: Started, reference: str) -> None:
        """The ``start`` of an outbound call's stream: reference, CallSid, then token."""
        server = self._server
        outbound = server.outbound
        self._call_log = self._call_log.bind(outbound_ref=reference[:_MAX_LOGGED_CHARS])
        if outbound is None:
            self._call_log.warning("media stream refused: outbound calls are not enabled")
            self.close(CloseCode.POLICY_VIOLATION, "outbound call unknown")
            return
        now = server.clock.seconds()
        refusal = outbound.check(reference, started.call_sid, now)
        if refusal is not None:
            self._call_log.warning("media stream refused: bad outbound reference",
                                   reason=refusal)
            self.close(CloseCode.POLICY_VIOLATION, f"outbound call {refusal}")
            return
        check = server.tokens.verify(
            started.custom_parameters.get(STREAM_TOKEN_PARAMETER), reference, now
        )
        if not check.ok:
            self._call_log.warning("media stream refused: bad stream token", reason=check.reason)
            self.close(CloseCode.POLICY_VIOLATION, f"stream token {check.reason}")
            return
        self._joined(started, outbound.attach_stream(reference, self, started, now))

    def _joined(self, started: Started, session: StreamSession | None) -> None:
        if session is None:
            self._call_log.warning("media stream refused: call not admitted")
            self.close(CloseCode.POLICY_VIOLATION, "call not admitted")
            return
        self._cancel_start_timer()
        self._session = session
        self._call_log.info("media stream started", tracks=list(started.tracks))

    def _start_timed_out(self) -> None:
        self._start_timer = None
        self._call_log.warning(
            "no valid start message in time: closing the media socket",
            start_timeout=self._server.start_timeout,
        )
        self.close(CloseCode.POLICY_VIOLATION, "no start message")

    def _cancel_start_timer(self) -> None:
        timer, self._start_timer = self._start_timer, None
        if timer is not None and timer.active():
            timer.cancel()


class MediaStreamFactory(WebSocketServerFactory):
    """Builds a :class:`MediaStreamProtocol` per connection; holds what they share."""

    protocol = MediaStreamProtocol  # type: ignore[assignment]
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def __init__(
        self,
        settings: Settings,
        *,
        validator: TwilioSignatureValidator,
        tokens: StreamTokens,
        calls: CallControl,
        clock: IReactorTime,
        start_timeout: float = START_TIMEOUT_SECONDS,
        outbound: OutboundStreams | None = None,
        count_violations: Callable[[str, int], None] | None = None,
        count_auth_failure: Callable[[str], None] | None = None,
    ) -> None:
        twilio = settings.twilio
        self.public_stream_url: Final = stream_url(settings)
        super().__init__(url=self.public_stream_url)  # type: ignore[no-untyped-call]
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            maxMessagePayloadSize=twilio.max_message_size,
            maxFramePayloadSize=twilio.max_message_size,
            autoPingInterval=0,
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT_SECONDS,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT_SECONDS,
            webStatus=False,
        )
        self.media_path: Final = twilio.media_path
        self.validate_signatures: Final = twilio.validate_signatures
        self.account_sid: Final = twilio.account_sid
        self.max_violations: Final = twilio.max_violations
        self.max_message_size: Final = twilio.max_message_size
        self.validator: Final = validator
        self.tokens: Final = tokens
        self.calls: Final = calls
        self.clock: Final = clock
        self.start_timeout: Final = start_timeout
        self.outbound: Final = outbound
        self.count_violations: Final = count_violations
        self.count_auth_failure: Final = count_auth_failure
        self.max_pending_streams: Final = twilio.max_pending_streams
        self._pending: weakref.WeakSet[MediaStreamProtocol] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<MediaStreamFactory {self.media_path}>"

    def awaiting_start(self) -> int:
        """Sockets accepted whose stream has not started (attached) and that are not
        closing: the unauthenticated ones, since only a valid ``start`` proves the call."""
        pending = self._pending
        for protocol in [p for p in pending if not p.awaiting_start]:
            pending.discard(protocol)
        return len(pending)

    def track_pending(self, protocol: MediaStreamProtocol) -> None:
        """Count ``protocol`` toward ``max_pending_streams`` until it starts or closes."""
        self._pending.add(protocol)

    def buildProtocol(self, addr: IAddress | None) -> MediaStreamProtocol:
        protocol = MediaStreamProtocol(self)
        protocol.factory = self
        return protocol

    def register(self, app: Klein) -> None:
        """Serve this factory on ``app`` at ``media_path`` (the WebSocket upgrade)."""
        resource = WebSocketResource(self)

        def media_socket(request: IRequest) -> WebSocketResource:
            return resource

        app.route(self.media_path, methods=["GET"])(media_socket)


def media_stream_factory(
    settings: Settings,
    *,
    validator: TwilioSignatureValidator,
    tokens: StreamTokens,
    calls: CallControl,
    clock: IReactorTime,
    start_timeout: float = START_TIMEOUT_SECONDS,
    outbound: OutboundStreams | None = None,
    count_violations: Callable[[str, int], None] | None = None,
    count_auth_failure: Callable[[str], None] | None = None,
) -> MediaStreamFactory:
    """The Media Streams server factory (serve it with :meth:`MediaStreamFactory.register`
    or ``autobahn.twisted.resource.WebSocketResource(factory)`` at ``media_path``).

    ``outbound`` (the pending outbound calls of the admin API) lets streams that carry
    ``outboundRef`` start; without it they are refused.  ``count_violations(kind, n)``
    hears each closed stream's protocol violations and ``count_auth_failure(route)`` each
    upgrade refused for its signature (metrics)."""
    return MediaStreamFactory(
        settings,
        validator=validator,
        tokens=tokens,
        calls=calls,
        clock=clock,
        start_timeout=start_timeout,
        outbound=outbound,
        count_violations=count_violations,
        count_auth_failure=count_auth_failure,
    )
