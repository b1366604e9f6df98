"""The Vapi link state machine: the life of one call socket, sans-io.

One :class:`LinkMachine` owns the socket of one Vapi call. It is driven by
inputs (:data:`LinkInput`: the owner's start/stop, socket events, timer
expiries) each with the current time in integer nanoseconds, and answers with
commands (:data:`LinkCommand`) for the driver to execute: open or close a
socket, send a ping or end-call, start or cancel a named timer with an absolute
deadline, and notify the owner. It never does I/O and never reads a clock.

States (:data:`LinkState`)::

    idle -> connecting(0) -> open -> ending (Vapi said the call ended) -> closed
                 |   ^         |
                 v   |         v (unexpected close, missing pong)
            reconnecting(n) <--+ ... after the last attempt -> failed

- Heartbeat: a ping every ``heartbeat_interval_ns`` after the last pong, and a
  pong expected within ``pong_timeout_ns``. A silent assistant is normal; a
  missing pong is a dead link. (Autobahn's auto-ping is not used: its txaio
  timers are rounded to whole seconds.)
- An unexpected close, a missing pong, a failed or too slow connect: reconnect
  to the same call URL after ``reconnect_initial_delay_ns * factor**(n-1)``
  (capped) for attempt ``n`` (1, 2, 4 s by default), at most ``reconnect_attempts``
  times in a row, then ``failed`` -- the owner is told, with the configured
  ``on_vapi_loss`` ("recreate" or "hangup"), and decides.
- A clean close with code 1000, or any close after Vapi said the call ended,
  is final: ``closed``.
- ``stop`` from any state: end-call exactly once if the socket is open and Vapi
  has not ended the call, close the socket, cancel every running timer,
  ``closed``.

Socket inputs carry the id of the socket they are about; an input about any
socket but the current one is stale and ignored, as is every input a state has
no use for (a pong after its deadline fired, a timer racing a stop, ...).
:func:`transition` is total: it never raises for a (state, input) pair.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "TIMER_INPUTS",
    "BackoffElapsed",
    "CancelTimer",
    "CloseSocket",
    "CloseWaitElapsed",
    "Closed",
    "ConnectDeadlinePassed",
    "ConnectFailed",
    "Connecting",
    "Ending",
    "Failed",
    "Idle",
    "LinkClosedReason",
    "LinkCommand",
    "LinkFailure",
    "LinkInput",
    "LinkMachine",
    "LinkSettings",
    "LinkState",
    "NotifyClosed",
    "NotifyFailed",
    "NotifyOpen",
    "NotifyTransition",
    "OnVapiLoss",
    "Open",
    "OpenSocket",
    "PingDue",
    "PongDeadlinePassed",
    "PongReceived",
    "Reconnecting",
    "RemoteEnded",
    "SendEndCall",
    "SendPing",
    "SocketClosed",
    "SocketOpened",
    "Start",
    "StartTimer",
    "Stop",
    "Timer",
    "transition",
]

NS_PER_SECOND: Final = 1_000_000_000
NORMAL_CLOSURE: Final = 1000

OnVapiLoss = Literal["recreate", "hangup"]


@dataclass(frozen=True)
class LinkSettings:
    """Timing and policy of one link (durations in integer nanoseconds)."""

    heartbeat_interval_ns: int = 10 * NS_PER_SECOND
    """Ping this long after the last pong; 0 turns the heartbeat off."""
    pong_timeout_ns: int = 5 * NS_PER_SECOND
    connect_timeout_ns: int = 10 * NS_PER_SECOND
    """TCP + TLS + websocket handshake."""
    reconnect_attempts: int = 3
    reconnect_initial_delay_ns: int = 1 * NS_PER_SECOND
    reconnect_backoff_factor: int = 2
    reconnect_max_delay_ns: int = 30 * NS_PER_SECOND
    """The doubling stops here (it matters only beyond five attempts)."""
    close_wait_ns: int = 5 * NS_PER_SECOND
    """After Vapi says the call ended, how long to wait for it to close the socket."""
    on_vapi_loss: OnVapiLoss = "recreate"

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ns < 0:
            raise ValueError("heartbeat_interval_ns must not be negative")
        for name in ("pong_timeout_ns", "connect_timeout_ns", "reconnect_initial_delay_ns",
                     "reconnect_max_delay_ns", "close_wait_ns"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.reconnect_attempts <= 20:
            raise ValueError("reconnect_attempts must be between 0 and 20")
        if self.reconnect_backoff_factor < 1:
            raise ValueError("reconnect_backoff_factor must be at least 1")
        if self.on_vapi_loss not in ("recreate", "hangup"):
            raise ValueError("on_vapi_loss must be 'recreate' or 'hangup'")

    def reconnect_delay_ns(self, attempt: int) -> int:
        """The wait before reconnect attempt ``attempt`` (1-based)."""
        delay = self.reconnect_initial_delay_ns * self.reconnect_backoff_factor ** (attempt - 1)
        return min(int(delay), self.reconnect_max_delay_ns)


class Timer(enum.Enum):
    """The machine's named timers; at most one of each runs at a time."""

    CONNECT = "connect"
    HEARTBEAT = "heartbeat"
    PONG = "pong"
    BACKOFF = "backoff"
    CLOSE_WAIT = "close-wait"


