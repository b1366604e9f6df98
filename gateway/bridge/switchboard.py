"""The switchboard: where calls are opened, found, joined to their legs, and ended.

It is the one object the routes and protocols of both legs talk to:

- the Twilio voice webhook opens a call (:meth:`Switchboard.open_call`), which starts
  creating its Vapi call at once;
- the Twilio media socket attaches its stream (:meth:`Switchboard.attach_stream`);
- status callbacks, Vapi webhooks and the admin API end calls by CallSid or by Vapi
  call id;
- the worker's one :class:`PlayoutClock` ticks every session every 20 ms.

It implements the sessions' hooks: creating Vapi calls (routing chooses the assistant),
opening Vapi links, ending orphaned Vapi calls, hanging up over Twilio's REST API, and
removing ended sessions from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gateway.admission import Admission
from gateway.bridge.outbound import OutboundCall, outbound_variables
from gateway.bridge.recording import CallRecorder, RecordingWriter
from gateway.bridge.registry import CallRegistry
from gateway.bridge.session import (
    HANDED_OVER,
    CallInfo,
    CallSession,
    CurrentLinkOwner,
    MediaSocket,
    SessionPolicy,
    VapiLink,
)
from gateway.config import Settings
from gateway.logs import get_logger
from gateway.metrics import GatewayMetrics
from gateway.twilio.stream import Started
from gateway.twilio.twiml import CALLED_PARAMETER, CALLER_PARAMETER
from gateway.vapi.assistants import choose_assistant, twilio_call_overrides
from gateway.vapi.calls import AudioFormat, CreatedCall

if TYPE_CHECKING:
    from gateway.cluster.member import ClusterMember, HandOff, Takeover
from gateway.vapi.reactor_time import now_ns, reactor_time

log = get_logger("gateway.bridge")

NS_PER_SECOND = 1_000_000_000
MAX_REMEMBERED_ENDED_CALLS = 100_000
TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


class VapiCalls(Protocol):
    """Creates Vapi calls (``gateway.vapi.calls.CallCreator``)."""

    def create_call(self, choice: Any, audio: AudioFormat, overrides: Any = None
                    ) -> Deferred[CreatedCall]: ...


class TwilioHangup(Protocol):
    """Hangs up a Twilio call over REST (``gateway.twilio.rest.TwilioRestClient``)."""

    def hang_up(self, call_sid: str) -> Deferred[Any]: ...


LinkFactory = Callable[[Any, CreatedCall], VapiLink]


class Switchboard:
    """All calls of this worker (see the module docstring)."""

    def __init__(self, settings: Settings, registry: CallRegistry, admission: Admission,
                 clock: IReactorTime, vapi_calls: VapiCalls, link_factory: LinkFactory,
                 twilio_rest: TwilioHangup | None, metrics: GatewayMetrics | None = None,
                 recordings: RecordingWriter | None = None,
                 cluster: ClusterMember | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.admission = admission
        self.clock = clock
        self._vapi_calls = vapi_calls
        self._link_factory = link_factory
        self._twilio_rest = twilio_rest
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._recordings = recordings
        #: this instance in the cluster (None: a single process, ``backend = memory``)
        self.cluster = cluster
        self._sessions: dict[str, CallSession] = {}
        self._by_vapi_call: dict[str, CallSession] = {}
        self._outbound: dict[str, OutboundCall] = {}  # CallSid → how it was placed
        self._ended_calls: dict[str, float] = {}  # CallSid → until when (insertion order)
        vapi = settings.vapi
        self._audio = AudioFormat(vapi.audio_format, vapi.sample_rate)  # type: ignore[arg-type]
        self.policy = SessionPolicy(
            audio_encoding=vapi.audio_format,
            sample_rate=vapi.sample_rate,
            idle_timeout_ns=int(settings.twilio.idle_timeout * NS_PER_SECOND),
            on_vapi_loss=vapi.on_vapi_loss,
            recreate_first_message=vapi.recreate_first_message or None,
            rest_available=twilio_rest is not None,
            hangup_via_rest=settings.twilio.hangup_via == "rest",
            open_link_on_stream=cluster is not None,
        )
        self.orphans_ended = 0
        self._orphans: set[Deferred[Any]] = set()

    def now_ns(self) -> int:
        return now_ns(reactor_time(self.clock))

    # -- lookups ------------------------------------------------------------------------

    def get(self, call_sid: str) -> CallSession | None:
        return self._sessions.get(call_sid)

    def holds(self, call_sid: str) -> bool:
        session = self._sessions.get(call_sid)
        return session is not None and not session.ended

    def by_vapi_call(self, vapi_call_id: str) -> CallSession | None:
        return self._by_vapi_call.get(vapi_call_id)

    def sessions(self) -> list[CallSession]:
        return list(self._sessions.values())

    # -- opening and attaching ------------------------------------------------------------

    def open_call(self, info: CallInfo, start: bool = True) -> CallSession:
        """An admitted call: register its session and start creating its Vapi call
        (``start=False``: the caller starts it, e.g. once a takeover is settled).

        A repeated webhook for a live call (Twilio retries) returns the existing session.
        """
        existing = self._sessions.get(info.call_sid)
        if existing is not None and not existing.ended:
            return existing
        session = CallSession(info, self.settings.bridge, self.policy, self, self.now_ns)
        self._sessions[info.call_sid] = session
        self.registry.add(session)
        self.metrics.call_started()
        session.log.info("call admitted", caller=info.caller, called=info.called,
                         active_calls=len(self._sessions))
        if start:
            session.start()
        return session

    def attach_stream(self, stream: MediaSocket, started: Started,
                      outbound: OutboundCall | None = None) -> CallSession | None:
        """Join a started media stream (its token already verified) to its call.

        A stream for a call this worker does not hold opens the call now, if admitted:
        an outbound call placed by the admin API (``outbound``: the assistant and
        variables chosen then), or a call whose webhook this process did not see (e.g.
        the daemon restarted between the webhook and the stream).
        """
        session = self._sessions.get(started.call_sid)
        if session is None or session.ended:
            if self._ended_recently(started.call_sid):
                log.warning("stream refused: its call has already ended",
                            call_sid=started.call_sid)
                return None
            if self.admission.admit() is not None:
                log.warning("stream refused: not admitting calls", call_sid=started.call_sid)
                return None
            params = started.custom_parameters
            if outbound is not None:
                self._outbound[started.call_sid] = outbound
                info = CallInfo(started.call_sid, outbound.caller, outbound.called,
                                started.account_sid)
            else:
                info = CallInfo(started.call_sid, params.get(CALLER_PARAMETER, ""),
                                params.get(CALLED_PARAMETER, ""), started.account_sid)
            cluster = self.cluster
            if cluster is not None and outbound is None:
                # another instance may have answered its webhook and created its Vapi
                # call: ask it for that call while the stream is already flowing here
                # the lookup goes out before this instance records itself as the owner
                asking = cluster.take_over(started.call_sid)
                taking = self.open_call(info, start=False)
                taking.attach_stream(stream, started)
                asking.addCallback(lambda outcome: self._took_over(taking, outcome))
                return taking
            session = self.open_call(info)
        session.attach_stream(stream, started)
        return session

    def _took_over(self, session: CallSession, outcome: Takeover) -> None:
        session.log.info("takeover settled", outcome=outcome.reason,
                         handed_over=outcome.created is not None)
        if outcome.ended:
            session.end("call-already-ended")
        else:
            session.start(outcome.created)

    # -- ending -------------------------------------------------------------------------------

    def end_call(self, call_sid: str, cause: str) -> Deferred[None] | None:
        """End a call by CallSid; None if this worker holds no such call."""
        session = self._sessions.get(call_sid)
        if session is None:
            return None
        return session.end(cause)

    def end_anywhere(self, call_sid: str, cause: str) -> Deferred[str | None]:
        """End a call held here or by another instance of the cluster: which instance
        holds it (None if none does, as far as anyone can tell)."""
        if self.end_call(call_sid, cause) is not None:
            return succeed(self.cluster.instance_id if self.cluster else "local")
        if self.cluster is None:
            return succeed(None)
        return self.cluster.end_elsewhere(call_sid, cause)

    def call_status(self, call_sid: str, status: str) -> bool:
        """A Twilio call status callback; a terminal status ends the call (here, or on
        the instance that holds it). Idempotent; True if it was held here."""
        if status not in TERMINAL_CALL_STATUSES:
            return False
        if self.end_call(call_sid, "twilio-status") is not None:
            return True
        if self.cluster is not None:
            self.cluster.end_elsewhere(call_sid, "twilio-status")
        return False

    def vapi_call_ended(self, vapi_call_id: str) -> bool:
        """Vapi says (by webhook) that its call ended: end the phone call too — only if
        that Vapi call is still the phone call's current one (not one it replaced).
        A Vapi call held by another instance is passed on to it."""
        session = self._by_vapi_call.get(vapi_call_id)
        if session is None:
            if self.cluster is not None:
                self.cluster.vapi_ended_elsewhere(vapi_call_id)
            return False
        if session.vapi_call_id != vapi_call_id:
            return False
        session.end("vapi-ended")
        return True

    def hand_over(self, call_sid: str) -> Deferred[HandOff]:
        """Another instance got this call's media stream and asks for its Vapi side."""
        session = self._sessions.get(call_sid)
        if session is None or session.ended:
            return succeed("ended" if self._ended_recently(call_sid) else "none")

        def outcome(created: CreatedCall | None) -> HandOff:
            return created if created is not None else "none"

        return session.hand_over().addCallback(outcome)

    # -- the sessions' hooks ------------------------------------------------------------------

    def create_vapi_call(self, session: CallSession, first_message: str | None
                         ) -> Deferred[CreatedCall]:
        info = session.info
        placed = self._outbound.get(info.call_sid)
        choice = placed.choice if placed else choose_assistant(self.settings.routing,
                                                               info.called)
        overrides: dict[str, Any] | None = None
        if self.settings.assistant.variable_values or first_message is not None:
            overrides = twilio_call_overrides(
                caller_number=info.caller or None, dialled_number=info.called or None,
                call_sid=info.call_sid, first_message=first_message)
            if not self.settings.assistant.variable_values:
                overrides.pop("variableValues", None)
        if placed is not None:  # the admin request's variables win
            overrides = outbound_variables(overrides, placed.variables)
        if choice is None:  # routing always has a default; kept for type safety
            raise RuntimeError("no assistant configured")
        creating = self._vapi_calls.create_call(choice, self._audio, overrides)
        asked = self.clock.seconds()

        def remember(created: CreatedCall) -> CreatedCall:
            self.metrics.vapi_call_created(self.clock.seconds() - asked)
            if not session.ended:
                self._by_vapi_call[created.call_id] = session
            return created

        def count_failure(failure: Failure) -> Failure:
            self.metrics.vapi_call_failed(type(failure.value).__name__)
            return failure

        return creating.addCallbacks(remember, count_failure)

    def open_link(self, owner: CurrentLinkOwner, created: CreatedCall) -> VapiLink:
        return self._link_factory(owner, created)

    def _remember_ended(self, call_sid: str) -> None:
        """Keep an ended CallSid as long as its stream token lives (a late stream is then
        refused instead of starting the call again); bounded, oldest dropped first."""
        ended = self._ended_calls
        ended.pop(call_sid, None)
        ended[call_sid] = self.clock.seconds() + self.settings.twilio.stream_token_ttl
        while len(ended) > MAX_REMEMBERED_ENDED_CALLS:
            del ended[next(iter(ended))]

    def _ended_recently(self, call_sid: str) -> bool:
        now = self.clock.seconds()
        ended = self._ended_calls
        while ended:
            oldest, until = next(iter(ended.items()))
            if until > now:
                break
            del ended[oldest]
        return call_sid in ended

    def end_orphan(self, created: CreatedCall) -> None:
        """A Vapi call whose phone call is gone: open its socket only to end it."""
        self.orphans_ended += 1
        self._by_vapi_call.pop(created.call_id, None)
        link = self._link_factory(_OrphanOwner(created.call_id), created)
        link.start()
        # end-call goes out once the socket is open; if it never opens, stop closes it
        ending: Deferred[Any] = link.when_open().addBoth(lambda _: link.stop())
        self._orphans.add(ending)

        def done(result: object) -> None:
            self._orphans.discard(ending)

        ending.addBoth(done)

    def when_orphans_ended(self) -> Deferred[None]:
        """Fires once every Vapi call being ended over a socket of its own is ended."""
        pending = list(self._orphans)
        ended: Deferred[None] = DeferredList(pending, consumeErrors=True).addCallback(
            lambda _: None)
        return ended

    def hang_up_twilio(self, session: CallSession) -> Deferred[None] | None:
        if self._twilio_rest is None:
            return None
        hanging = self._twilio_rest.hang_up(session.call_sid)

        def failed(failure: Failure) -> None:
            session.log.error("twilio hang-up failed", error=failure.getErrorMessage())

        return hanging.addCallbacks(lambda _: None, failed)

    def session_ended(self, session: CallSession) -> None:
        if self._sessions.get(session.call_sid) is session:
            del self._sessions[session.call_sid]
        if session.vapi_call_id is not None:
            self._by_vapi_call.pop(session.vapi_call_id, None)
        self._outbound.pop(session.call_sid, None)
        if session.cause != HANDED_OVER:  # a handed-over call lives on elsewhere
            self._remember_ended(session.call_sid)
        self.registry.remove(session)
        now = self.now_ns()
        self.metrics.call_ended(session.cause or "unknown", (now - session.created_ns) / 1e9,
                                session.traffic(now))

    def call_changed(self, session: CallSession) -> None:
        if self._sessions.get(session.call_sid) is session:
            self.registry.update(session)

    def barge_in(self, reaction_s: float, queued_s: float) -> None:
        self.metrics.barge_in(reaction_s, queued_s)

    def start_recording(self, session: CallSession) -> CallRecorder | None:
        if self._recordings is None:
            return None
        return self._recordings.recorder(session.call_sid, call_log=session.log)

    # -- the clock ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """One playout tick for every session; a failing session is ended, never the loop."""
        now = self.now_ns()
        for session in list(self._sessions.values()):
            try:
                session.tick(now)
            except Exception:
                session.log.error("session tick failed; ending the call", exc_info=True)
                session.end("internal-error")


class _OrphanOwner:
    """The owner of a link opened only to end an orphaned Vapi call: it ignores all."""

    def __init__(self, call_id: str) -> None:
        self.log = log.bind(vapi_call_id=call_id, orphan=True)

    def on_link_open(self) -> None:
        pass

    def on_link_audio(self, audio: bytes) -> None:
        pass

    def on_link_event(self, event: object) -> None:
        pass

    def on_link_transition(self, old: object, new: object) -> None:
        pass

    def on_link_failed(self, failure: object) -> None:
        self.log.warning("could not reach an orphaned vapi call to end it")

    def on_link_closed(self, reason: object) -> None:
        self.log.info("orphaned vapi call ended")


class PlayoutClock(Service):
    """The worker's one 20 ms LoopingCall that ticks every session."""

    INTERVAL = 0.02

    def __init__(self, switchboard: Switchboard, clock: IReactorTime) -> None:
        self._loop = LoopingCall(switchboard.tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        done = self._loop.start(self.INTERVAL, now=False)
        done.addErrback(lambda f: log.critical("playout clock stopped", exc_info=f))

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop.running:
            self._loop.stop()
