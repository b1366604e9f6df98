"""The local assistant's thin Twisted shell: ``POST /call`` (Klein) and the call
sockets (Autobahn) on one loopback port.

:class:`LocalAssistant` is a Twisted ``Service``: :meth:`~LocalAssistant.start`
binds ``listen`` (loopback only) and fires with the base URL
(``http://127.0.0.1:PORT``); :meth:`~LocalAssistant.stop` ends every open call
(status-update ended, end-of-call-report, close 1000), closes the port and
waits (at most :data:`STOP_GRACE_SECONDS`) for the sockets to close.
:meth:`~LocalAssistant.resource` and :attr:`~LocalAssistant.site` serve it
without a port (``treq.testing.StubTreq``, ``twisted.test.iosim``).

Routes:

- ``POST /call`` -- ``Authorization: Bearer <api key>`` (401 otherwise); the body
  is validated by :mod:`.call_request` (400 with ``message``); a script's
  ``fail-create`` answers 5xx, 400 (concurrency limit), late (with or without the
  call created meanwhile), or 201 without a socket URL; so does reaching
  ``max_concurrent_calls`` (400). Otherwise 201 with the Call, whose
  ``transport.websocketCallUrl`` is ``ws://127.0.0.1:PORT/<callId>/transport``.
- ``GET /call/<callId>`` -- the Call, with its status (queued, in-progress, ended).
- ``/<callId>/transport`` -- the call socket. The upgrade needs the Bearer
  header (401) and a call that exists and has not ended (404). Binary frames
  are audio, text frames JSON; each call's :class:`~.scripted_call.ScriptedCall`
  decides what to send and when, on the injected clock. WebSocket pings are
  answered (Autobahn's default) and counted, except on a socket a ``no-pong``
  script has made go dark (left open, silent, pings unanswered).

Calls are kept in :attr:`LocalAssistant.calls` (call id -> :class:`CallRecord`; every
open call and the latest ``keep_ended_calls`` ended ones), so tests can assert what
the Vapi side received; :meth:`LocalAssistant.counts` says how many calls were
created, ended and are still open.

The API key is never logged, nor are socket URLs; Autobahn's own loggers are
pinned at ``info`` because at ``debug`` they write the upgrade request, with
its ``Authorization`` header.
"""

from __future__ import annotations

import hmac
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import msgspec
import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

from gateway.config import is_loopback_host
from gateway.logs import get_logger, redactor
from gateway.tools.local_assistant.call_request import (
    CallRequest,
    CallRequestError,
    call_answer,
    error_answer,
    parse_call_request,
)
from gateway.tools.local_assistant.clips import PACKAGED_CLIPS, ClipError, clip_audio
from gateway.tools.local_assistant.script import FailCreate, Script, parse_script
from gateway.tools.local_assistant.scripted_call import (
    AbortSocket,
    CallEnded,
    CallPlan,
    CallRecord,
    CloseSocket,
    Output,
    ScriptedCall,
    SendAudio,
    SendEvent,
    SocketWentDark,
)
from gateway.tools.local_assistant.settings import LocalAssistantSettings
from gateway.vapi.calls import AudioFormat
from gateway.vapi.reactor_time import NS_PER_SECOND, DelayedCall, now_ns, reactor_time

__all__ = [
    "DEFAULT_LISTEN",
    "AssistantSocketFactory",
    "AssistantSocketProtocol",
    "CallCounts",
    "LocalAssistant",
]

log = get_logger(__name__)

DEFAULT_LISTEN: Final = "tcp:0:interface=127.0.0.1"
STOP_GRACE_SECONDS: Final = 3
"""How long :meth:`LocalAssistant.stop` waits for sockets to close before aborting them."""
MAX_BODY_BYTES: Final = 1 << 20
MAX_MESSAGE_BYTES: Final = 1 << 20
_SOCKET_PATH: Final = re.compile(r"/([^/]+)/transport")
_CONCURRENCY_MESSAGE: Final = "Over Concurrency Limit."
_PROBE_FORMAT: Final = AudioFormat("mulaw", 8000)


@dataclass(frozen=True)
class CallCounts:
    """How many calls were created, have ended, and are still open."""

    created: int
    ended: int
    open: int


