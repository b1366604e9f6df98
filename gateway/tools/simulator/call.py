"""One simulated phone call, played against a gateway exactly as Twilio would play it.

:class:`SimulatedCall` runs a :class:`CallScenario`:

1. posts the signed voice webhook and reads the TwiML (a busy answer ends here:
   ``refused: busy``);
2. opens the media socket at the ``<Stream url>`` (Autobahn client, signed upgrade,
   ``User-Agent: Twilio.TmeWs/1.0``, no subprotocol);
3. on the next tick of the shared :class:`MediaClock` sends ``connected`` and
   ``start`` (with every ``<Parameter>`` as ``customParameters``), then one ``media``
   frame per 20 ms on an absolute clock (:mod:`~gateway.tools.simulator.uplink`),
   while it plays the gateway's audio the way Twilio does
   (:mod:`~gateway.tools.simulator.playout`: the queue at 8000 bytes/s, mark echoes,
   ``clear``) and checks every frame it gets
   (:mod:`~gateway.tools.simulator.downlink`); posts ``stream-started`` to the
   ``<Stream statusCallback>``;
4. at the scenario's end the caller hangs up: ``stop`` (then the gateway must close
   the socket within ``close_timeout_s``) and ``stream-stopped``; or, with
   ``drop``, the TCP connection is aborted without ``stop``.  If the gateway closes
   the socket first, the call ends there (Twilio would then speak the TwiML's
   fallback);
5. posts the terminal call status callback (``CallStatus=completed``) and returns
   its :class:`~gateway.tools.simulator.report.CallReport`.

A call never raises: whatever goes wrong ends up in its report.

Faults Twilio's side can commit, by scenario (for fault-injection tests):

- ``call_sid``: a given CallSid; several calls of a run with one CallSid are
  duplicate streams of one phone call (each posts the voice webhook again, as a
  retried webhook would, and opens its own stream);
- ``open_stream = False``: the voice webhook is answered, the stream never opens;
  ``stream_delay_ms``: it opens that long after the TwiML arrived;
- ``status_callback``: the terminal status callback is posted ``after`` the call
  (the default), ``before-stream`` (before the media socket opens: the caller hung
  up during set-up and the callbacks arrived out of order), ``twice`` (a retry),
  or ``never``; ``status_callback_at_ms``: posted that long after ``start`` while the
  stream is still up, instead of after the call (the call was hung up and the status
  callback came first: the gateway must end the call; the report times the socket's
  close from it, ``end.status_callback_to_close_ms``);
- ``mute_at_ms``: media stops then, the socket stays open (mark echoes still go);
- ``stop_without_close``: after ``stop``, the gateway's close frame is left
  unanswered and the connection is never closed from this side;
- ``stall_reading_at_ms`` / ``stall_reading_ms``: a slow consumer -- the socket is
  not read for a while (its buffers fill; the simulator keeps sending media).

Everything is injected, so tests run calls on a ``Clock`` against the gateway's
routes in memory (``StubTreq`` for HTTP, ``iosim`` for the socket):

- ``clock``: ``IReactorTime`` (the reactor, or ``task.Clock``);
- ``http``: a treq-like client (``post(url, data=, headers=, timeout=, reactor=)``
  whose responses have ``code`` and ``content()``);
- ``connect_socket``: opens the TCP (or TLS) connection for an Autobahn client
  factory (:func:`network_connector` for the real network).

Cost per frame (this is the load generator's hot path): one ``%`` format of a
prebuilt template with precomputed base64, one Autobahn ``sendMessage``, one
playout step; one msgspec decode per frame received.  Nothing is logged per frame,
and one :class:`MediaClock` (one ``LoopingCall``) drives every call of a run.
"""

from __future__ import annotations

import math
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlencode, urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from gateway.audio.playout import FRAME_NS
from gateway.tools.simulator.bench import SLOT_HISTORY, BenchProbe
from gateway.tools.simulator.downlink import (
    GatewayMark,
    GatewayMedia,
    GatewayMessageChecker,
    ViolationKind,
    ViolationLog,
)
from gateway.tools.simulator.playout import DEFAULT_UTTERANCE_GAP_MS, TwilioPlayout, ns_to_ms
from gateway.tools.simulator.report import BargeInReport, CallReport, Outcome
from gateway.tools.simulator.twiml_reader import StreamInstruction, TwimlError, read_twiml
from gateway.tools.simulator.uplink import (
    EARLY_SLACK_NS,
    FRAME_MS,
    CallerTimeline,
    TwilioStreamMessages,
    UplinkClock,
)
from gateway.tools.simulator.wav import CallerAudio, RecordingFormat, write_wav
from gateway.tools.simulator.webhooks import (
    GatewayTarget,
    TwilioSigner,
    call_status_form,
    stream_event_form,
    voice_form,
)
from gateway.twilio.signature import SIGNATURE_HEADER
from gateway.vapi.reactor_time import (
    NS_PER_SECOND,
    DelayedCall,
    ReactorTime,
    now_ns,
    reactor_time,
)
from gateway.websocket_fastpath import FastFrames