class LinkClosedReason(enum.Enum):
    """Why the link ended."""

    STOPPED = "stopped"
    """The owner stopped it."""
    REMOTE_ENDED = "remote-ended"
    """Vapi said the call ended (status-update ended / end-of-call-report)."""
    REMOTE_CLOSED = "remote-closed"
    """Vapi closed the socket cleanly with code 1000."""


@dataclass(frozen=True)
class LinkFailure:
    """The link gave up: the last problem, reconnect attempts made, and the policy."""

    reason: str
    attempts: int
    on_vapi_loss: OnVapiLoss


# --- states ------------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    """Not started."""


@dataclass(frozen=True)
class Connecting:
    """Socket ``socket_id`` is being opened; ``attempt`` 0 is the first connect."""

    attempt: int
    socket_id: int


@dataclass(frozen=True)
class Open:
    """Socket ``socket_id`` is open; ``awaiting_pong`` for ping ``ping_seq``."""

    socket_id: int
    ping_seq: int = 0
    awaiting_pong: bool = False


@dataclass(frozen=True)
class Reconnecting:
    """Waiting out the backoff before reconnect ``attempt``; ``socket_id`` was the last socket."""

    attempt: int
    socket_id: int


@dataclass(frozen=True)
class Ending:
    """Vapi said the call ended; waiting for it to close socket ``socket_id``."""

    socket_id: int


@dataclass(frozen=True)
class Failed:
    """Gave up reconnecting; the owner decides what happens to the call."""

    failure: LinkFailure


@dataclass(frozen=True)
class Closed:
    """Over; every later input is ignored."""

    reason: LinkClosedReason


LinkState = Idle | Connecting | Open | Reconnecting | Ending | Failed | Closed


# --- inputs ------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The owner starts the link."""


@dataclass(frozen=True)
class Stop:
    """The owner's session is ending."""


@dataclass(frozen=True)
class SocketOpened:
    """The websocket handshake of ``socket_id`` completed."""

    socket_id: int


@dataclass(frozen=True)
class SocketClosed:
    """Socket ``socket_id`` closed (before or after opening); ``reason`` is for the log."""

    socket_id: int
    clean: bool
    code: int | None
    reason: str = ""


@dataclass(frozen=True)
class ConnectFailed:
    """Socket ``socket_id`` could not be connected (TCP, TLS, handshake refused)."""

    socket_id: int
    reason: str


@dataclass(frozen=True)
class PongReceived:
    """A pong for ping ``seq`` arrived on socket ``socket_id``."""

    socket_id: int
    seq: int