class AssistantSocketProtocol(WebSocketServerProtocol):
    """One call socket, server side; reports everything to its :class:`LocalAssistant`."""

    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    assistant: LocalAssistant
    call_id: str | None = None
    connection: int | None = None

    def onConnect(self, request: ConnectionRequest) -> None:
        self.call_id = self.assistant._admit_socket(request)

    def onOpen(self) -> None:
        self.assistant._socket_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        self.assistant._socket_message(self, payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        if self.assistant._socket_pinged(self):
            super().onPing(payload)  # type: ignore[no-untyped-call]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        self.assistant._socket_closed(self, wasClean, code)


class AssistantSocketFactory(WebSocketServerFactory):
    """Builds :class:`AssistantSocketProtocol` for one :class:`LocalAssistant`."""

    protocol = AssistantSocketProtocol
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def __init__(self, assistant: LocalAssistant) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            autoPingInterval=0,  # the client pings (the gateway's heartbeat)
            openHandshakeTimeout=5,
            closeHandshakeTimeout=2,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
        )
        self._assistant = assistant

    def buildProtocol(self, addr: IAddress | None) -> AssistantSocketProtocol:
        protocol = cast(AssistantSocketProtocol, super().buildProtocol(addr))
        protocol.assistant = self._assistant
        return protocol


@dataclass
class _LiveCall:
    """A call's sans-io core and what the shell holds for it."""

    call: ScriptedCall
    request: CallRequest
    log: Any
    sockets: dict[int, AssistantSocketProtocol] = field(default_factory=dict)
    timer: DelayedCall | None = None
    timer_at_ns: int | None = None
    pumping: bool = False
    again: bool = False
    sends_skipped: int = 0


