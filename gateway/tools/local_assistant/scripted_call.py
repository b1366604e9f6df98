"""One call of the local assistant, sans-io: its script as a schedule of actions.

:class:`ScriptedCall` is driven by inputs, each with the current time in
integer nanoseconds -- a socket opened (:meth:`~ScriptedCall.connect`), audio
or a text frame arrived, the socket closed, :meth:`~ScriptedCall.end` -- and
keeps a schedule of what to do next. :meth:`~ScriptedCall.due` pops every
action due by a time and answers with :data:`Output` commands for the shell
(send audio, send an event, close or abort the socket, the call ended);
:meth:`~ScriptedCall.next_due_ns` says when to call it again. It never does
I/O and never reads a clock.

Each utterance is planned up front by :func:`plan_utterance`, a pure function
of the audio, the call's :class:`CallPlan` and a seeded ``random.Random``:
bursts of ``burst_min..burst_max`` ms of audio (cut into ``frame_ms`` frames)
sent ``speed_min..speed_max`` times faster than real time with up to
``jitter`` of jitter, ``speech-update`` (assistant) started at its start and
stopped when a caller listening in real time would have heard its end, then a
final ``transcript``; ``interrupt``, ``stall`` and ``drop`` edit that plan.

What a call received and sent is written into its :class:`CallRecord`.
A socket belongs to a *connection* number; everything scheduled for a
connection is dropped when it closes, so a rejoin starts clean.

``flap`` and ``no-pong`` act on connections: each of the first N connections
(every one, without ``*N``) is aborted ``flap_every`` after it opens, or goes
*dark* ``no_pong_at`` after it opens -- from then on nothing is sent on it,
what arrives on it is ignored and its pings are not answered
(:meth:`ScriptedCall.ping_received` says so), but it stays open until the
client gives up on it.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from gateway.tools.local_assistant.script import Script
from gateway.tools.local_assistant.settings import LocalAssistantSettings
from gateway.vapi.calls import AudioFormat
from gateway.vapi.reactor_time import NS_PER_SECOND

__all__ = [
    "AbortSocket",
    "CallEnded",
    "CallPlan",
    "CallRecord",
    "CloseSocket",
    "DropSocket",
    "Emit",
    "MessageKind",
    "Output",
    "PlayAudio",
    "ScriptedCall",
    "SendAudio",
    "SendEvent",
    "SocketWentDark",
    "Step",
    "UtteranceOver",
    "plan_utterance",
]

NS_PER_MS: Final = 1_000_000
CONTROL_TYPES: Final = frozenset({"say", "add-message", "control", "transfer"})
"""Control messages the local assistant records (besides end-call, which ends the call)."""

# --- outputs (commands for the shell) ------------------------------------------------


@dataclass(frozen=True)
class SendAudio:
    """Send one binary frame on a connection."""

    connection: int
    payload: bytes


@dataclass(frozen=True)
class SendEvent:
    """Send one JSON text frame on a connection."""

    connection: int
    event: dict[str, Any]


@dataclass(frozen=True)
class CloseSocket:
    """Close a connection with a close frame."""

    connection: int
    code: int = 1000
    reason: str = ""


@dataclass(frozen=True)
class AbortSocket:
    """Abort a connection's TCP connection: no close frame."""

    connection: int


@dataclass(frozen=True)
class SocketWentDark:
    """``no-pong``: from now on the connection is left open but unanswered (the shell
    logs it; it stops answering the connection's pings)."""

    connection: int


@dataclass(frozen=True)
class CallEnded:
    """The call is over (the shell logs it and forgets its timer)."""

    reason: str


Output = SendAudio | SendEvent | CloseSocket | AbortSocket | SocketWentDark | CallEnded

# --- utterance plan steps --------------------------------------------------------------


@dataclass(frozen=True)
class PlayAudio:
    """A frame of assistant audio."""

    payload: bytes