__all__ = [
    "STREAM_USER_AGENT",
    "WEBHOOK_USER_AGENT",
    "CallScenario",
    "HttpClient",
    "MediaClock",
    "SimulatedCall",
    "SocketAddress",
    "SocketConnector",
    "TwilioMediaClient",
    "network_connector",
    "run_calls",
]

STREAM_USER_AGENT: Final = "Twilio.TmeWs/1.0"
WEBHOOK_USER_AGENT: Final = "TwilioProxy/1.1"
FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"

_NS_PER_MS: Final = 1_000_000
_MAX_MESSAGE_BYTES: Final = 1024 * 1024
_GIVE_UP_GRACE_S: Final = 30.0
_UPGRADE_STATUS: Final = re.compile(r"upgrade failed \[(\d{3})\]")
_OPEN: Final = WebSocketProtocol.STATE_OPEN
_CALL_SID: Final = re.compile(r"[A-Za-z]{2}[A-Za-z0-9]{1,62}")

StatusCallbackMode = Literal["after", "before-stream", "twice", "never"]
"""When the terminal call status callback is posted (see the module docstring)."""
STATUS_CALLBACK_MODES: Final = ("after", "before-stream", "twice", "never")


@dataclass(frozen=True)
class CallScenario:
    """What the simulated caller does (times in milliseconds after ``start``)."""

    caller: str = "+15550001111"
    called: str = "+15550002222"
    audio: CallerAudio | None = None
    """What the caller says, from ``audio_at_ms``; silence before and after."""
    audio_at_ms: int = 0
    duration_ms: int = 20_000
    """The caller hangs up this long after ``start`` if nobody ended the call before."""
    hangup_after_ms: int | None = None
    """Hang up earlier than ``duration_ms`` (the same hang-up, reported as such)."""
    interrupt_audio: CallerAudio | None = None
    """Said from ``interrupt_at_ms`` (over the caller audio, if they overlap)."""
    interrupt_at_ms: int | None = None
    """Where barge-in is measured from (rounded down to a 20 ms frame)."""
    drop: bool = False
    """End with an abrupt TCP close instead of ``stop``."""
    record_path: str | None = None
    record_format: RecordingFormat = "mulaw"
    utterance_gap_ms: int = DEFAULT_UTTERANCE_GAP_MS
    webhook_timeout_s: float = 15.0
    """Twilio waits at most 15 s for a webhook's answer."""
    close_timeout_s: float = 5.0
    """After ``stop``, how long the gateway has to close the socket."""
    call_sid: str | None = None
    """This CallSid (default: a random one per call)."""
    open_stream: bool = True
    """False: answer the voice webhook and never open the media socket."""
    stream_delay_ms: int = 0
    """How long after the TwiML arrived the media socket is opened."""
    status_callback: StatusCallbackMode = "after"
    status_callback_at_ms: int | None = None
    """Post the status callback this long after ``start``, mid-stream (not after)."""
    mute_at_ms: int | None = None
    """Stop sending media from this time on (the socket stays open)."""
    stop_without_close: bool = False
    """After ``stop``, leave the gateway's close frame unanswered, keep the connection."""
    stall_reading_at_ms: int | None = None
    """A slow consumer: stop reading the socket at this time ..."""
    stall_reading_ms: int | None = None
    """... for this long (``None``: until the caller hangs up)."""

    def __post_init__(self) -> None:
        if self.duration_ms < FRAME_MS:
            raise ValueError("the duration must be at least 20 ms")
        if self.hangup_after_ms is not None and self.hangup_after_ms < FRAME_MS:
            raise ValueError("hangup_after_ms must be at least 20 ms")
        if self.interrupt_audio is not None and self.interrupt_at_ms is None:
            raise ValueError("an interrupt clip needs interrupt_at_ms")
        if self.interrupt_at_ms is not None and self.interrupt_at_ms < 0:
            raise ValueError("interrupt_at_ms must not be negative")
        if self.audio_at_ms < 0:
            raise ValueError("audio_at_ms must not be negative")
        if self.call_sid is not None and _CALL_SID.fullmatch(self.call_sid) is None:
            raise ValueError("call_sid must be two letters and 1 to 62 letters or digits")
        if self.stream_delay_ms < 0:
            raise ValueError("stream_delay_ms must not be negative")
        if self.status_callback not in STATUS_CALLBACK_MODES:
            raise ValueError(f"status_callback must be one of {', '.join(STATUS_CALLBACK_MODES)}")
        if self.status_callback_at_ms is not None and (
                self.status_callback_at_ms < 0 or self.status_callback != "after"):
            raise ValueError("status_callback_at_ms must not be negative and replaces the "
                             "status callback 'after' the call")
        if self.mute_at_ms is not None and self.mute_at_ms < 0:
            raise ValueError("mute_at_ms must not be negative")
        if self.stop_without_close and self.drop:
            raise ValueError("stop_without_close needs a hang-up with stop, not drop")
        if self.stall_reading_at_ms is not None and self.stall_reading_at_ms < 0:
            raise ValueError("stall_reading_at_ms must not be negative")
        if self.stall_reading_ms is not None and (
                self.stall_reading_at_ms is None or self.stall_reading_ms < 1):
            raise ValueError("stall_reading_ms needs stall_reading_at_ms and must be positive")

    @property
    def end_ms(self) -> int:
        """When the caller hangs up (ms after ``start``), whole frames."""
        end = self.duration_ms
        if self.hangup_after_ms is not None:
            end = min(end, self.hangup_after_ms)
        return end - end % FRAME_MS