def _json(request: IRequest, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return msgspec.json.encode(body)


class _QuietSite(Site):
    """A ``Site`` without the access log (its lines would carry call-socket paths)."""

    def log(self, request: http.Request) -> None:
        pass


class LocalAssistant(Service):
    """A local stand-in for Vapi's websocket-transport calls (see the module docstring).

    ``clock`` runs every timer (``task.Clock`` in tests); ``reactor`` binds
    ``listen`` (a server endpoint string on a loopback interface). ``call_ids``
    makes call ids (default: random UUIDs).
    """

    def __init__(self, clock: IReactorTime, reactor: Any, *, api_key: str,
                 settings: LocalAssistantSettings | None = None,
                 listen: str = DEFAULT_LISTEN,
                 call_ids: Callable[[], str] | None = None) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.settings = settings or LocalAssistantSettings()
        self.calls: dict[str, CallRecord] = {}
        """The calls by id: every open one, and the latest ``keep_ended_calls`` ended ones."""
        self.create_requests = 0
        self.creates_refused = 0
        self.creates_abandoned = 0
        """``fail-create:slow`` and ``late`` requests whose client went away before the
        answer (a ``late`` one's call exists all the same)."""
        self.base_url: str | None = None
        """``http://127.0.0.1:PORT`` once listening (the gateway's ``api_url``)."""
        self._clock = reactor_time(clock)
        self._reactor = reactor
        self._expected_authorization = f"Bearer {api_key}".encode()
        redactor.add(api_key)
        self._default_script = parse_script(self.settings.script)
        self._listen = listen
        self._call_ids = call_ids or (lambda: str(uuid.uuid4()))
        self._live: dict[str, _LiveCall] = {}
        self._failures: dict[str, int] = {}
        self._slow_creates: set[Deferred[bytes]] = set()
        self._port: IListeningPort | None = None
        self._start_waiters: list[Deferred[str]] = []
        self._created_total = 0
        self._ended_total = 0
        self._socket_factory = AssistantSocketFactory(self)
        self._app = Klein()
        self._app.route("/call", methods=["POST"])(self._create_call)
        self._app.route("/call/<string:call_id>", methods=["GET"])(self._get_call)
        self._app.route("/<string:call_id>/transport")(self._call_socket)
        self.site: Site = _QuietSite(self._app.resource(), reactor=clock)
        """The HTTP factory (for in-memory connections, e.g. ``twisted.test.iosim``)."""
        self.site.displayTracebacks = False
        self.site.noisy = False

    # --- life ----------------------------------------------------------------------

    def resource(self) -> IResource:
        """The root resource, for ``treq.testing.StubTreq``."""
        return cast(IResource, self._app.resource())

    def counts(self) -> CallCounts:
        """Calls created, ended and still open (since this assistant was made)."""
        return CallCounts(self._created_total, self._ended_total,
                          self._created_total - self._ended_total)

    def _forget_old_calls(self) -> None:
        """Keep at most ``keep_ended_calls`` ended calls in :attr:`calls` (oldest go)."""
        ended = [call_id for call_id, record in self.calls.items() if not record.open]
        for call_id in ended[:max(0, len(ended) - self.settings.keep_ended_calls)]:
            del self.calls[call_id]
            self._live.pop(call_id, None)

    def start(self) -> Deferred[str]:
        """Bind ``listen``; fires with the base URL. Calling it again (e.g. from
        ``startService`` after the daemon bound it early) binds nothing new."""
        if self.base_url is not None:
            return succeed(self.base_url)
        waiter: Deferred[str] = Deferred()
        self._start_waiters.append(waiter)
        if len(self._start_waiters) == 1:
            self._bind()
        return waiter

    def _bind(self) -> None:
        def done(result: str | Failure) -> None:
            waiters, self._start_waiters = self._start_waiters, []
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        try:
            endpoint = serverFromString(self._reactor, self._listen)
        except Exception as error:
            done(Failure(ValueError(f"local assistant: bad listen {self._listen!r}: {error}")))
            return
        listening: Deferred[Any] = endpoint.listen(self.site)
        listening.addCallback(self._listening).addBoth(done)

    def _listening(self, port: IListeningPort) -> str:
        host = port.getHost()
        address = str(getattr(host, "host", ""))
        if not is_loopback_host(address):
            port.stopListening()
            raise ValueError(f"local assistant: {self._listen!r} is not a loopback address; "
                             "it serves plain ws:// and http:// only on loopback")
        self._port = port
        shown = f"[{address}]" if ":" in address else address
        self.base_url = f"http://{shown}:{host.port}"  # type: ignore[attr-defined]
        log.info("local assistant listening", url=self.base_url, script=self._default_script.text)
        return self.base_url

    def stop(self) -> Deferred[None]:
        """End every open call, stop listening, and wait for the sockets to close."""
        now = self._now_ns()
        for slow in list(self._slow_creates):
            slow.cancel()
        for live in self._live.values():
            live.call.end(now, "local-assistant-stopped")
            self._pump(live)
        port, self._port = self._port, None
        stopping: Deferred[Any] = succeed(None)
        if port is not None:
            stopping = port.stopListening() or succeed(None)
        closing = [protocol.is_closed for live in self._live.values()
                   for protocol in live.sockets.values()]
        closed: Deferred[Any] = DeferredList(closing)
        guard = self._clock.callLater(STOP_GRACE_SECONDS, self._abort_sockets)

        def finished(_: object) -> None:
            if guard.active():
                guard.cancel()
            for live in self._live.values():
                self._cancel_timer(live)
            self.base_url = None
            log.info("local assistant stopped", **vars(self.counts()))

        both: Deferred[Any] = DeferredList([stopping, closed])
        return both.addCallback(finished)

    def _abort_sockets(self) -> None:
        for live in self._live.values():
            for protocol in list(live.sockets.values()):
                protocol.dropConnection(abort=True)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()
        self.start().addErrback(lambda failure: log.error(
            "local assistant did not start", reason=failure.getErrorMessage()))

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        return self.stop()

    # --- HTTP --------------------------------------------------------------------------

    def _now_ns(self) -> int:
        return now_ns(self._clock)

    def _authorized(self, value: bytes | str | None) -> bool:
        if value is None:
            return False
        given = value.encode() if isinstance(value, str) else value
        return hmac.compare_digest(given, self._expected_authorization)

    def _create_call(self, request: IRequest) -> bytes | Deferred[bytes]:
        self.create_requests += 1
        if not self._authorized(request.getHeader(b"authorization")):
            self.creates_refused += 1
            log.warning("local assistant refused POST /call", status=401,
                        reason="missing or wrong bearer key")
            return _json(request, 401, error_answer(401, "Invalid Key."))
        content = request.content.read(MAX_BODY_BYTES + 1) if request.content else b""
        if len(content) > MAX_BODY_BYTES:
            self.creates_refused += 1
            return _json(request, 413, error_answer(413, "request entity too large"))
        try:
            call_request = parse_call_request(content, self._default_script, self._check_clip)
        except CallRequestError as error:
            self.creates_refused += 1
            log.warning("local assistant refused POST /call", status=400,
                        reason=list(error.messages))
            return _json(request, 400, error_answer(400, list(error.messages)))
        script = call_request.script
        failing = script.fail_create
        if failing is not None:
            used = self._failures.get(script.text, 0)
            if failing.times is None or used < failing.times:
                self._failures[script.text] = used + 1
                return self._fail_create(request, call_request, failing)
            script = script.without_fail_create()
        limit = self.settings.max_concurrent_calls
        if limit and self.counts().open >= limit:
            self.creates_refused += 1
            log.warning("local assistant refused POST /call", status=400,
                        reason="concurrency limit", limit=limit)
            return self._concurrency_refusal(request, limit)
        return self._created(request, call_request, script)

    def _check_clip(self, name: str) -> None:
        if name not in PACKAGED_CLIPS and name not in self.settings.utterances:
            raise ValueError(f"clip {name!r}: a call may name the packaged clips "
                             f"({', '.join(PACKAGED_CLIPS)}) or those in the settings' "
                             "utterances")
        try:
            clip_audio(name, _PROBE_FORMAT)
        except ClipError as error:
            raise ValueError(str(error)) from None

    def _concurrency_refusal(self, request: IRequest, limit: int) -> bytes:
        return _json(request, 400, error_answer(
            400, _CONCURRENCY_MESSAGE,
            subscriptionLimits={"concurrencyBlocked": True, "concurrencyLimit": limit,
                                "remainingConcurrentCalls": 0}))

    def _fail_create(self, request: IRequest, call_request: CallRequest,
                     failing: FailCreate) -> bytes | Deferred[bytes]:
        script = call_request.script.without_fail_create()
        log.info("local assistant failing POST /call (scripted)", mode=failing.mode,
                 status=failing.status)
        if failing.mode == "status":
            self.creates_refused += 1
            return _json(request, failing.status, error_answer(
                failing.status, "local assistant: scripted failure (fail-create)"))
        if failing.mode == "concurrency":
            self.creates_refused += 1
            return self._concurrency_refusal(request, self.settings.max_concurrent_calls or 10)
        if failing.mode == "no-socket-url":
            self.creates_refused += 1
            answer = call_answer(self._call_ids(), call_request, None,
                                 self._clock.seconds(), status="ended")
            return _json(request, 201, answer)
        if failing.mode == "late":  # the call exists at once; its 201 comes late
            return self._slow_create(request, None, None,
                                     self._created(request, call_request, script))
        return self._slow_create(request, call_request, script)

    def _slow_create(self, request: IRequest, call_request: CallRequest | None,
                     script: Script | None, body: bytes | None = None) -> Deferred[bytes]:
        """Answer after ``create_delay_ms``: create the call then (``slow``), or send the
        ``body`` of the call created already (``late``)."""

        def abandoned(answer: Deferred[bytes]) -> None:
            self._slow_creates.discard(answer)
            if timer.active():
                timer.cancel()
            self.creates_abandoned += 1
            log.info("local assistant: slow POST /call abandoned by the client",
                     call_created=body is not None)

        answer: Deferred[bytes] = Deferred(abandoned)

        def answer_now() -> None:
            self._slow_creates.discard(answer)
            if body is not None:
                answer.callback(body)
                return
            assert call_request is not None and script is not None
            answer.callback(self._created(request, call_request, script))

        delay_s = self.settings.create_delay_ms / 1000
        timer = self._clock.callLater(delay_s, answer_now)
        self._slow_creates.add(answer)
        return answer

    def _socket_base(self, request: IRequest) -> str:
        if self._port is not None:
            return "ws" + cast(str, self.base_url)[len("http"):]
        host_header = request.getHeader(b"host") or b""
        port = host_header.rsplit(b":", 1)[1] if b":" in host_header else b"80"
        return f"ws://127.0.0.1:{int(port) if port.isdigit() else 80}"

    def _created(self, request: IRequest, call_request: CallRequest, script: Script) -> bytes:
        call_id = self._call_ids()
        now = self._now_ns()
        record = CallRecord(call_id=call_id, script=script.text, audio=call_request.audio,
                            request=dict(call_request.body), created_at_ns=now,
                            first_message=call_request.first_message)
        plan = CallPlan.resolve(script, self.settings, call_request.silence_timeout_s)
        audio = call_request.audio
        rng = random.Random(f"{self.settings.seed}:{self._created_total}")
        call = ScriptedCall(record, plan, rng, lambda clip: clip_audio(clip, audio),
                            self.settings.max_recorded_audio_bytes)
        live = _LiveCall(call, call_request, log.bind(vapi_call_id=call_id))
        self._forget_old_calls()
        self.calls[call_id] = record
        self._live[call_id] = live
        self._created_total += 1
        self._pump(live)  # arms the silence timer
        live.log.info("local assistant call created", script=script.text,
                      audio_format=audio.encoding, sample_rate=audio.sample_rate,
                      open_calls=self.counts().open)
        url = f"{self._socket_base(request)}/{call_id}/transport"
        return _json(request, 201, call_answer(call_id, call_request, url,
                                               record.created_at_ns / NS_PER_SECOND))

    def _get_call(self, request: IRequest, call_id: str) -> bytes:
        if not self._authorized(request.getHeader(b"authorization")):
            return _json(request, 401, error_answer(401, "Invalid Key."))
        live = self._live.get(call_id)
        if live is None:
            return _json(request, 404, error_answer(404, "Call not found"))
        record = live.call.record
        status = ("ended" if not record.open
                  else "in-progress" if live.call.connection is not None else "queued")
        answer = call_answer(call_id, live.request, None, record.created_at_ns / NS_PER_SECOND,
                             status=status)
        if record.ended_reason is not None:
            answer["endedReason"] = record.ended_reason
        return _json(request, 200, answer)

    def _call_socket(self, request: IRequest, call_id: str) -> IResource:
        return cast(IResource, WebSocketResource(self._socket_factory))

    # --- the call socket ---------------------------------------------------------------

    def _admit_socket(self, request: ConnectionRequest) -> str:
        """The call id of an upgrade request, or ``ConnectionDeny`` (401, 404)."""
        if not self._authorized(request.headers.get("authorization")):
            log.warning("local assistant refused a call socket", status=401,
                        reason="missing or wrong bearer key")
            raise ConnectionDeny(401, "Unauthorized")
        match = _SOCKET_PATH.fullmatch(request.path)
        live = self._live.get(match.group(1)) if match else None
        if live is None or live.call.ended:
            if live is not None:
                live.call.record.refused_connections += 1
            log.warning("local assistant refused a call socket", status=404,
                        reason="no such call" if live is None else "the call has ended")
            raise ConnectionDeny(404, "Not Found")
        return live.call.record.call_id

    def _live_of(self, protocol: AssistantSocketProtocol) -> _LiveCall | None:
        return self._live.get(protocol.call_id) if protocol.call_id is not None else None

    def _socket_opened(self, protocol: AssistantSocketProtocol) -> None:
        live = self._live_of(protocol)
        if live is None:
            return
        connection = live.call.connect(self._now_ns())
        if connection is None:  # the call ended during the handshake
            protocol.sendClose(code=1000, reason="call ended")  # type: ignore[no-untyped-call]
            return
        protocol.connection = connection
        live.sockets[connection] = protocol
        live.log.info("local assistant call socket open", connection=connection)
        self._pump(live)

    def _socket_message(self, protocol: AssistantSocketProtocol, payload: bytes,
                        is_binary: bool) -> None:
        live = self._live_of(protocol)
        if live is None or protocol.connection is None:
            return
        if is_binary:
            live.call.audio_received(self._now_ns(), protocol.connection, payload)
        else:
            kind = live.call.text_received(self._now_ns(), protocol.connection, payload)
            record = live.call.record
            if kind in ("control", "end-call"):
                live.log.info("local assistant received a control message",
                              type=record.messages[-1].get("type"))
            elif kind == "ignored":
                live.log.info("local assistant ignored a message", type=record.ignored_messages[-1])
            elif kind == "invalid":
                live.log.warning("local assistant received a text frame that is not an event")
        self._pump(live)

    def _socket_pinged(self, protocol: AssistantSocketProtocol) -> bool:
        """Count a ping; whether to answer it (``no-pong`` leaves a socket unanswered)."""
        live = self._live_of(protocol)
        if live is not None and protocol.connection is not None:
            return live.call.ping_received(protocol.connection)
        return True

    def _socket_closed(self, protocol: AssistantSocketProtocol, clean: bool,
                       code: int | None) -> None:
        live = self._live_of(protocol)
        connection = protocol.connection
        if live is None or connection is None:
            return
        live.sockets.pop(connection, None)
        live.call.disconnected(self._now_ns(), connection, clean, code)
        live.log.info("local assistant call socket closed", connection=connection, clean=clean,
                      code=code)
        self._pump(live)

    # --- running the core --------------------------------------------------------------

    def _pump(self, live: _LiveCall) -> None:
        """Run everything due, then arm the timer for what comes next (never re-entered)."""
        if live.pumping:
            live.again = True
            return
        live.pumping = True
        try:
            while True:
                live.again = False
                for output in live.call.due(self._now_ns()):
                    try:
                        self._execute(live, output)
                    except Exception:
                        live.log.error("local assistant output failed",
                                       output=type(output).__name__, exc_info=True)
                if not live.again:
                    break
        finally:
            live.pumping = False
        self._arm(live)

    def _arm(self, live: _LiveCall) -> None:
        due = live.call.next_due_ns()
        if due == live.timer_at_ns and live.timer is not None and live.timer.active():
            return
        self._cancel_timer(live)
        if due is None:
            return
        delay_s = max(0, due - self._now_ns()) / NS_PER_SECOND
        live.timer_at_ns = due
        live.timer = self._clock.callLater(delay_s, self._timer_fired, live)

    def _timer_fired(self, live: _LiveCall) -> None:
        live.timer = None
        live.timer_at_ns = None
        self._pump(live)

    def _cancel_timer(self, live: _LiveCall) -> None:
        if live.timer is not None and live.timer.active():
            live.timer.cancel()
        live.timer = None
        live.timer_at_ns = None

    def _execute(self, live: _LiveCall, output: Output) -> None:
        match output:
            case SendAudio(connection=connection, payload=payload):
                self._send(live, connection, payload, is_binary=True)
            case SendEvent(connection=connection, event=event):
                self._send(live, connection, msgspec.json.encode(event), is_binary=False)
            case CloseSocket(connection=connection, code=code, reason=reason):
                protocol = live.sockets.get(connection)
                if protocol is not None and protocol.state == WebSocketProtocol.STATE_OPEN:
                    protocol.sendClose(code=code, reason=reason)  # type: ignore[no-untyped-call]
            case AbortSocket(connection=connection):
                protocol = live.sockets.get(connection)
                live.log.info("local assistant aborting a call socket (no close frame)",
                              connection=connection)
                if protocol is not None:
                    protocol.dropConnection(abort=True)  # type: ignore[no-untyped-call]
            case SocketWentDark(connection=connection):
                live.log.info("local assistant went dark on a call socket (no-pong: open, "
                              "silent, pings unanswered)", connection=connection)
            case CallEnded(reason=reason):
                self._ended_total += 1
                record = live.call.record
                duration_ns = (record.ended_at_ns or 0) - record.created_at_ns
                live.log.info("local assistant call ended", ended_reason=reason,
                              duration_s=round(duration_ns / NS_PER_SECOND, 3),
                              end_call_received=record.end_call_received,
                              uplink_bytes=record.uplink_bytes,
                              downlink_bytes=record.downlink_bytes,
                              connections=record.connections, drops=record.drops,
                              dark_connections=record.dark_connections,
                              pings=record.pings, pings_unanswered=record.pings_unanswered,
                              open_calls=self.counts().open)

    def _send(self, live: _LiveCall, connection: int, payload: bytes, *, is_binary: bool) -> None:
        protocol = live.sockets.get(connection)
        if protocol is None or protocol.state != WebSocketProtocol.STATE_OPEN:
            live.sends_skipped += 1
            return
        protocol.sendMessage(payload, isBinary=is_binary)  # type: ignore[no-untyped-call]