@dataclass(frozen=True)
class Emit:
    """A JSON event."""

    event: dict[str, Any]


@dataclass(frozen=True)
class DropSocket:
    """Abort the socket (the ``drop`` behaviour)."""


@dataclass(frozen=True)
class UtteranceOver:
    """The utterance (and any caller turn that cut it) is over: the next may follow."""


Step = PlayAudio | Emit | DropSocket | UtteranceOver


@dataclass(frozen=True)
class _StartUtterance:
    pass


@dataclass(frozen=True)
class _CheckSilence:
    pass


@dataclass(frozen=True)
class _Close:
    pass


@dataclass(frozen=True)
class _Abort:
    connection: int


@dataclass(frozen=True)
class _Ended:
    reason: str


@dataclass(frozen=True)
class _Flap:
    pass


@dataclass(frozen=True)
class _GoDark:
    pass


_Item = Step | _StartUtterance | _CheckSilence | _Close | _Abort | _Ended | _Flap | _GoDark


@dataclass(frozen=True)
class CallPlan:
    """A call's script with every default filled in, times in integer nanoseconds."""

    echo: bool
    echo_delay_ns: int
    speak: bool
    utterances: tuple[str, ...]
    first_message_delay_ns: int
    utterance_gap_ns: int
    frame_ms: int
    burst_min_ns: int
    burst_max_ns: int
    speed_min: float
    speed_max: float
    jitter_ns: int
    target_utterance: int
    interrupt_at_ns: int | None
    user_turn_ns: int
    stall_at_ns: int | None
    stall_ns: int
    hang_after_ns: int
    drop_at_ns: int | None
    refuse_reconnect: bool
    silence_timeout_ns: int
    flap_every_ns: int | None = None
    flap_sockets: int | None = None
    """How many connections flap (``None``: every one)."""
    no_pong_at_ns: int | None = None
    no_pong_sockets: int | None = None
    """How many connections go dark (``None``: every one)."""

    @classmethod
    def resolve(cls, script: Script, settings: LocalAssistantSettings,
                silence_timeout_s: float | None = None) -> CallPlan:
        """``script`` over ``settings`` (a call's own silence timeout wins)."""

        def ms(value: int | None, default: int) -> int:
            return (default if value is None else value) * NS_PER_MS

        timeout_s = settings.silence_timeout_s if silence_timeout_s is None else silence_timeout_s
        return cls(
            echo=script.echo,
            echo_delay_ns=ms(script.echo_delay_ms, settings.echo_delay_ms),
            speak=script.speak,
            utterances=script.utterances or settings.utterances,
            first_message_delay_ns=ms(None, settings.first_message_delay_ms),
            utterance_gap_ns=ms(None, settings.utterance_gap_ms),
            frame_ms=settings.frame_ms,
            burst_min_ns=ms(None, settings.burst_min_ms),
            burst_max_ns=ms(None, settings.burst_max_ms),
            speed_min=settings.speed_min,
            speed_max=settings.speed_max,
            jitter_ns=ms(None, settings.jitter_ms),
            target_utterance=settings.target_utterance,
            interrupt_at_ns=ms(script.interrupt_at_ms, settings.interrupt_at_ms)
            if script.interrupt else None,
            user_turn_ns=ms(None, settings.user_turn_ms),
            stall_at_ns=ms(script.stall_at_ms, settings.stall_at_ms) if script.stall else None,
            stall_ns=ms(script.stall_ms, settings.stall_ms),
            hang_after_ns=ms(None, settings.hang_after_ms),
            drop_at_ns=ms(script.drop_at_ms, settings.drop_at_ms) if script.drop else None,
            refuse_reconnect=script.refuse_reconnect,
            silence_timeout_ns=round(timeout_s * NS_PER_SECOND),
            flap_every_ns=ms(script.flap_every_ms, settings.flap_every_ms)
            if script.flap else None,
            flap_sockets=script.flap_sockets,
            no_pong_at_ns=ms(script.no_pong_at_ms, settings.no_pong_at_ms)
            if script.no_pong else None,
            no_pong_sockets=script.no_pong_sockets,
        )