@dataclass(frozen=True)
class RemoteEnded:
    """Vapi said, on socket ``socket_id``, that the call ended."""

    socket_id: int


@dataclass(frozen=True)
class PingDue:
    """Timer HEARTBEAT fired."""


@dataclass(frozen=True)
class PongDeadlinePassed:
    """Timer PONG fired."""


@dataclass(frozen=True)
class BackoffElapsed:
    """Timer BACKOFF fired."""


@dataclass(frozen=True)
class ConnectDeadlinePassed:
    """Timer CONNECT fired."""


@dataclass(frozen=True)
class CloseWaitElapsed:
    """Timer CLOSE_WAIT fired."""


LinkInput = (
    Start
    | Stop
    | SocketOpened
    | SocketClosed
    | ConnectFailed
    | PongReceived
    | RemoteEnded
    | PingDue
    | PongDeadlinePassed
    | BackoffElapsed
    | ConnectDeadlinePassed
    | CloseWaitElapsed
)

TIMER_INPUTS: Final[dict[Timer, LinkInput]] = {
    Timer.CONNECT: ConnectDeadlinePassed(),
    Timer.HEARTBEAT: PingDue(),
    Timer.PONG: PongDeadlinePassed(),
    Timer.BACKOFF: BackoffElapsed(),
    Timer.CLOSE_WAIT: CloseWaitElapsed(),
}
"""The input the driver feeds when a timer fires."""


# --- commands ----------------------------------------------------------------


@dataclass(frozen=True)
class OpenSocket:
    """Connect a new socket, known from now on as ``socket_id``, to the call URL."""

    socket_id: int


@dataclass(frozen=True)
class CloseSocket:
    """Close ``socket_id``: ``abort`` drops the connection, else a close handshake (1000)."""

    socket_id: int
    abort: bool


@dataclass(frozen=True)
class SendPing:
    """Send a websocket ping carrying ``seq`` on ``socket_id``."""

    socket_id: int
    seq: int


@dataclass(frozen=True)
class SendEndCall:
    """Send Vapi's end-call message on ``socket_id``."""

    socket_id: int


@dataclass(frozen=True)
class StartTimer:
    """(Re)start ``timer`` to fire at ``deadline_ns`` (replacing it if running)."""

    timer: Timer
    deadline_ns: int


@dataclass(frozen=True)
class CancelTimer:
    """Cancel ``timer``."""

    timer: Timer


@dataclass(frozen=True)
class NotifyTransition:
    """Tell the owner the state changed kind."""

    old: LinkState
    new: LinkState


@dataclass(frozen=True)
class NotifyOpen:
    """Tell the owner the socket is open (audio may flow)."""


@dataclass(frozen=True)
class NotifyFailed:
    """Tell the owner the link gave up."""

    failure: LinkFailure


@dataclass(frozen=True)
class NotifyClosed:
    """Tell the owner the link is over."""

    reason: LinkClosedReason


LinkCommand = (
    OpenSocket
    | CloseSocket
    | SendPing
    | SendEndCall
    | StartTimer
    | CancelTimer
    | NotifyTransition
    | NotifyOpen
    | NotifyFailed
    | NotifyClosed
)

Step = tuple[LinkState, list[LinkCommand]]


# --- the transition table ----------------------------------------------------