@dataclass(frozen=True)
class SocketAddress:
    """Where a media socket's TCP connection goes."""

    host: str
    port: int
    tls: bool

    @classmethod
    def of(cls, ws_url: str) -> SocketAddress:
        """The address of a ``ws://`` or ``wss://`` URL."""
        parts = urlsplit(ws_url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {ws_url!r}")
        tls = parts.scheme == "wss"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls)


SocketConnector = Callable[[WebSocketClientFactory, SocketAddress], "Deferred[Any]"]
"""Connects an Autobahn client factory; fires when the TCP (or TLS) connection is up."""


class HttpClient(Protocol):
    """The part of treq's ``HTTPClient`` (or ``StubTreq``) the simulator uses."""

    def post(self, url: str, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


def network_connector(reactor: Any) -> SocketConnector:
    """TCP for ``ws://``, TLS with certificate verification for ``wss://``.

    (Autobahn's ``connectWS`` does not verify certificates, so it is not used.)
    """

    def connect(factory: WebSocketClientFactory, address: SocketAddress) -> Deferred[Any]:
        endpoint: Any = HostnameEndpoint(reactor, address.host, address.port)
        if address.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
        connected: Deferred[Any] = endpoint.connect(factory)
        return connected

    return connect


class MediaClock:
    """The one 20 ms ``LoopingCall`` that drives every call's send clock and playout.

    It runs only while some call is streaming.  Each call works out from the time
    what is due, so a late or skipped tick costs no drift.  ``max_tick_interval_ns``
    is the longest time between two ticks: 20 ms when the simulator keeps up.
    """

    INTERVAL_S: Final = FRAME_NS / NS_PER_SECOND

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = reactor_time(clock)
        self._calls: list[SimulatedCall] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._ticking = False
        self._last_tick_ns: int | None = None
        self.max_tick_interval_ns = 0
        self.probe: BenchProbe | None = None
        """Load-test probes for every call on this clock (``--bench-probe``)."""

    @property
    def running(self) -> bool:
        """True while some call is on the clock."""
        return bool(self._loop.running)

    @property
    def max_tick_interval_ms(self) -> float | None:
        """``max_tick_interval_ns`` in ms (None: the clock never ticked twice)."""
        return self.max_tick_interval_ns / _NS_PER_MS if self.max_tick_interval_ns else None

    def add(self, call: SimulatedCall) -> None:
        """Tick ``call`` from now on (at once if the clock is not running yet)."""
        self._calls.append(call)
        if not self._loop.running:
            self._last_tick_ns = None
            self._loop.start(self.INTERVAL_S, now=True).addErrback(_loop_died)

    def remove(self, call: SimulatedCall) -> None:
        """Stop ticking ``call``; the clock stops when no call is left."""
        if call in self._calls:
            self._calls.remove(call)
        if not self._calls and self._loop.running and not self._ticking:
            self._loop.stop()

    def _tick(self) -> None:
        now = now_ns(self._clock)
        if self._last_tick_ns is not None:
            self.max_tick_interval_ns = max(self.max_tick_interval_ns, now - self._last_tick_ns)
        self._last_tick_ns = now
        self._ticking = True
        try:
            for call in tuple(self._calls):
                call.media_tick(now)
        finally:
            self._ticking = False
        if not self._calls:
            self._loop.stop()


def _loop_died(failure: Failure) -> None:  # pragma: no cover - _tick catches per call
    failure.printTraceback()


class TwilioMediaClient(FastFrames, WebSocketClientProtocol):  # type: ignore[misc]
    """The Twilio end of one media socket: hands everything to its :class:`SimulatedCall`."""

    # Autobahn's own logger would log the upgrade headers at debug.
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def __init__(self, call: SimulatedCall) -> None:
        super().__init__()
        self._call = call

    def onOpen(self) -> None:
        self._call.socket_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        self._call.gateway_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        self._call.socket_closed(self, wasClean, code, reason)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:  # noqa: N803
        if self._call.leave_close_frame_unanswered(code):
            return None  # no reply and no state change: the connection stays open
        result: bool | None = super().onCloseFrame(code, reasonRaw)
        return result


class _TwilioMediaFactory(WebSocketClientFactory):
    protocol = TwilioMediaClient  # type: ignore[assignment]
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def __init__(self, call: SimulatedCall, url: str, signature: str) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            url=url,
            headers={SIGNATURE_HEADER: signature},
            useragent=STREAM_USER_AGENT,
            protocols=[],
        )
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            autoPingInterval=0,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            maxMessagePayloadSize=_MAX_MESSAGE_BYTES,
            maxFramePayloadSize=_MAX_MESSAGE_BYTES,
        )
        self._call = call

    def buildProtocol(self, addr: IAddress | None) -> TwilioMediaClient:
        protocol = TwilioMediaClient(self._call)
        protocol.factory = self
        return protocol


