"""One phone call: the session that joins its Twilio media stream to its Vapi call socket.

A :class:`CallSession` is created when the voice webhook admits a call, and starts
creating the Vapi call at once, so the assistant is ready by the time Twilio's media
stream starts.  It then carries audio both ways:

- **uplink** (caller → Vapi): every caller frame is forwarded the moment it arrives;
  gaps in Twilio's timestamps are filled with mu-law silence, and while Twilio's stream
  stalls, silence frames keep Vapi's uplink flowing (Vapi ends calls whose audio stops).
  While the Vapi link is not open, caller audio is dropped (or at most
  ``reconnect_audio_ms`` of it kept) — stale speech is never replayed.
- **downlink** (Vapi → caller): Vapi's bursts go into the sans-io
  :class:`~gateway.audio.playout.PlayoutBuffer`, which decides on every playout tick
  (and right after each burst) which 20 ms frames and marks go to Twilio.  Sending
  holds (the audio waits in that bounded buffer) while ``[bridge] max_unconfirmed_ms``
  of audio awaits its mark echoes, or while the media socket's transport is full
  (:meth:`CallSession.on_stream_paused`): a Twilio side that stops reading is not fed.
- **barge-in**: on Vapi's ``user-interrupted`` (and/or a user ``speech-update``), in
  the same reactor turn, the local buffer is emptied, Twilio gets ``clear`` and the
  generation is bumped.

Every time-based decision (stream never arrived, maximum duration, idle stream,
uplink keep-alive, playout) is made in :meth:`CallSession.tick`, driven by the
worker's one playout clock: a session owns no timer of its own, so none can be left
running.  :meth:`CallSession.end` ends both legs exactly once for any cause — the Vapi
side always gets ``end-call`` and a close (an orphaned Vapi call bills by the minute),
the Twilio side a socket close or a REST hang-up — and logs one summary line.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure

from gateway.audio import mulaw
from gateway.audio.playout import (
    FRAME_BYTES,
    FRAME_NS,
    PlayoutBuffer,
    PlayoutConfig,
    SendClear,
    SendMark,
    SendMedia,
)
from gateway.audio.resample import PcmToTwilio, TwilioToPcm
from gateway.bridge.recording import CallRecorder
from gateway.config import BridgeSettings
from gateway.logs import get_logger
from gateway.twilio.stream import Audio, Started
from gateway.vapi.calls import CreatedCall
from gateway.vapi.codec import (
    AddMessage,
    AssistantStalled,
    CallEvent,
    EndOfCallReport,
    MessageToAdd,
    SpeechUpdate,
    StatusUpdate,
    ToolCalls,
    Transcript,
    UserInterrupted,
)
from gateway.vapi.link import (
    Connecting,
    Failed,
    LinkClosedReason,
    LinkFailure,
    LinkState,
    Open,
    Reconnecting,
)

log = get_logger("gateway.bridge")

SILENCE_FRAME = mulaw.silence(FRAME_BYTES)
NS_PER_MS = 1_000_000
#: Silence frames sent at most per tick to catch the uplink up after a stall.
MAX_KEEPALIVE_FRAMES_PER_TICK = 10
#: A timestamp gap longer than this is not filled frame by frame (keep-alive covered it).
MAX_GAP_FILL_FRAMES = 50
#: How often one phone call may get a new Vapi call after losing its socket.
MAX_RECREATES = 2

#: End causes that mean the call ended on purpose, so the caller need not hear the
#: fallback message (a REST hang-up is used when the account SID is configured).
NORMAL_END_CAUSES = frozenset({"vapi-ended", "admin-hangup", "max-duration"})
#: The call moved to another instance with its media stream: its Vapi call and the
#: caller live on there, so nothing is ended here.
HANDED_OVER = "handed-over"
#: End causes after which Twilio's side is already gone (or elsewhere): no hang-up.
CALLER_GONE_CAUSES = frozenset({"twilio-stop", "twilio-status", "twilio-socket-closed",
                                HANDED_OVER})


class MediaSocket(Protocol):
    """What a session needs of the Twilio media WebSocket (the Twilio leg's protocol)."""

    def send_media(self, payload: bytes) -> None: ...

    def send_mark(self, name: str) -> None: ...

    def send_clear(self) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class VapiLink(Protocol):
    """What a session needs of the Vapi link (``gateway.vapi.link_driver.LinkDriver``)."""

    @property
    def state(self) -> LinkState: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[LinkClosedReason]: ...

    def send_audio(self, audio: bytes) -> bool: ...

    def send_message(self, message: Any) -> bool: ...

    def when_open(self) -> Deferred[None]: ...


@dataclass(frozen=True)
class SessionPolicy:
    """How sessions behave, derived once from the settings for every call."""

    audio_encoding: str = "mulaw"
    sample_rate: int = 8000
    idle_timeout_ns: int = 10 * 1_000_000_000
    on_vapi_loss: str = "recreate"
    recreate_first_message: str | None = None
    rest_available: bool = False
    hangup_via_rest: bool = False
    #: Open the Vapi socket only once this instance has the call's media stream (in a
    #: cluster, so the call's Vapi side can still be handed to another instance).
    open_link_on_stream: bool = False


@dataclass(frozen=True)
class CallInfo:
    """Who is calling whom: from the signed voice webhook (or the stream's parameters)."""

    call_sid: str
    caller: str = ""
    called: str = ""
    account_sid: str = ""


@dataclass
class CallCounters:
    """Per-call figures for the summary line and the admin API."""

    uplink_frames: int = 0
    uplink_bytes: int = 0
    uplink_dropped_frames: int = 0
    gap_fill_frames: int = 0
    keepalive_frames: int = 0
    downlink_bursts: int = 0
    downlink_bytes_in: int = 0
    barge_ins: int = 0
    barge_in_reaction_us: list[float] = field(default_factory=list)
    barge_in_queued_ms: list[float] = field(default_factory=list)
    dtmf_digits: int = 0
    reconnects: int = 0
    recreates: int = 0
    link_give_ups: int = 0
    vapi_bad_frames: int = 0
    streams: int = 0
    stream_pauses: int = 0
    """Times the media socket's transport paused (its write buffer full)."""
    first_uplink_ms: float | None = None
    first_downlink_ms: float | None = None


class SessionHooks(Protocol):
    """What the session asks of the switchboard that owns it."""

    def create_vapi_call(self, session: CallSession, first_message: str | None
                         ) -> Deferred[CreatedCall]: ...

    def open_link(self, owner: CurrentLinkOwner, created: CreatedCall) -> VapiLink: ...

    def end_orphan(self, created: CreatedCall) -> None: ...

    def hang_up_twilio(self, session: CallSession) -> Deferred[None] | None: ...

    def session_ended(self, session: CallSession) -> None: ...

    def call_changed(self, session: CallSession) -> None:
        """The call's stream or Vapi call changed (the cluster registry records them)."""

    def barge_in(self, reaction_s: float, queued_s: float) -> None: ...

    def start_recording(self, session: CallSession) -> CallRecorder | None: ...


class CallSession:
    """One phone call, from the voice webhook to the end of both legs."""

    def __init__(self, info: CallInfo, settings: BridgeSettings, policy: SessionPolicy,
                 hooks: SessionHooks, now_ns: Callable[[], int]) -> None:
        self.info = info
        self.settings = settings
        self._hooks = hooks
        self._now_ns = now_ns
        self.log = log.bind(call_sid=info.call_sid)
        self.counters = CallCounters()
        self.created_ns = now_ns()
        self.created_wall = time.time()
        self.state = "awaiting-stream"
        self.cause: str | None = None
        self.vapi_call_id: str | None = None
        self.stream: MediaSocket | None = None
        self.stream_sid: str | None = None
        self.link: VapiLink | None = None
        self.recording: CallRecorder | None = None
        self._created: CreatedCall | None = None
        self._creating: Deferred[CreatedCall] | None = None
        self._handover: Deferred[CreatedCall | None] | None = None
        self._ended: Deferred[None] | None = None
        self._done_waiters: list[Deferred[None]] = []
        self.policy = policy
        self._stream_deadline_ns = self.created_ns + int(settings.stream_wait_timeout * 1e9)
        self._max_end_ns = self.created_ns + int(settings.max_call_duration * 1e9)
        self._idle_timeout_ns = policy.idle_timeout_ns
        self._stream_started_ns = 0
        self._last_media_ns = 0
        self._last_uplink_ns = 0
        self._keepalive_frames_since_media = 0
        self._keepalive_ns = settings.uplink_keepalive_ms * NS_PER_MS
        self._held_uplink: deque[bytes] = deque()
        self._held_limit = settings.reconnect_audio_ms // 20
        self._barge_in_signals = frozenset(settings.barge_in_signals)
        self.playout = PlayoutBuffer(PlayoutConfig(
            initial_lead_ms=settings.playout_lead_ms,
            min_lead_ms=settings.playout_lead_min_ms,
            max_lead_ms=settings.playout_lead_max_ms,
            max_buffer_ms=int(settings.buffer_seconds * 1000),
            mark_every_frames=settings.mark_every_frames,
            barge_in_window_ms=settings.barge_in_window_ms,
            max_unconfirmed_ms=settings.max_unconfirmed_ms,
        ))
        self._stream_paused = False  # the current stream's transport cannot take more
        self.pcm = policy.audio_encoding == "pcm_s16le"
        self._to_vapi = TwilioToPcm(policy.sample_rate) if self.pcm else None
        self._from_vapi = PcmToTwilio(policy.sample_rate) if self.pcm else None

    # -- identity ---------------------------------------------------------------

    @property
    def call_sid(self) -> str:
        return self.info.call_sid

    @property
    def ended(self) -> bool:
        return self.cause is not None

    # -- the Vapi call ------------------------------------------------------------

    def start(self, created: CreatedCall | None = None) -> None:
        """Start creating the Vapi call (at the voice webhook, before the stream), or use
        ``created``: a Vapi call another instance created and handed over."""
        if self.ended:
            if created is not None:
                self._hooks.end_orphan(created)
            return
        if created is not None:
            self._vapi_call_created(created)
        else:
            self._create_vapi_call(first_message=None)

    def hand_over(self) -> Deferred[CreatedCall | None]:
        """The call's media stream reached another instance: give it this call's Vapi call
        if no socket of ours has joined it (None otherwise: that instance creates its
        own), and end here quietly.  Vapi calls are never shared: a joined one ends."""
        if self.ended:
            return succeed(None)
        handed: Deferred[CreatedCall | None] = Deferred()
        if self._creating is not None:  # wait for it, then hand it over unopened
            self._handover = handed
            return handed
        created, self._created = (self._created, None) if self.link is None else (None, None)
        self.end(HANDED_OVER)
        handed.callback(created)
        return handed

    def _create_vapi_call(self, first_message: str | None) -> None:
        creating = self._hooks.create_vapi_call(self, first_message)
        self._creating = creating
        creating.addCallbacks(self._vapi_call_created, self._vapi_call_failed)

    def _vapi_call_created(self, created: CreatedCall) -> None:
        self._creating = None
        if self._handover is not None:  # another instance has the stream: it's theirs
            handover, self._handover = self._handover, None
            self.vapi_call_id = created.call_id
            self.log = self.log.bind(vapi_call_id=created.call_id)
            self.end(HANDED_OVER)
            handover.callback(created)
            return
        if self.ended:  # the phone call ended while Vapi was creating: end that call too
            self.log.info("vapi call created after the call ended; ending it",
                          vapi_call_id=created.call_id)
            self._hooks.end_orphan(created)
            return
        self.vapi_call_id = created.call_id
        self._created = created
        self.log = self.log.bind(vapi_call_id=created.call_id)
        self.log.info("vapi call created",
                      setup_ms=round((self._now_ns() - self.created_ns) / NS_PER_MS, 1))
        self._hooks.call_changed(self)
        if self.policy.open_link_on_stream and self.stream is None:
            return  # opened when the stream attaches (or handed over unopened)
        self._open_link(created)

    def _open_link(self, created: CreatedCall) -> None:
        owner = CurrentLinkOwner(self)
        self.link = owner.link = self._hooks.open_link(owner, created)
        self.link.start()

    def _vapi_call_failed(self, failure: Failure) -> None:
        self._creating = None
        if self._handover is not None:  # the other instance will create one itself
            handover, self._handover = self._handover, None
            self.end(HANDED_OVER)
            handover.callback(None)
            return
        if self.ended:
            return
        self.log.error("vapi call creation failed", error=failure.getErrorMessage(),
                       kind=type(failure.value).__name__)
        self.end("vapi-create-failed")

    # -- the LinkOwner interface (gateway.vapi.link_driver) ------------------------

    def on_link_open(self) -> None:
        now = self._now_ns()
        self._last_uplink_ns = now
        held, self._held_uplink = self._held_uplink, deque()
        for frame in held:
            self._send_uplink(frame)

    def on_link_audio(self, audio: bytes) -> None:
        if self.ended:
            return
        self.counters.downlink_bursts += 1
        self.counters.downlink_bytes_in += len(audio)
        if self._from_vapi is not None:
            audio = self._from_vapi.process(audio)
        self.playout.push(audio)
        if self.stream is not None:
            self._play(self._now_ns())

    def on_link_event(self, event: CallEvent) -> None:
        if self.ended:
            return
        if isinstance(event, UserInterrupted):
            if "user-interrupted" in self._barge_in_signals:
                self._barge_in("user-interrupted")
        elif isinstance(event, SpeechUpdate):
            if event.role == "user" and event.status == "started":
                if "speech-update" in self._barge_in_signals:
                    self._barge_in("speech-update")
            elif event.role == "assistant" and event.status == "stopped":
                if self._from_vapi is not None:
                    self.playout.push(self._from_vapi.flush())
                self.playout.end_of_utterance()
        elif isinstance(event, StatusUpdate):
            self.log.info("vapi status", status=event.status, ended_reason=event.ended_reason)
            if event.status == "ended":
                self.end("vapi-ended")
        elif isinstance(event, EndOfCallReport):
            self.log.info("vapi end-of-call report", ended_reason=event.ended_reason)
            self.end("vapi-ended")
        elif isinstance(event, AssistantStalled):
            self.log.info("vapi assistant stalled (hang)")
        elif isinstance(event, Transcript):
            self.log.debug("transcript", role=event.role, kind=event.transcript_type)
        elif isinstance(event, ToolCalls):
            self.log.info("vapi tool calls", count=len(event.tool_call_list or ()))

    def on_link_transition(self, old: LinkState, new: LinkState) -> None:
        # the link driver logs every transition; the session only counts reconnects
        if type(new).__name__ == "Reconnecting":
            self.counters.reconnects += 1

    def on_link_failed(self, failure: LinkFailure) -> None:
        if self.ended:
            return
        lost_call = self.vapi_call_id
        self.counters.link_give_ups += 1
        if self.policy.on_vapi_loss == "recreate" and self.counters.recreates < MAX_RECREATES:
            self.counters.recreates += 1
            self.log.warning("vapi link lost; creating a new vapi call", reason=failure.reason,
                             attempts=failure.attempts, lost_vapi_call_id=lost_call)
            failed, self.link = self.link, None
            if failed is not None:
                self._retire_link(failed)
                failed.stop()  # the failed link only settles its own state
            if self._created is not None:
                # the lost call may still be alive at Vapi (billing): end it over a socket
                # of its own before its replacement takes over
                self._hooks.end_orphan(self._created)
                self._created = None
            self._create_vapi_call(first_message=self.policy.recreate_first_message)
            return
        self.log.error("vapi link lost; hanging up", reason=failure.reason,
                       attempts=failure.attempts)
        self.end("vapi-lost")

    def on_link_closed(self, reason: LinkClosedReason) -> None:
        if not self.ended:
            self.end("vapi-ended" if reason is not LinkClosedReason.STOPPED else "vapi-closed")

    # -- the Twilio media stream ---------------------------------------------------

    def attach_stream(self, stream: MediaSocket, started: Started) -> None:
        """Bind (or re-bind) the Twilio media stream of this call."""
        now = self._now_ns()
        previous = self.stream
        self.stream = stream
        # a transport that can pause says so (MediaStreamProtocol.writing_paused)
        self._stream_paused = bool(getattr(stream, "writing_paused", False))
        self.stream_sid = started.stream_sid
        self.counters.streams += 1
        self.log = self.log.bind(stream_sid=started.stream_sid)
        if previous is not None:
            self.log.warning("a second stream replaces the first")
            previous.close(1000, "replaced by a newer stream for the same call")
            if self.recording is not None:  # what the old stream still queued was not heard
                self.recording.cleared(now)
            # Twilio's queue belonged to the old stream; what we still hold plays on the new
            self.playout.restart(now, keep_buffered=True)
        elif self.recording is None:
            self.recording = self._hooks.start_recording(self)
        self.state = "streaming"
        self._stream_started_ns = now
        self._last_media_ns = now
        if self.link is None and self._created is not None and not self.ended:
            self._open_link(self._created)  # held back until the stream came here
        self._hooks.call_changed(self)
        self._play(now)

    def on_stream_audio(self, audio: Audio) -> None:
        now = self._now_ns()
        self._last_media_ns = now
        if self.recording is not None:
            self.recording.caller(audio.payload, now, audio.timestamp_ms)
        gap = audio.gap_frames - self._keepalive_frames_since_media
        self._keepalive_frames_since_media = 0
        if gap > 0:
            gap = min(gap, MAX_GAP_FILL_FRAMES)
            self.counters.gap_fill_frames += gap
            for _ in range(gap):
                self._uplink(SILENCE_FRAME)
        self._uplink(audio.payload)
        if self.counters.first_uplink_ms is None and self.counters.uplink_frames:
            self.counters.first_uplink_ms = (now - self._stream_started_ns) / NS_PER_MS
        self._last_uplink_ns = now

    def on_stream_dtmf(self, digit: str) -> None:
        self.counters.dtmf_digits += 1
        self.log.info("dtmf", digit=digit, forwarded=self.settings.dtmf)
        if self.settings.dtmf == "add-message" and self.link is not None:
            self.link.send_message(AddMessage(
                message=MessageToAdd(role="system",
                                     content=f"The caller pressed {digit} on the keypad."),
                trigger_response_enabled=True))

    def on_stream_mark(self, name: str) -> None:
        self.playout.on_mark_echo(name, self._now_ns())

    def on_stream_paused(self, stream: MediaSocket, paused: bool) -> None:
        """The media socket's transport is full (``paused``) or has drained again.

        While it is full no audio frames are written: they wait in the bounded playout
        buffer (:meth:`PlayoutBuffer.tick` with ``paused``) and sending resumes on the
        next tick after it drains.  ``clear`` still goes out at once (barge-in).
        """
        if stream is not self.stream:
            return
        if paused and not self._stream_paused:
            self.counters.stream_pauses += 1
        self._stream_paused = paused

    def on_stream_stopped(self) -> None:
        self.end("twilio-stop")

    def on_stream_closed(self, stream: MediaSocket) -> None:
        """The media socket closed or dropped (only the current stream counts)."""
        if stream is self.stream:
            self.stream = None
            if not self.ended:
                self.end("twilio-socket-closed")

    # -- audio paths -----------------------------------------------------------------

    def _uplink(self, mulaw: bytes) -> None:
        if self._to_vapi is not None:
            mulaw = self._to_vapi.process(mulaw)
        link = self.link
        if link is not None and isinstance(link.state, Open):
            self._send_uplink(mulaw)
        else:
            self.counters.uplink_dropped_frames += 1
            if self._held_limit:
                self._held_uplink.append(mulaw)
                while len(self._held_uplink) > self._held_limit:
                    self._held_uplink.popleft()

    def _send_uplink(self, data: bytes) -> None:
        assert self.link is not None
        if self.link.send_audio(data):
            self.counters.uplink_frames += 1
            self.counters.uplink_bytes += len(data)

    def _play(self, now: int) -> None:
        stream = self.stream
        if stream is None:
            return
        recording = self.recording
        # where the next frame will play: after what Twilio already holds
        play_at = now + self.playout.queued_at_twilio_ns(now) if recording is not None else 0
        actions = self.playout.tick(now, self._stream_paused)
        if not actions:
            return
        # several messages (a frame and its mark, the lead at speech start): one write
        cork = getattr(stream, "cork", None) if len(actions) > 1 else None
        if cork is not None:
            cork()
        try:
            for action in actions:
                if type(action) is SendMedia:
                    stream.send_media(action.payload)
                    if recording is not None:
                        recording.assistant(action.payload, play_at)
                        play_at += FRAME_NS
                    if self.counters.first_downlink_ms is None:
                        self.counters.first_downlink_ms = (
                            (now - self._stream_started_ns) / NS_PER_MS)
                elif type(action) is SendMark:
                    stream.send_mark(action.name)
                elif type(action) is SendClear:
                    stream.send_clear()
                    if recording is not None:
                        recording.cleared(now)
        finally:
            if cork is not None:
                stream.uncork()  # type: ignore[attr-defined]

    def _barge_in(self, signal: str) -> None:
        started = time.perf_counter_ns()
        now = self._now_ns()
        report = self.playout.barge_in(now)
        if self._from_vapi is not None:
            self._from_vapi.reset()
        if self.stream is not None:
            for action in report.actions:
                if isinstance(action, SendClear):
                    self.stream.send_clear()
                    if self.recording is not None:
                        self.recording.cleared(now)
        reaction_us = (time.perf_counter_ns() - started) / 1000
        if report.repeated:
            return
        self.counters.barge_ins += 1
        self._hooks.barge_in(reaction_us / 1e6, report.queued_at_twilio_ms / 1000)
        self.counters.barge_in_reaction_us.append(round(reaction_us, 1))
        self.counters.barge_in_queued_ms.append(round(report.queued_at_twilio_ms, 1))
        self.log.info("barge-in", signal=signal, reaction_us=round(reaction_us, 1),
                      queued_at_twilio_ms=round(report.queued_at_twilio_ms, 1),
                      dropped_local_ms=round(report.dropped_local_ms, 1))

    # -- the clock -------------------------------------------------------------------------

    def tick(self, now: int) -> None:
        """The playout clock's 20 ms tick: deadlines, keep-alive and playout."""
        if self.cause is not None:  # ended
            return
        if self.recording is not None:
            self.recording.tick(now)
        if self.stream is None:
            if self.state == "awaiting-stream" and now >= self._stream_deadline_ns:
                self.end("stream-never-arrived")
            return
        if now >= self._max_end_ns:
            self.end("max-duration")
            return
        if now - self._last_media_ns >= self._idle_timeout_ns:
            self.end("idle-timeout")
            return
        self._keep_uplink_alive(now)
        self._play(now)

    def _keep_uplink_alive(self, now: int) -> None:
        stalled = now - self._last_uplink_ns
        if stalled < self._keepalive_ns:  # the usual case, and the cheapest test
            return
        link = self.link
        if link is None or not isinstance(link.state, Open):
            return
        frames = min(stalled // FRAME_NS, MAX_KEEPALIVE_FRAMES_PER_TICK)
        for _ in range(frames):
            self._uplink(SILENCE_FRAME)
        self._last_uplink_ns += frames * FRAME_NS
        self._keepalive_frames_since_media += frames
        self.counters.keepalive_frames += frames

    # -- the end ---------------------------------------------------------------------------

    def end(self, cause: str) -> Deferred[None]:
        """End both legs for ``cause``, exactly once; fires when teardown is complete."""
        if self._ended is None:
            self.cause = cause  # first: anything teardown sets off sees the call as ended
            self._ended = self._teardown(cause)
            self._ended.addBoth(self._release_waiters)
        if self._ended.called:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._done_waiters.append(waiter)
        return waiter

    def _release_waiters(self, result: object) -> None:
        waiters, self._done_waiters = self._done_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _teardown(self, cause: str) -> Deferred[None]:
        previous_state, self.state = self.state, "ended"
        waits: list[Deferred[Any]] = []
        link, self.link = self.link, None
        if link is not None:
            self._retire_link(link)
            unreachable = isinstance(link.state, (Connecting, Reconnecting, Failed))
            waits.append(link.stop())  # end-call exactly once, then close
            if unreachable and self._created is not None:
                # the socket was (re)connecting, so stop could not send end-call: end
                # that Vapi call over a socket of its own rather than leave it billing
                self._hooks.end_orphan(self._created)
        elif self._created is not None and cause != HANDED_OVER:
            # created, its socket held back for the stream, which never came: end it
            self._hooks.end_orphan(self._created)
        # a Vapi call still being created is ended when it arrives (_vapi_call_created)
        stream, self.stream = self.stream, None
        # The caller hears the TwiML fallback when the socket closes; a call ended on
        # purpose is hung up over REST instead when REST credentials are configured.
        policy = self.policy
        use_rest = policy.rest_available and (
            policy.hangup_via_rest or cause in NORMAL_END_CAUSES)
        if cause == "stream-never-arrived" and policy.open_link_on_stream:
            use_rest = False  # in a cluster the stream may have reached another instance
        if use_rest and cause not in CALLER_GONE_CAUSES:
            hanging = self._hooks.hang_up_twilio(self)
            if hanging is not None:
                waits.append(hanging)
        if stream is not None:
            stream.close(1000, f"call ended: {cause}")
        if self.recording is not None:  # finished off the reactor; teardown never waits
            self.recording.close(self._now_ns())
        self._hooks.session_ended(self)
        self._log_summary(cause, previous_state)
        done: Deferred[None] = DeferredList(waits, consumeErrors=True).addCallback(
            lambda _: None)
        return done

    def _log_summary(self, cause: str, previous_state: str) -> None:
        now = self._now_ns()
        stats = self.playout.stats(now)
        c = self.counters
        reactions = sorted(c.barge_in_reaction_us)
        self.log.info(
            "call ended",
            cause=cause,
            state_at_end=previous_state,
            duration_s=round((now - self.created_ns) / 1e9, 3),
            caller=self.info.caller,
            called=self.info.called,
            frames_up=c.uplink_frames,
            frames_down=stats.frames_sent,
            uplink_dropped=c.uplink_dropped_frames,
            gap_fill_frames=c.gap_fill_frames,
            keepalive_frames=c.keepalive_frames,
            underruns=stats.underruns,
            underrun_ms=round(stats.underrun_ms, 1),
            peak_buffer_ms=round(stats.peak_buffered_ms, 1),
            overflow_drops=stats.overflow_drops,
            overflow_dropped_ms=round(stats.overflow_dropped_ms, 1),
            held_ms=round(stats.held_ms, 1),
            unconfirmed_holds=stats.unconfirmed_holds,
            paused_holds=stats.paused_holds,
            stream_pauses=c.stream_pauses,
            barge_ins=c.barge_ins,
            barge_in_reaction_us=reactions,
            barge_in_queued_ms=c.barge_in_queued_ms,
            reconnects=c.reconnects,
            recreates=c.recreates,
            streams=c.streams,
            dtmf=c.dtmf_digits,
            first_uplink_ms=c.first_uplink_ms,
            first_downlink_ms=c.first_downlink_ms,
        )

    def _retire_link(self, link: VapiLink) -> None:
        self.counters.vapi_bad_frames += _bad_frames(link)

    def traffic(self, now_ns: int) -> dict[str, float]:
        """This call's running totals and current playout figures (read by metrics)."""
        stats = self.playout.stats(now_ns)
        c = self.counters
        return {
            "uplink_frames": c.uplink_frames,
            "uplink_bytes": c.uplink_bytes,
            "downlink_frames": stats.frames_sent,
            "downlink_bytes": stats.bytes_sent,
            "underruns": stats.underruns,
            "underrun_ms": stats.underrun_ms,
            "overflow_drops": stats.overflow_drops,
            "overflow_dropped_frames": stats.overflow_dropped_ms / 20,
            "held_ms": stats.held_ms,
            "unconfirmed_holds": stats.unconfirmed_holds,
            "paused_holds": stats.paused_holds,
            "uplink_dropped": c.uplink_dropped_frames,
            "keepalive_frames": c.keepalive_frames,
            "reconnects": c.reconnects,
            "link_give_ups": c.link_give_ups,
            "vapi_violations": c.vapi_bad_frames + (_bad_frames(self.link) if self.link else 0),
            "lead_ms": stats.lead_ms,
            "buffered_ms": stats.buffered_ms,
            "unconfirmed_ms": stats.unconfirmed_ms,
        }

    def snapshot(self) -> dict[str, Any]:
        """The call as JSON-ready data (admin API, logs)."""
        now = self._now_ns()
        stats = self.playout.stats(now)
        return {
            "call_sid": self.call_sid,
            "from": self.info.caller,
            "to": self.info.called,
            "started": self.created_wall,
            "state": self.state,
            "vapi_call_id": self.vapi_call_id,
            "stream_sid": self.stream_sid,
            "lead_ms": round(stats.lead_ms, 1),
            "target_lead_ms": round(stats.target_lead_ms, 1),
            "buffered_ms": round(stats.buffered_ms, 1),
            "frames_up": self.counters.uplink_frames,
            "frames_down": stats.frames_sent,
            "underruns": stats.underruns,
            "barge_ins": self.counters.barge_ins,
            "reconnects": self.counters.reconnects,
        }


def _bad_frames(link: VapiLink) -> int:
    """Bad input a link received from Vapi (unparsable text, empty or odd-length audio)."""
    counters = getattr(link, "counters", None)
    if counters is None:
        return 0
    return int(counters.frames_bad_text + counters.frames_empty + counters.frames_odd_length)


class CurrentLinkOwner:
    """Hands a link's events to its session only while it is the session's current link.

    After a link fails and a new Vapi call replaces it, whatever the old link still
    reports (its close, late audio) is ignored.
    """

    def __init__(self, session: CallSession) -> None:
        self.session = session
        self.link: VapiLink | None = None

    @property
    def call_sid(self) -> str:
        return self.session.call_sid

    def _current(self) -> bool:
        return self.link is not None and self.session.link is self.link

    def on_link_open(self) -> None:
        if self._current():
            self.session.on_link_open()

    def on_link_audio(self, audio: bytes) -> None:
        if self._current():
            self.session.on_link_audio(audio)

    def on_link_event(self, event: CallEvent) -> None:
        if self._current():
            self.session.on_link_event(event)

    def on_link_transition(self, old: LinkState, new: LinkState) -> None:
        if self._current():
            self.session.on_link_transition(old, new)

    def on_link_failed(self, failure: LinkFailure) -> None:
        if self._current():
            self.session.on_link_failed(failure)

    def on_link_closed(self, reason: LinkClosedReason) -> None:
        if self._current():
            self.session.on_link_closed(reason)