def transition(
    settings: LinkSettings, state: LinkState, event: LinkInput, now_ns: int
) -> tuple[LinkState, tuple[LinkCommand, ...]]:
    """The next state and the commands to execute, in order.

    Effects (socket, timers) come first, then -- when the state changed kind --
    :class:`NotifyTransition` followed by :class:`NotifyOpen`,
    :class:`NotifyFailed` or :class:`NotifyClosed` for the new state.
    """
    if _is_stale(state, event):
        return state, ()
    match state:
        case Idle():
            new, commands = _from_idle(settings, event, now_ns)
        case Connecting():
            new, commands = _from_connecting(settings, state, event, now_ns)
        case Open():
            new, commands = _from_open(settings, state, event, now_ns)
        case Reconnecting():
            new, commands = _from_reconnecting(settings, state, event, now_ns)
        case Ending():
            new, commands = _from_ending(state, event)
        case Failed():
            new, commands = _from_failed(state, event)
        case Closed():
            new, commands = state, []
    if type(new) is not type(state):
        commands.append(NotifyTransition(state, new))
        match new:
            case Open():
                commands.append(NotifyOpen())
            case Failed(failure=failure):
                commands.append(NotifyFailed(failure))
            case Closed(reason=reason):
                commands.append(NotifyClosed(reason))
    return new, tuple(commands)


_SOCKET_INPUTS: Final = (SocketOpened, SocketClosed, ConnectFailed, PongReceived, RemoteEnded)


def _is_stale(state: LinkState, event: LinkInput) -> bool:
    """A socket input about a socket other than the one the state is using."""
    if not isinstance(event, _SOCKET_INPUTS):
        return False
    if isinstance(state, (Connecting, Open, Ending)):
        return event.socket_id != state.socket_id
    return False


def _ignore(state: LinkState) -> Step:
    return state, []


def _connect(settings: LinkSettings, attempt: int, socket_id: int, now_ns: int) -> Step:
    return Connecting(attempt, socket_id), [
        OpenSocket(socket_id),
        StartTimer(Timer.CONNECT, now_ns + settings.connect_timeout_ns),
    ]


def _lost(
    settings: LinkSettings, socket_id: int, attempts_made: int, reason: str, now_ns: int
) -> Step:
    """The socket is gone: back off before the next attempt, or give up."""
    attempt = attempts_made + 1
    if attempt > settings.reconnect_attempts:
        return Failed(LinkFailure(reason, attempts_made, settings.on_vapi_loss)), []
    return Reconnecting(attempt, socket_id), [
        StartTimer(Timer.BACKOFF, now_ns + settings.reconnect_delay_ns(attempt)),
    ]


def _with_why(what: str, why: str) -> str:
    return f"{what}: {why}" if why else what


def _heartbeat(settings: LinkSettings, now_ns: int) -> list[LinkCommand]:
    if settings.heartbeat_interval_ns == 0:
        return []
    return [StartTimer(Timer.HEARTBEAT, now_ns + settings.heartbeat_interval_ns)]


def _open_timers(settings: LinkSettings, state: Open) -> list[LinkCommand]:
    """Cancel whichever heartbeat timer an open state has running."""
    if state.awaiting_pong:
        return [CancelTimer(Timer.PONG)]
    if settings.heartbeat_interval_ns == 0:
        return []
    return [CancelTimer(Timer.HEARTBEAT)]


def _from_idle(settings: LinkSettings, event: LinkInput, now_ns: int) -> Step:
    match event:
        case Start():
            return _connect(settings, 0, 1, now_ns)
        case Stop():
            return Closed(LinkClosedReason.STOPPED), []
    return _ignore(Idle())


def _from_connecting(
    settings: LinkSettings, state: Connecting, event: LinkInput, now_ns: int
) -> Step:
    sid = state.socket_id
    match event:
        case SocketOpened():
            return Open(sid), [CancelTimer(Timer.CONNECT), *_heartbeat(settings, now_ns)]
        case ConnectFailed(reason=reason):
            new, commands = _lost(settings, sid, state.attempt, f"connect failed: {reason}", now_ns)
            return new, [CancelTimer(Timer.CONNECT), *commands]
        case SocketClosed(code=code, reason=why):
            reason = _with_why(f"socket closed while connecting (code {code})", why)
            new, commands = _lost(settings, sid, state.attempt, reason, now_ns)
            return new, [CancelTimer(Timer.CONNECT), *commands]
        case ConnectDeadlinePassed():
            new, commands = _lost(settings, sid, state.attempt, "connect timed out", now_ns)
            return new, [CloseSocket(sid, abort=True), *commands]
        case Stop():
            return Closed(LinkClosedReason.STOPPED), [
                CancelTimer(Timer.CONNECT),
                CloseSocket(sid, abort=True),
            ]
    return _ignore(state)