class SimulatedCall:
    """One call of a scenario against one gateway (see the module docstring)."""

    def __init__(
        self,
        scenario: CallScenario,
        target: GatewayTarget,
        *,
        clock: IReactorTime,
        http: HttpClient,
        connect_socket: SocketConnector,
        media_clock: MediaClock | None = None,
        call_sid: str | None = None,
        stream_sid: str | None = None,
    ) -> None:
        self.scenario: Final = scenario
        self.target: Final = target
        self.call_sid: Final = call_sid or scenario.call_sid or "CA" + secrets.token_hex(16)
        self.stream_sid: Final = stream_sid or "MZ" + secrets.token_hex(16)
        self._clock: ReactorTime = reactor_time(clock)
        self._http = http
        self._connect_socket = connect_socket
        self._media_clock = media_clock if media_clock is not None else MediaClock(clock)
        self._signer = TwilioSigner(target.auth_token)
        self.report: Final = CallReport(call_sid=self.call_sid, stream_sid=self.stream_sid,
                                        caller=scenario.caller, called=scenario.called)
        if scenario.interrupt_at_ms is not None:
            self.report.barge_in = BargeInReport(
                interrupt_at_ms=scenario.interrupt_at_ms - scenario.interrupt_at_ms % FRAME_MS)
        self._violations = ViolationLog()
        self._checker = GatewayMessageChecker(self.stream_sid, self._violations)
        self._messages = TwilioStreamMessages(stream_sid=self.stream_sid, call_sid=self.call_sid,
                                              account_sid=target.account_sid)
        self._timeline = CallerTimeline(
            scenario.audio, audio_at_ms=scenario.audio_at_ms,
            interrupt=scenario.interrupt_audio, interrupt_at_ms=scenario.interrupt_at_ms)
        self._outcome: tuple[Outcome, str] | None = None
        self._stream: StreamInstruction | None = None
        self._socket: TwilioMediaClient | None = None
        """The media socket, once its upgrade succeeded."""
        self._connection: TwilioMediaClient | None = None
        """The media socket's protocol, once its TCP connection is up."""
        self._connecting: Deferred[Any] | None = None
        self._closed: Deferred[None] | None = None
        self._playout: TwilioPlayout | None = None
        self._uplink: UplinkClock | None = None
        self._t0_ns = 0
        self._end_ns = 0
        self._end_frame = 0
        self._media_limit = 0
        """Media frames from this index on are not sent (the end, or ``mute_at_ms``)."""
        self._stall_at_ns: int | None = None
        self._stall_until_ns: int | None = None
        self._stalled_since_ns: int | None = None
        self._close_frame_ns: int | None = None
        self._max_queued_bytes = 0
        self._stream_end_ns: int | None = None
        self._status_at_ns: int | None = None
        self._status_posted_ns: int | None = None
        self._hung_up = False
        self._dropped = False
        self._posts: list[Deferred[None]] = []
        self._close_timer: DelayedCall | None = None
        self._give_up_timer: DelayedCall | None = None

    def __repr__(self) -> str:
        return f"<SimulatedCall {self.call_sid}>"

    def run(self) -> Deferred[CallReport]:
        """Run the whole call; fires with its report (never fails)."""
        return Deferred.fromCoroutine(self._run())

    # -- the call, step by step ---------------------------------------------------------

    async def _run(self) -> CallReport:
        scenario = self.scenario
        try:
            stream = await self._answer()
            if stream is not None and scenario.status_callback == "before-stream":
                await self._post_call_status()
            if stream is not None and not scenario.open_stream:
                self.report.end.ended_by = "caller"
                self.report.end.reason = "the caller hung up before the stream opened"
            elif stream is not None:
                if scenario.stream_delay_ms:
                    delayed: Deferred[None] = Deferred()
                    self._clock.callLater(scenario.stream_delay_ms / 1000, delayed.callback, None)
                    await delayed
                await self._stream_call(stream)
            if scenario.status_callback in ("after", "twice") and (
                    self._status_posted_ns is None):
                await self._post_call_status()
            if scenario.status_callback == "twice":
                await self._post_call_status()
        except Exception as error:  # a bug here must not hide the other calls' reports
            self._end_as("failed", f"simulator error: {error!r}")
            self._stop_media()
        finally:
            self._cancel_timers()
        if self._posts:
            await gatherResults(self._posts)
        self._complete_report()
        return self.report

    async def _answer(self) -> StreamInstruction | None:
        """The voice webhook: the ``<Stream>`` to open, or None (refused or failed)."""
        form = voice_form(call_sid=self.call_sid, account_sid=self.target.account_sid,
                          caller=self.scenario.caller, called=self.scenario.called)
        answer = self.report.answer
        try:
            code, body = await self._post_signed(self.target.voice_url, form)
        except Exception as error:
            self._end_as("failed", f"voice webhook: {_describe(error)}")
            return None
        answer.webhook_status = code
        if not 200 <= code < 300:
            self._end_as("refused", f"voice webhook answered {code}")
            return None
        try:
            twiml = read_twiml(body)
        except TwimlError as error:
            self._end_as("failed", str(error))
            return None
        answer.kind = twiml.kind
        answer.greeting = list(twiml.greeting)
        answer.after_stream = list(twiml.after_stream)
        for problem in twiml.problems:
            self._violations.add(ViolationKind.BAD_TWIML, problem, None)
        if twiml.kind == "busy":
            self._end_as("refused", "busy")
            return None
        if twiml.stream is None:
            self._end_as("failed", "the TwiML has no <Connect><Stream> and is not a busy answer")
            return None
        answer.stream_url = twiml.stream.url
        answer.parameters = list(twiml.stream.parameters)
        return twiml.stream

    async def _stream_call(self, stream: StreamInstruction) -> None:
        """Open the media socket and stream until it closes."""
        self._stream = stream
        local_url = self.target.local_stream(stream.url)
        try:
            address = SocketAddress.of(local_url)
        except ValueError as error:
            self._end_as("failed", f"<Stream url>: {error}")
            return
        factory = _TwilioMediaFactory(self, local_url, self._signer.sign_websocket(stream.url))
        self._closed = Deferred()
        self._give_up_timer = self._clock.callLater(
            self.scenario.end_ms / 1000 + _GIVE_UP_GRACE_S, self._give_up)
        self._connecting = self._connect_socket(factory, address)
        try:
            self._connection = await self._connecting
        except Exception as error:
            self._end_as("failed", f"cannot connect the media socket to {address.host}:"
                                   f"{address.port}: {_describe(error)}")
            return
        finally:
            self._connecting = None
        await self._closed

    async def _post_call_status(self) -> None:
        """The terminal status callback: the call is over, ``completed``."""
        end_ns = self._stream_end_ns
        duration_s = 0 if end_ns is None else math.ceil((end_ns - self._t0_ns) / NS_PER_SECOND)
        form = call_status_form(
            call_sid=self.call_sid, account_sid=self.target.account_sid,
            caller=self.scenario.caller, called=self.scenario.called, status="completed",
            duration_s=duration_s, wall_time=self._clock.seconds())
        status_url = self.target.status_url
        try:
            code, _ = await self._post_signed(status_url, form,
                                              self.target.local_status(status_url))
        except Exception as error:
            self._end_as("failed", f"status callback: {_describe(error)}")
            return
        self.report.end.status_callback = code
        self.report.end.status_callbacks.append(code)
        if not 200 <= code < 300:
            self._end_as("failed", f"status callback answered {code}")

    # -- the media socket (called by TwilioMediaClient) ------------------------------

    def socket_opened(self, socket: TwilioMediaClient) -> None:
        """The upgrade succeeded: stream from the media clock's next tick."""
        self._socket = socket
        self._media_clock.add(self)

    def media_tick(self, now: int) -> None:
        """The media clock's tick: start, send what is due, echo marks, hang up."""
        try:
            playout = self._playout
            if playout is None:
                self._begin_stream(now)
                return
            self._pace_reading(now)
            if self._status_at_ns is not None and now >= self._status_at_ns:
                self._post_status_mid_call(now)
            echoes = playout.advance(now)
            self._max_queued_bytes = max(self._max_queued_bytes, playout.queued_bytes)
            if echoes:
                self._echo(echoes)
            self._send_due(now)
            if now >= self._end_ns - EARLY_SLACK_NS:
                self._hang_up(now)
        except Exception as error:
            self._end_as("failed", f"simulator error: {error!r}")
            self._drop()

    def gateway_message(self, payload: bytes, is_binary: bool) -> None:
        """A frame from the gateway: check it, then play, queue marks or clear."""
        frames = self.report.frames
        frames.received_total += 1
        if self._hung_up:
            frames.received_after_stop += 1
            return
        now = now_ns(self._clock)
        playout = self._playout
        at_ms = None if playout is None else ns_to_ms(now - self._t0_ns)
        message = self._checker.check(payload, is_binary, at_ms)
        if message is None or playout is None:
            return
        if isinstance(message, GatewayMedia):
            payload = message.media.payload
            frames.received_media += 1
            frames.received_media_bytes += len(payload)
            echoes = playout.on_media(payload, now)
            if self._media_clock.probe is not None:
                self._media_clock.probe.downlink_payload(payload, now)
        elif isinstance(message, GatewayMark):
            frames.received_marks += 1
            echoes = playout.on_mark(message.mark.name, now)
        else:
            frames.received_clears += 1
            echoes = playout.on_clear(now)
            if self._media_clock.probe is not None and playout.audio_slot_log is not None:
                self._media_clock.probe.clear(self.call_sid, self._t0_ns, now,
                                              playout.audio_slot_log)
        if echoes:
            self._echo(echoes)

    def socket_closed(self, socket: TwilioMediaClient, was_clean: bool, code: int | None,
                      reason: str | None) -> None:
        """The socket closed or dropped, or its upgrade failed."""
        now = now_ns(self._clock)
        self._resume_reading(now)
        self._media_clock.remove(self)
        self._cancel_close_timer()
        end = self.report.end
        if self._socket is None:
            text = socket.wasNotCleanReason or reason or "closed before the upgrade finished"
            status = _UPGRADE_STATUS.search(text)
            if status is not None:
                self._end_as("refused", f"media socket upgrade answered {status.group(1)}")
            else:
                self._end_as("failed", f"media socket: {text}")
        else:
            if self._close_frame_ns is not None:  # we left its close frame unanswered
                end.closed_by = "gateway"
                end.dropped_after_close_frame_ms = ns_to_ms(now - self._close_frame_ns)
            elif self._dropped or socket.closedByMe:
                end.closed_by = "simulator"
            elif socket.remoteCloseCode is not None:
                end.closed_by = "gateway"
            else:
                end.closed_by = "network"
            end.close_code = code
            end.close_reason = reason
            end.clean = was_clean
            if self._status_posted_ns is not None:
                end.status_callback_to_close_ms = ns_to_ms(now - self._status_posted_ns)
            if not self._hung_up:
                self._gateway_ended(now, code, reason)
        if self._closed is not None and not self._closed.called:
            self._closed.callback(None)

    def leave_close_frame_unanswered(self, code: int) -> bool:
        """The gateway's close frame arrived: whether to leave it unanswered
        (``stop_without_close``, after ``stop``); the gateway did close in time."""
        if not (self.scenario.stop_without_close and self._hung_up
                and self.report.end.ended_by == "caller"):
            return False
        if self._close_frame_ns is None:
            self._close_frame_ns = now_ns(self._clock)
            self.report.end.close_frame_ignored = code
            self._cancel_close_timer()
        return True

    def _pace_reading(self, now: int) -> None:
        """A slow consumer (``stall_reading_at_ms``): stop, later resume, reading the socket."""
        if self._stall_at_ns is not None and now >= self._stall_at_ns:
            self._stall_at_ns = None
            self._pause_reading(now)
        if self._stall_until_ns is not None and now >= self._stall_until_ns:
            self._stall_until_ns = None
            self._resume_reading(now)

    def _pause_reading(self, now: int) -> None:
        reading = self._reading()
        if reading is not None:
            reading.pauseProducing()
            self._stalled_since_ns = now

    def _resume_reading(self, now: int) -> None:
        since, self._stalled_since_ns = self._stalled_since_ns, None
        if since is None:
            return
        self.report.frames.reading_paused_ms += round(ns_to_ms(now - since))
        reading = self._reading()
        if reading is not None:
            reading.resumeProducing()

    def _reading(self) -> IPushProducer | None:
        """The media socket's transport as the producer of what it reads, if it is one."""
        socket = self._socket
        transport = socket.transport if socket is not None else None
        return IPushProducer(transport) if IPushProducer.providedBy(transport) else None

    # -- streaming -----------------------------------------------------------------------

    def _begin_stream(self, now: int) -> None:
        scenario = self.scenario
        self._t0_ns = now
        self._end_ns = now + scenario.end_ms * _NS_PER_MS
        self._end_frame = scenario.end_ms // FRAME_MS
        self._media_limit = self._end_frame
        if scenario.mute_at_ms is not None:
            self._media_limit = min(self._end_frame, scenario.mute_at_ms // FRAME_MS)
        if scenario.status_callback_at_ms is not None:
            self._status_at_ns = now + scenario.status_callback_at_ms * _NS_PER_MS
        if scenario.stall_reading_at_ms is not None:
            self._stall_at_ns = now + scenario.stall_reading_at_ms * _NS_PER_MS
            if scenario.stall_reading_ms is not None:
                self._stall_until_ns = self._stall_at_ns + scenario.stall_reading_ms * _NS_PER_MS
        self._uplink = UplinkClock(now)
        self._playout = TwilioPlayout(
            now, utterance_gap_ms=scenario.utterance_gap_ms,
            interrupt_at_ms=scenario.interrupt_at_ms, record=scenario.record_path is not None)
        if self._media_clock.probe is not None:
            self._playout.audio_slot_log = deque(maxlen=SLOT_HISTORY)
        stream = self._stream
        assert stream is not None
        self._send(self._messages.connected())
        self._send(self._messages.start(dict(stream.parameters)))
        self._checker.started = True
        self._post_stream_event("stream-started")
        self._send_due(now)

    def _send_due(self, now: int) -> None:
        uplink = self._uplink
        assert uplink is not None
        frames = self.report.frames
        media = self._messages.media
        timeline = self._timeline
        probe = self._media_clock.probe
        for index in uplink.frames_due(now, limit=self._media_limit):
            payload, speech = timeline.frame(index)
            if probe is not None:
                payload = probe.uplink_payload(now)
            self._send(media(index * FRAME_MS, payload))
            frames.sent_media += 1
            if speech:
                frames.sent_speech += 1
        frames.skipped = uplink.skipped_frames

    def _echo(self, names: Sequence[str]) -> None:
        for name in names:
            self._send(self._messages.mark(name))
        self.report.frames.sent_mark_echoes += len(names)

    def _send(self, frame: bytes) -> None:
        socket = self._socket
        if socket is not None and socket.state == _OPEN:
            socket.sendMessage(frame)
            self.report.frames.sent_total += 1

    def _post_status_mid_call(self, now: int) -> None:
        """``status_callback_at_ms``: the status callback while the stream is still up."""
        self._status_at_ns = None
        self._status_posted_ns = now
        self._posts.append(Deferred.fromCoroutine(self._post_call_status()))

    def _hang_up(self, now: int) -> None:
        """The caller hangs up: ``stop`` (or an abrupt drop)."""
        self._stall_at_ns = self._stall_until_ns = None
        self._status_at_ns = None
        self._resume_reading(now)  # a slow reader reads again: the close must get through
        self._hung_up = True
        self._stream_end_ns = now
        self._stop_media(now)
        end = self.report.end
        scenario = self.scenario
        hangup = scenario.hangup_after_ms
        seconds = f"{scenario.end_ms / 1000:g} s"
        end.reason = (f"the caller hung up after {seconds}"
                      if hangup is not None and hangup <= scenario.duration_ms
                      else f"the caller hung up at the end of the scenario ({seconds})")
        if scenario.drop:
            end.ended_by = "caller-drop"
            end.reason += ", dropping the connection without stop"
            self._drop()
            return
        end.ended_by = "caller"
        self._send(self._messages.stop())
        self._post_stream_event("stream-stopped")
        self._close_timer = self._clock.callLater(scenario.close_timeout_s,
                                                  self._gateway_did_not_close)

    def _gateway_ended(self, now: int, code: int | None, reason: str | None) -> None:
        """The gateway (or the network) ended the stream before the caller hung up."""
        self._hung_up = True
        self._stream_end_ns = now
        started = self._playout is not None
        self._stop_media(now)
        end = self.report.end
        end.ended_by = "network" if end.closed_by == "network" else "gateway"
        closed = f"closed {code}{' ' + repr(reason) if reason else ''}"
        seconds = (now - self._t0_ns) / NS_PER_SECOND if started else 0.0
        end.reason = f"the gateway ended the call after {seconds:.1f} s ({closed})"
        end.fallback_spoken = bool(self.report.answer.after_stream)
        if started:
            self._post_stream_event("stream-stopped")
        if end.closed_by != "gateway":
            self._end_as("failed", "the media connection dropped without a close frame")
        elif code != 1000:
            self._end_as("failed", f"the gateway closed the media socket with {code}"
                                   f"{' ' + repr(reason) if reason else ''}")
        elif not started:
            self._end_as("failed", "the gateway closed the media socket before start")

    def _gateway_did_not_close(self) -> None:
        self._close_timer = None
        self._end_as("failed", f"the gateway did not close the media socket within "
                               f"{self.scenario.close_timeout_s:g} s of stop")
        socket = self._socket
        if socket is not None and socket.state == _OPEN:
            socket.sendClose(1000)

    def _give_up(self) -> None:
        self._give_up_timer = None
        self._end_as("failed", "the call did not end in time")
        if self._connecting is not None:
            self._connecting.cancel()
        self._drop()

    def _drop(self) -> None:
        socket = self._connection
        self._hung_up = True
        self._stop_media()
        if socket is not None and not self._dropped:
            self._dropped = True
            socket.dropConnection(abort=True)

    def _stop_media(self, now: int | None = None) -> None:
        self._media_clock.remove(self)
        playout = self._playout
        if playout is not None and not playout.ended:
            playout.finish(now_ns(self._clock) if now is None else now)

    # -- HTTP ---------------------------------------------------------------------------

    async def _post_signed(self, public_url: str, form: Mapping[str, str],
                           local_url: str | None = None) -> tuple[int, bytes]:
        """POST ``form`` signed over ``public_url`` to ``local_url`` (default: its local
        twin): (status, body)."""
        headers = {
            "Content-Type": FORM_CONTENT_TYPE,
            SIGNATURE_HEADER: self._signer.sign_form(public_url, form),
            "User-Agent": WEBHOOK_USER_AGENT,
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
        response = await self._http.post(
            local_url or self.target.local(public_url), data=urlencode(form).encode("ascii"),
            headers=headers, timeout=self.scenario.webhook_timeout_s, reactor=self._clock)
        body: bytes = await response.content()
        return int(response.code), body

    def _post_stream_event(self, event: str) -> None:
        stream = self._stream
        if stream is None or stream.status_callback is None:
            return
        form = stream_event_form(
            call_sid=self.call_sid, account_sid=self.target.account_sid,
            stream_sid=self.stream_sid, stream_name=stream.name, event=event,
            wall_time=self._clock.seconds())
        events = self.report.end.stream_events
        events[event] = None

        def answered(result: tuple[int, bytes]) -> None:
            events[event] = code = result[0]
            if not 200 <= code < 300:
                self._end_as("failed", f"{event} callback answered {code}")

        def failed(failure: Failure) -> None:
            self._end_as("failed", f"{event} callback: {failure.getErrorMessage()}")

        if stream.status_callback_method != "POST":
            self._violations.add(ViolationKind.BAD_TWIML, "statusCallbackMethod "
                                 f"{stream.status_callback_method!r}: the simulator posts", None)
        posted = Deferred.fromCoroutine(self._post_signed(stream.status_callback, form))
        self._posts.append(posted.addCallbacks(answered, failed))

    # -- the report ----------------------------------------------------------------------

    def _end_as(self, outcome: Outcome, detail: str) -> None:
        """Record why the call did not complete (the first reason wins)."""
        if self._outcome is None:
            self._outcome = (outcome, detail)

    def _cancel_timers(self) -> None:
        self._cancel_close_timer()
        timer, self._give_up_timer = self._give_up_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_close_timer(self) -> None:
        timer, self._close_timer = self._close_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _complete_report(self) -> None:
        report = self.report
        playout = self._playout
        t0 = self._t0_ns
        if playout is not None:
            timing, speech = report.timing, report.speech
            if playout.first_media_ns is not None:
                timing.first_media_ms = ns_to_ms(playout.first_media_ns - t0)
            if playout.first_audio_slot is not None:
                timing.first_audio_ms = playout.first_audio_slot * FRAME_MS
            if playout.first_audible_slot is not None:
                timing.first_audible_ms = playout.first_audible_slot * FRAME_MS
            if self._stream_end_ns is not None:
                timing.duration_ms = ns_to_ms(self._stream_end_ns - t0)
            speech.played_ms = playout.played_slots * FRAME_MS
            speech.utterances = playout.utterances
            speech.gaps = playout.gap_count
            speech.gap_ms = playout.gap_slots * FRAME_MS
            speech.longest_gap_ms = playout.longest_gap_slots * FRAME_MS
            speech.gap_samples = list(playout.gaps)
            speech.max_queued_ms = self._max_queued_bytes / 8
            clears = report.clears
            clears.count = playout.clear_count
            clears.dropped_ms = playout.dropped_by_clear_bytes / 8
            clears.samples = list(playout.clears)
            marks = report.marks
            marks.received = playout.marks_received
            marks.echoed_played = playout.marks_played
            marks.echoed_by_clear = playout.marks_flushed
            marks.pending_at_end = playout.pending_marks
            barge = report.barge_in
            if barge is not None:
                barge.assistant_speaking = playout.speaking_at_interrupt
                barge.audio_after_interrupt_ms = playout.slots_after_interrupt * FRAME_MS
                if playout.clear_after_interrupt_ns is not None:
                    barge.clear_after_ms = ns_to_ms(playout.clear_after_interrupt_ns)
            if playout.recording is not None and self.scenario.record_path is not None:
                try:
                    write_wav(self.scenario.record_path, playout.recording,
                              self.scenario.record_format)
                    report.recording = self.scenario.record_path
                except OSError as error:
                    self._end_as("failed", f"cannot write the recording: {error}")
        violations = report.violations
        violations.total = self._violations.total
        violations.by_kind = {kind.value: n for kind, n in self._violations.by_kind.items()}
        violations.samples = list(self._violations.samples)
        if self._outcome is None and playout is not None and playout.first_media_ns is None:
            self._end_as("failed", "the assistant never spoke: " + (report.end.reason or "?"))
        if self._outcome is None:
            report.outcome = "completed"
            report.detail = report.end.reason or "completed"
        else:
            report.outcome, report.detail = self._outcome
        report.ok = report.outcome == "completed" and violations.total == 0


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


def run_calls(
    scenario: CallScenario,
    target: GatewayTarget,
    *,
    clock: IReactorTime,
    http: HttpClient,
    connect_socket: SocketConnector,
    calls: int = 1,
    stagger_s: float = 0.0,
    media_clock: MediaClock | None = None,
) -> Deferred[list[CallReport]]:
    """Run ``calls`` copies of ``scenario`` at once, the i-th started ``i * stagger_s``
    seconds after the first; fires with their reports, in start order.

    With more than one call, a ``record_path`` gets the call's number before its
    suffix (``out.wav`` -> ``out-001.wav``).
    """
    if calls < 1:
        raise ValueError("calls must be at least 1")
    if stagger_s < 0:
        raise ValueError("stagger_s must not be negative")
    shared_clock = media_clock if media_clock is not None else MediaClock(clock)
    runs: list[Deferred[CallReport]] = []
    for index in range(calls):
        call = SimulatedCall(
            _numbered(scenario, index, calls), target, clock=clock, http=http,
            connect_socket=connect_socket, media_clock=shared_clock)
        delay = index * stagger_s
        runs.append(call.run() if delay == 0 else Deferred.fromCoroutine(
            _run_later(clock, delay, call)))
    return gatherResults(runs)


async def _run_later(clock: IReactorTime, delay_s: float, call: SimulatedCall) -> CallReport:
    await deferLater(clock, delay_s)
    return await call.run()


def _numbered(scenario: CallScenario, index: int, calls: int) -> CallScenario:
    if calls == 1 or scenario.record_path is None:
        return scenario
    path = Path(scenario.record_path)
    width = max(3, len(str(calls)))
    return replace(scenario,
                   record_path=str(path.with_name(f"{path.stem}-{index + 1:0{width}d}"
                                                  f"{path.suffix}")))