def _sample_bytes(audio: AudioFormat) -> int:
    return 1 if audio.encoding == "mulaw" else 2


def frame_bytes(audio: AudioFormat, frame_ms: int) -> int:
    """Bytes in one ``frame_ms`` frame of ``audio`` (whole samples, at least one)."""
    return max(1, audio.sample_rate * frame_ms // 1000) * _sample_bytes(audio)


def audio_ns(audio: AudioFormat, n_bytes: int) -> int:
    """How long ``n_bytes`` of ``audio`` last, in integer nanoseconds."""
    return n_bytes // _sample_bytes(audio) * NS_PER_SECOND // audio.sample_rate


def _speech(status: str, role: str, turn: int) -> Emit:
    return Emit({"type": "speech-update", "status": status, "role": role, "turn": turn})


def _transcript(role: str, kind: str, text: str) -> Emit:
    return Emit({"type": "transcript", "role": role, "transcriptType": kind, "transcript": text})


def plan_utterance(audio_bytes: bytes, audio: AudioFormat, plan: CallPlan, rng: random.Random,
                   *, turn: int, clip: str, cut: bool) -> list[tuple[int, Step]]:
    """One utterance as ``(offset_ns, step)`` pairs, in order (offsets from its start).

    ``cut``: apply the plan's interrupt, stall and drop to this utterance.
    """
    size = frame_bytes(audio, plan.frame_ms)
    frames = [audio_bytes[i:i + size] for i in range(0, len(audio_bytes), size)]
    frame_ns = audio_ns(audio, size)
    bursts: list[tuple[int, list[bytes], int]] = []  # (nominal send time, frames, audio length)
    nominal = 0
    index = 0
    while index < len(frames):
        wanted_ns = rng.randint(plan.burst_min_ns, plan.burst_max_ns)
        count = max(1, round(wanted_ns / frame_ns))
        chunk = frames[index:index + count]
        index += count
        length_ns = audio_ns(audio, sum(len(frame) for frame in chunk))
        bursts.append((nominal, chunk, length_ns))
        nominal += int(length_ns / rng.uniform(plan.speed_min, plan.speed_max))
    times: list[int] = []
    for number, (nominal_ns, _, _) in enumerate(bursts):
        jitter = rng.randint(-plan.jitter_ns, plan.jitter_ns) if number else 0
        times.append(max(times[-1] if times else 0, nominal_ns + jitter))
    stall_at = plan.stall_at_ns if cut else None
    stalled = stall_at is not None and any(t >= stall_at for t in times)
    if stalled:
        times = [t + plan.stall_ns if t >= stall_at else t for t in times]  # type: ignore[operator]
    playhead = 0  # when a caller hearing it in real time would hear the end
    for sent_ns, (_, _, length_ns) in zip(times, bursts, strict=True):
        playhead = max(playhead, sent_ns) + length_ns

    steps: list[tuple[int, Step]] = [(0, _speech("started", "assistant", turn))]
    for sent_ns, (_, chunk, _) in zip(times, bursts, strict=True):
        steps.extend((sent_ns, PlayAudio(frame)) for frame in chunk)
    if stalled and plan.stall_ns > plan.hang_after_ns:
        steps.append((stall_at + plan.hang_after_ns, Emit({"type": "hang"})))  # type: ignore[operator]
    steps.append((playhead, _speech("stopped", "assistant", turn)))
    steps.append((playhead, _transcript("assistant", "final", f"(clip {clip})")))
    steps.append((playhead, UtteranceOver()))

    interrupt_at = plan.interrupt_at_ns if cut else None
    if interrupt_at is not None and interrupt_at < playhead:
        steps = _cut(steps, interrupt_at)
        back = interrupt_at + plan.user_turn_ns
        steps += [
            (interrupt_at, Emit({"type": "user-interrupted", "turnId": str(turn)})),
            (interrupt_at, _speech("started", "user", turn)),
            (interrupt_at, _speech("stopped", "assistant", turn)),
            (interrupt_at, _transcript("user", "partial", "(caller speech)")),
            (back, _speech("stopped", "user", turn)),
            (back, _transcript("user", "final", "(caller speech)")),
            (back, UtteranceOver()),
        ]
    drop_at = plan.drop_at_ns if cut else None
    if drop_at is not None:
        steps = [*_cut(steps, drop_at), (drop_at, DropSocket())]
    steps.sort(key=lambda pair: pair[0])  # stable: same-time steps keep their order
    return steps


def _cut(steps: list[tuple[int, Step]], at_ns: int) -> list[tuple[int, Step]]:
    """The steps before ``at_ns`` (the opening speech-update always stays)."""
    return [steps[0], *(pair for pair in steps[1:] if pair[0] < at_ns)]


# --- the record ------------------------------------------------------------------------


@dataclass
class CallRecord:
    """What one call received and sent, for tests and the log."""

    call_id: str
    script: str
    audio: AudioFormat
    request: dict[str, Any]
    created_at_ns: int
    first_message: str | None = None
    connections: int = 0
    """Sockets accepted for this call (more than one: the gateway rejoined)."""
    refused_connections: int = 0
    uplink_frames: int = 0
    uplink_bytes: int = 0
    uplink_audio: bytearray = field(default_factory=bytearray, repr=False)
    """The uplink audio, up to the settings' ``max_recorded_audio_bytes``."""
    downlink_frames: int = 0
    downlink_bytes: int = 0
    events_sent: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Every JSON control message received (end-call included), in order."""
    ignored_messages: list[str] = field(default_factory=list)
    """Types of messages that are not control messages (ignored)."""
    invalid_messages: int = 0
    end_call_received: bool = False
    pings: int = 0
    pings_unanswered: int = 0
    """Pings that arrived on a connection gone dark (``no-pong``): not answered."""
    drops: int = 0
    """Connections the script aborted (``drop``, ``flap``)."""
    dark_connections: int = 0
    """Connections that went dark (``no-pong``)."""
    close_codes: list[int | None] = field(default_factory=list)
    """Each closed socket's close code as the server saw it (Autobahn says 1006 when
    there was no close frame)."""
    ended_reason: str | None = None
    ended_at_ns: int | None = None

    @property
    def open(self) -> bool:
        """Whether the call has not ended yet."""
        return self.ended_reason is None

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        """The events of one type that were sent."""
        return [event for event in self.events_sent if event.get("type") == event_type]

    def message_types(self) -> list[str]:
        """The types of the control messages received, in order."""
        return [str(message.get("type")) for message in self.messages]


MessageKind = Literal["end-call", "control", "ignored", "invalid", "stale"]


@dataclass(order=True)
class _Scheduled:
    at_ns: int
    seq: int
    connection: int | None = field(compare=False)
    item: _Item = field(compare=False)


class ScriptedCall:
    """The sans-io life of one local-assistant call (see the module docstring)."""

    def __init__(self, record: CallRecord, plan: CallPlan, rng: random.Random,
                 utterance_audio: Callable[[str], bytes],
                 max_recorded_audio_bytes: int = 2 * 1024 * 1024) -> None:
        self.record = record
        self.plan = plan
        self._rng = rng
        self._utterance_audio = utterance_audio
        self._max_recorded = max_recorded_audio_bytes
        self._schedule: list[_Scheduled] = []
        self._seq = 0
        self._connections = 0
        self._current: int | None = None
        self._next_utterance = 0
        self._cut_done = False
        self._dark: set[int] = set()
        self._last_uplink_ns = record.created_at_ns
        self._at(record.created_at_ns + plan.silence_timeout_ns, None, _CheckSilence())

    # --- inputs ------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """Whether the call is over (its sockets are refused from now on)."""
        return not self.record.open

    @property
    def connection(self) -> int | None:
        """The open socket's connection number, if one is open."""
        return self._current

    def connect(self, now_ns: int) -> int | None:
        """A socket opened: its connection number, or ``None`` if the call refuses it."""
        if self.ended:
            self.record.refused_connections += 1
            return None
        old = self._current
        if old is not None:  # a second socket supersedes the first
            self._lost(old)
            self._at(now_ns, None, _Abort(old))
        self._connections += 1
        connection = self._current = self._connections
        self.record.connections += 1
        if connection == 1:
            self._at(now_ns, connection, Emit({"type": "status-update", "status": "in-progress"}))
        if self.plan.speak and self._next_utterance < len(self.plan.utterances):
            first = self._next_utterance == 0
            delay = self.plan.first_message_delay_ns if first else self.plan.utterance_gap_ns
            self._at(now_ns + delay, connection, _StartUtterance())
        plan = self.plan
        if plan.flap_every_ns is not None and _counts(connection, plan.flap_sockets):
            self._at(now_ns + plan.flap_every_ns, connection, _Flap())
        if plan.no_pong_at_ns is not None and _counts(connection, plan.no_pong_sockets):
            self._at(now_ns + plan.no_pong_at_ns, connection, _GoDark())
        return connection

    def audio_received(self, now_ns: int, connection: int, payload: bytes) -> bool:
        """A binary frame from the caller's side; ``False`` if it was stale (ignored)."""
        if connection != self._current or self.ended:
            return False
        record = self.record
        record.uplink_frames += 1
        record.uplink_bytes += len(payload)
        room = self._max_recorded - len(record.uplink_audio)
        if room > 0:
            record.uplink_audio += payload[:room]
        self._last_uplink_ns = now_ns
        if self.plan.echo:
            self._at(now_ns + self.plan.echo_delay_ns, connection, PlayAudio(payload))
        return True

    def text_received(self, now_ns: int, connection: int, payload: bytes) -> MessageKind:
        """A text frame: end-call ends the call; control messages are recorded."""
        if connection != self._current or self.ended:
            return "stale"
        try:
            message: object = msgspec.json.decode(payload)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.record.invalid_messages += 1
            return "invalid"
        kind = message["type"]
        if kind == "end-call":
            self.record.messages.append(message)
            self.record.end_call_received = True
            self.end(now_ns, "customer-ended-call")
            return "end-call"
        if kind in CONTROL_TYPES:
            self.record.messages.append(message)
            return "control"
        self.record.ignored_messages.append(kind[:64])
        return "ignored"

    def ping_received(self, connection: int) -> bool:
        """A WebSocket ping: whether to answer it (not on a connection gone dark)."""
        if connection in self._dark:
            self.record.pings_unanswered += 1
            return False
        if connection == self._current:
            self.record.pings += 1
        return True

    def disconnected(self, now_ns: int, connection: int, clean: bool, code: int | None) -> None:
        """A socket closed. A clean close the client started ends the call; a lost
        connection leaves it open for a rejoin (until the silence timeout)."""
        self.record.close_codes.append(code)
        if connection != self._current:
            return
        self._lost(connection)
        if clean and not self.ended:
            self.end(now_ns, "customer-ended-call")

    def end(self, now_ns: int, reason: str) -> None:
        """End the call: status-update ended and end-of-call-report, then close (1000)."""
        if self.ended:
            return
        self.record.ended_reason = reason
        self.record.ended_at_ns = now_ns
        self._schedule.clear()
        connection = self._current
        if connection is not None:
            duration = round((now_ns - self.record.created_at_ns) / NS_PER_SECOND, 3)
            self._at(now_ns, connection, Emit(
                {"type": "status-update", "status": "ended", "endedReason": reason}))
            self._at(now_ns, connection, Emit(
                {"type": "end-of-call-report", "endedReason": reason,
                 "durationSeconds": duration}))
            self._at(now_ns, connection, _Close())
        self._at(now_ns, None, _Ended(reason))

    # --- the schedule ------------------------------------------------------------------

    def next_due_ns(self) -> int | None:
        """When :meth:`due` has something to do next (``None``: nothing scheduled)."""
        return self._schedule[0].at_ns if self._schedule else None

    def due(self, now_ns: int) -> list[Output]:
        """Everything due by ``now_ns``, in order, as commands for the shell."""
        outputs: list[Output] = []
        while self._schedule and self._schedule[0].at_ns <= now_ns:
            entry = heapq.heappop(self._schedule)
            self._run(entry, outputs)
        return outputs

    def _at(self, at_ns: int, connection: int | None, item: _Item) -> None:
        self._seq += 1
        heapq.heappush(self._schedule, _Scheduled(at_ns, self._seq, connection, item))

    def _lost(self, connection: int) -> None:
        """Forget a connection and everything scheduled for it."""
        if self._current == connection:
            self._current = None
        kept = [entry for entry in self._schedule if entry.connection != connection]
        if len(kept) != len(self._schedule):
            heapq.heapify(kept)
            self._schedule = kept

    def _run(self, entry: _Scheduled, outputs: list[Output]) -> None:
        connection, item, now_ns = entry.connection, entry.item, entry.at_ns
        if connection is not None and connection != self._current:
            return  # defensive: a lost connection's entries are purged already
        match item:
            case PlayAudio(payload=payload):
                assert connection is not None
                self.record.downlink_frames += 1
                self.record.downlink_bytes += len(payload)
                outputs.append(SendAudio(connection, payload))
            case Emit(event=event):
                assert connection is not None
                self.record.events_sent.append(event)
                outputs.append(SendEvent(connection, event))
            case DropSocket():
                assert connection is not None
                self.record.drops += 1
                outputs.append(AbortSocket(connection))
                self._lost(connection)
                if self.plan.refuse_reconnect:
                    self.end(now_ns, "local-assistant-dropped-socket")
            case UtteranceOver():
                if self._next_utterance < len(self.plan.utterances):
                    self._at(now_ns + self.plan.utterance_gap_ns, connection, _StartUtterance())
            case _StartUtterance():
                assert connection is not None
                self._start_utterance(now_ns, connection)
            case _CheckSilence():
                quiet_since = self._last_uplink_ns
                if now_ns - quiet_since >= self.plan.silence_timeout_ns:
                    self.end(now_ns, "silence-timed-out")
                else:
                    self._at(quiet_since + self.plan.silence_timeout_ns, None, _CheckSilence())
            case _Close():
                assert connection is not None
                outputs.append(CloseSocket(connection, 1000, "call ended"))
            case _Abort(connection=old):
                outputs.append(AbortSocket(old))
            case _Flap():
                assert connection is not None
                self.record.drops += 1
                outputs.append(AbortSocket(connection))
                self._lost(connection)
            case _GoDark():
                assert connection is not None
                self.record.dark_connections += 1
                self._dark.add(connection)
                outputs.append(SocketWentDark(connection))
                self._lost(connection)  # nothing more for it; what it sends is stale
            case _Ended(reason=reason):
                outputs.append(CallEnded(reason))

    def _start_utterance(self, now_ns: int, connection: int) -> None:
        index = self._next_utterance
        self._next_utterance += 1
        cut = index == self.plan.target_utterance and not self._cut_done
        if cut:
            self._cut_done = True
        clip = self.plan.utterances[index]
        steps = plan_utterance(self._utterance_audio(clip), self.record.audio, self.plan,
                               self._rng, turn=index, clip=clip, cut=cut)
        for offset_ns, step in steps:
            self._at(now_ns + offset_ns, connection, step)


def _counts(connection: int, sockets: int | None) -> bool:
    """Whether a per-connection behaviour applies to ``connection`` (1-based)."""
    return sockets is None or connection <= sockets