def _from_open(
    settings: LinkSettings, state: Open, event: LinkInput, now_ns: int
) -> Step:
    sid = state.socket_id
    match event:
        case PingDue() if not state.awaiting_pong:
            seq = state.ping_seq + 1
            return Open(sid, seq, awaiting_pong=True), [
                SendPing(sid, seq),
                StartTimer(Timer.PONG, now_ns + settings.pong_timeout_ns),
            ]
        case PongReceived(seq=seq) if state.awaiting_pong and seq == state.ping_seq:
            return Open(sid, seq, awaiting_pong=False), [
                CancelTimer(Timer.PONG),
                *_heartbeat(settings, now_ns),
            ]
        case PongDeadlinePassed() if state.awaiting_pong:
            new, commands = _lost(settings, sid, 0, "no pong within the timeout", now_ns)
            return new, [CloseSocket(sid, abort=True), *commands]
        case SocketClosed(clean=True, code=code) if code == NORMAL_CLOSURE:
            return Closed(LinkClosedReason.REMOTE_CLOSED), _open_timers(settings, state)
        case SocketClosed(clean=clean, code=code, reason=why):
            how = "cleanly" if clean else "uncleanly"
            reason = _with_why(f"socket closed {how} (code {code})", why)
            new, commands = _lost(settings, sid, 0, reason, now_ns)
            return new, [*_open_timers(settings, state), *commands]
        case RemoteEnded():
            return Ending(sid), [
                *_open_timers(settings, state),
                StartTimer(Timer.CLOSE_WAIT, now_ns + settings.close_wait_ns),
            ]
        case Stop():
            return Closed(LinkClosedReason.STOPPED), [
                SendEndCall(sid),
                CloseSocket(sid, abort=False),
                *_open_timers(settings, state),
            ]
    return _ignore(state)


def _from_reconnecting(
    settings: LinkSettings, state: Reconnecting, event: LinkInput, now_ns: int
) -> Step:
    match event:
        case BackoffElapsed():
            return _connect(settings, state.attempt, state.socket_id + 1, now_ns)
        case Stop():
            return Closed(LinkClosedReason.STOPPED), [CancelTimer(Timer.BACKOFF)]
    return _ignore(state)


def _from_ending(state: Ending, event: LinkInput) -> Step:
    match event:
        case SocketClosed():
            return Closed(LinkClosedReason.REMOTE_ENDED), [CancelTimer(Timer.CLOSE_WAIT)]
        case CloseWaitElapsed():
            return Closed(LinkClosedReason.REMOTE_ENDED), [
                CloseSocket(state.socket_id, abort=False)
            ]
        case Stop():
            return Closed(LinkClosedReason.STOPPED), [
                CancelTimer(Timer.CLOSE_WAIT),
                CloseSocket(state.socket_id, abort=False),
            ]
    return _ignore(state)


def _from_failed(state: Failed, event: LinkInput) -> Step:
    if isinstance(event, Stop):
        return Closed(LinkClosedReason.STOPPED), []
    return _ignore(state)


class LinkMachine:
    """Holds the state of one link; :meth:`handle` runs :func:`transition`."""

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings
        self._state: LinkState = Idle()

    @property
    def state(self) -> LinkState:
        """The current state."""
        return self._state

    def handle(self, event: LinkInput, now_ns: int) -> tuple[LinkCommand, ...]:
        """Feed one input; returns the commands to execute, in order."""
        self._state, commands = transition(self.settings, self._state, event, now_ns)
        return commands
