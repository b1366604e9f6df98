"""The link state machine, exhaustively: every (state, input) pair of the table,
stale socket inputs, the named races, and random input sequences against a model
of the driver (invariants: end-call at most once, no timer left, one socket)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.vapi.link import (
    TIMER_INPUTS,
    BackoffElapsed,
    CancelTimer,
    Closed,
    CloseSocket,
    CloseWaitElapsed,
    ConnectDeadlinePassed,
    ConnectFailed,
    Connecting,
    Ending,
    Failed,
    Idle,
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
    PingDue,
    PongDeadlinePassed,
    PongReceived,
    Reconnecting,
    RemoteEnded,
    SendEndCall,
    SendPing,
    SocketClosed,
    SocketOpened,
    Start,
    StartTimer,
    Stop,
    Timer,
    transition,
)

S = 1_000_000_000
NOW = 1_000
SETTINGS = LinkSettings()  # heartbeat 10 s, pong 5 s, connect 10 s, 3 attempts 1/2/4 s

STOPPED = LinkClosedReason.STOPPED
FAILED = Failed(LinkFailure("earlier problem", 3, "recreate"))

STATES: dict[str, LinkState] = {
    "idle": Idle(),
    "connecting-first": Connecting(attempt=0, socket_id=1),
    "connecting-retry": Connecting(attempt=2, socket_id=3),
    "connecting-last": Connecting(attempt=3, socket_id=4),
    "open": Open(socket_id=5, ping_seq=2, awaiting_pong=False),
    "open-awaiting-pong": Open(socket_id=5, ping_seq=3, awaiting_pong=True),
    "reconnecting": Reconnecting(attempt=2, socket_id=3),
    "ending": Ending(socket_id=5),
    "failed": FAILED,
    "closed": Closed(STOPPED),
}


def _socket_id(state: LinkState) -> int:
    return getattr(state, "socket_id", 99)


def inputs_for(state: LinkState, socket_id: int | None = None) -> dict[str, LinkInput]:
    """Every input kind, with socket inputs about ``socket_id`` (default: the state's)."""
    sid = _socket_id(state) if socket_id is None else socket_id
    seq = state.ping_seq if isinstance(state, Open) else 1
    return {
        "start": Start(),
        "stop": Stop(),
        "socket-opened": SocketOpened(sid),
        "closed-clean-1000": SocketClosed(sid, clean=True, code=1000),
        "closed-clean-1001": SocketClosed(sid, clean=True, code=1001),
        "closed-unclean-1006": SocketClosed(sid, clean=False, code=1006),
        "connect-failed": ConnectFailed(sid, "boom"),
        "pong-matching": PongReceived(sid, seq),
        "pong-other": PongReceived(sid, seq + 7),
        "remote-ended": RemoteEnded(sid),
        "ping-due": PingDue(),
        "pong-deadline": PongDeadlinePassed(),
        "backoff-elapsed": BackoffElapsed(),
        "connect-deadline": ConnectDeadlinePassed(),
        "close-wait-elapsed": CloseWaitElapsed(),
    }


INPUT_NAMES = list(inputs_for(Idle()))


Expected = tuple[LinkState, tuple[LinkCommand, ...]]


def moved(old: LinkState, new: LinkState, *effects: LinkCommand) -> Expected:
    """Expected result of a transition that changes the state's kind."""
    notices: list[LinkCommand] = [NotifyTransition(old, new)]
    if isinstance(new, Open):
        notices.append(NotifyOpen())
    if isinstance(new, Failed):
        notices.append(NotifyFailed(new.failure))
    if isinstance(new, Closed):
        notices.append(NotifyClosed(new.reason))
    return new, (*effects, *notices)


def stayed(new: LinkState, *effects: LinkCommand) -> Expected:
    return new, effects


def _acting_table() -> dict[tuple[str, str], Expected]:
    idle = STATES["idle"]
    c0, c2, c3 = Connecting(0, 1), Connecting(2, 3), Connecting(3, 4)
    assert [c0, c2, c3] == [STATES[f"connecting-{n}"] for n in ("first", "retry", "last")]
    op, opa = STATES["open"], STATES["open-awaiting-pong"]
    rc, en = STATES["reconnecting"], STATES["ending"]
    table: dict[tuple[str, str], Expected] = {
        ("idle", "start"): moved(idle, Connecting(0, 1),
                                 OpenSocket(1), StartTimer(Timer.CONNECT, NOW + 10 * S)),
        ("idle", "stop"): moved(idle, Closed(STOPPED)),
        ("reconnecting", "backoff-elapsed"): moved(
            rc, Connecting(2, 4), OpenSocket(4), StartTimer(Timer.CONNECT, NOW + 10 * S)),
        ("reconnecting", "stop"): moved(rc, Closed(STOPPED), CancelTimer(Timer.BACKOFF)),
        ("failed", "stop"): moved(FAILED, Closed(STOPPED)),
    }
    # connecting: opened / failed / closed / too slow / stopped
    for name, state, next_backoff in (("connecting-first", c0, 1 * S),
                                      ("connecting-retry", c2, 4 * S),
                                      ("connecting-last", c3, None)):
        sid, attempt = state.socket_id, state.attempt
        table[(name, "socket-opened")] = moved(
            state, Open(sid), CancelTimer(Timer.CONNECT),
            StartTimer(Timer.HEARTBEAT, NOW + 10 * S))
        table[(name, "stop")] = moved(
            state, Closed(STOPPED), CancelTimer(Timer.CONNECT), CloseSocket(sid, abort=True))
        failures = {
            "connect-failed": "connect failed: boom",
            "closed-clean-1000": "socket closed while connecting (code 1000)",
            "closed-clean-1001": "socket closed while connecting (code 1001)",
            "closed-unclean-1006": "socket closed while connecting (code 1006)",
        }
        for input_name, reason in failures.items():
            if next_backoff is None:
                table[(name, input_name)] = moved(
                    state, Failed(LinkFailure(reason, 3, "recreate")), CancelTimer(Timer.CONNECT))
            else:
                table[(name, input_name)] = moved(
                    state, Reconnecting(attempt + 1, sid), CancelTimer(Timer.CONNECT),
                    StartTimer(Timer.BACKOFF, NOW + next_backoff))
        if next_backoff is None:
            table[(name, "connect-deadline")] = moved(
                state, Failed(LinkFailure("connect timed out", 3, "recreate")),
                CloseSocket(sid, abort=True))
        else:
            table[(name, "connect-deadline")] = moved(
                state, Reconnecting(attempt + 1, sid), CloseSocket(sid, abort=True),
                StartTimer(Timer.BACKOFF, NOW + next_backoff))
    # open, with the heartbeat timer running or a pong awaited
    for name, open_state, running in (("open", op, Timer.HEARTBEAT),
                                 ("open-awaiting-pong", opa, Timer.PONG)):
        table[(name, "closed-clean-1000")] = moved(
            open_state, Closed(LinkClosedReason.REMOTE_CLOSED), CancelTimer(running))
        for input_name in ("closed-clean-1001", "closed-unclean-1006"):
            table[(name, input_name)] = moved(
                open_state, Reconnecting(1, 5), CancelTimer(running),
                StartTimer(Timer.BACKOFF, NOW + 1 * S))
        table[(name, "remote-ended")] = moved(
            open_state, Ending(5), CancelTimer(running), StartTimer(Timer.CLOSE_WAIT, NOW + 5 * S))
        table[(name, "stop")] = moved(
            open_state, Closed(STOPPED), SendEndCall(5), CloseSocket(5, abort=False),
            CancelTimer(running))
    table[("open", "ping-due")] = stayed(
        Open(5, 3, awaiting_pong=True), SendPing(5, 3), StartTimer(Timer.PONG, NOW + 5 * S))
    table[("open-awaiting-pong", "pong-matching")] = stayed(
        Open(5, 3, awaiting_pong=False), CancelTimer(Timer.PONG),
        StartTimer(Timer.HEARTBEAT, NOW + 10 * S))
    table[("open-awaiting-pong", "pong-deadline")] = moved(
        opa, Reconnecting(1, 5), CloseSocket(5, abort=True), StartTimer(Timer.BACKOFF, NOW + S))
    # ending: Vapi said the call ended; any close is final
    for input_name in ("closed-clean-1000", "closed-clean-1001", "closed-unclean-1006"):
        table[("ending", input_name)] = moved(
            en, Closed(LinkClosedReason.REMOTE_ENDED), CancelTimer(Timer.CLOSE_WAIT))
    table[("ending", "close-wait-elapsed")] = moved(
        en, Closed(LinkClosedReason.REMOTE_ENDED), CloseSocket(5, abort=False))
    table[("ending", "stop")] = moved(
        en, Closed(STOPPED), CancelTimer(Timer.CLOSE_WAIT), CloseSocket(5, abort=False))
    return table


ACTING = _acting_table()
ALL_PAIRS = list(itertools.product(STATES, INPUT_NAMES))


def test_the_table_names_only_real_pairs() -> None:
    assert set(ACTING) <= set(ALL_PAIRS)
    assert len(ALL_PAIRS) == len(STATES) * len(INPUT_NAMES) == 150


@pytest.mark.parametrize(("state_name", "input_name"), ALL_PAIRS)
def test_every_state_and_input(state_name: str, input_name: str) -> None:
    state = STATES[state_name]
    event = inputs_for(state)[input_name]
    expected = ACTING.get((state_name, input_name), (state, ()))  # else: ignored
    assert transition(SETTINGS, state, event, NOW) == expected


SOCKET_INPUTS = ["socket-opened", "closed-clean-1000", "closed-clean-1001",
                 "closed-unclean-1006", "connect-failed", "pong-matching", "pong-other",
                 "remote-ended"]


@pytest.mark.parametrize(("state_name", "input_name"),
                         list(itertools.product(STATES, SOCKET_INPUTS)))
def test_inputs_about_another_socket_are_ignored(state_name: str, input_name: str) -> None:
    state = STATES[state_name]
    event = inputs_for(state, socket_id=_socket_id(state) + 100)[input_name]
    assert transition(SETTINGS, state, event, NOW) == (state, ())


def test_heartbeat_off_starts_and_cancels_no_heartbeat_timer() -> None:
    quiet = LinkSettings(heartbeat_interval_ns=0)
    state, commands = transition(quiet, Connecting(0, 1), SocketOpened(1), NOW)
    assert state == Open(1)
    assert [c for c in commands if isinstance(c, (StartTimer, CancelTimer))] == [
        CancelTimer(Timer.CONNECT)]
    state, commands = transition(quiet, Open(1), Stop(), NOW)
    assert commands[:2] == (SendEndCall(1), CloseSocket(1, abort=False))
    assert not [c for c in commands if isinstance(c, CancelTimer)]


def test_no_reconnect_attempts_means_the_first_loss_fails() -> None:
    strict = LinkSettings(reconnect_attempts=0, on_vapi_loss="hangup")
    state, commands = transition(strict, Open(1), SocketClosed(1, False, 1006), NOW)
    assert state == Failed(LinkFailure("socket closed uncleanly (code 1006)", 0, "hangup"))
    assert NotifyFailed(state.failure) in commands


def test_the_close_reason_goes_into_the_failure() -> None:
    strict = LinkSettings(reconnect_attempts=0)
    state, _ = transition(strict, Connecting(0, 1),
                          SocketClosed(1, False, 1006, "SSL error: certificate verify failed"),
                          NOW)
    assert state == Failed(LinkFailure(
        "socket closed while connecting (code 1006): SSL error: certificate verify failed",
        0, "recreate"))


def test_backoff_grows_then_the_link_gives_up() -> None:
    machine = LinkMachine(SETTINGS)
    machine.handle(Start(), 0)
    delays = []
    now = 0
    for sid in (1, 2, 3, 4):
        commands = machine.handle(ConnectFailed(sid, "refused"), now)
        backoff = [c for c in commands if isinstance(c, StartTimer)]
        if not backoff:
            break
        delays.append(backoff[0].deadline_ns - now)
        now = backoff[0].deadline_ns
        assert machine.handle(BackoffElapsed(), now)[0] == OpenSocket(sid + 1)
    assert delays == [1 * S, 2 * S, 4 * S]
    assert machine.state == Failed(LinkFailure("connect failed: refused", 3, "recreate"))


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="pong_timeout_ns"):
        LinkSettings(pong_timeout_ns=0)
    with pytest.raises(ValueError, match="reconnect_attempts"):
        LinkSettings(reconnect_attempts=21)
    capped = LinkSettings(reconnect_attempts=20)
    assert [capped.reconnect_delay_ns(n) // S for n in (1, 5, 6, 20)] == [1, 16, 30, 30]
    with pytest.raises(ValueError, match="on_vapi_loss"):
        LinkSettings(on_vapi_loss="shrug")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="factor"):
        LinkSettings(reconnect_backoff_factor=0)
    assert LinkSettings(reconnect_backoff_factor=3).reconnect_delay_ns(3) == 9 * S


# --- the races the brief names ---------------------------------------------


def run(machine: LinkMachine, *events: LinkInput, now: int = NOW) -> list[LinkCommand]:
    commands: list[LinkCommand] = []
    for event in events:
        commands.extend(machine.handle(event, now))
    return commands


def test_close_during_connect_backs_off_and_the_late_open_is_ignored() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketClosed(1, clean=False, code=1006))
    assert machine.state == Reconnecting(1, 1)
    assert run(machine, SocketOpened(1)) == []  # the dead socket cannot come back
    assert run(machine, BackoffElapsed())[0] == OpenSocket(2)


def test_stop_during_backoff_cancels_it_and_sends_nothing() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketOpened(1), SocketClosed(1, False, 1006))
    commands = run(machine, Stop())
    assert commands[0] == CancelTimer(Timer.BACKOFF)
    assert not [c for c in commands if isinstance(c, (SendEndCall, CloseSocket, OpenSocket))]
    assert run(machine, BackoffElapsed()) == []  # a timer that raced the stop
    assert machine.state == Closed(STOPPED)


def test_a_pong_after_its_deadline_fired_is_ignored() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketOpened(1), PingDue())
    run(machine, PongDeadlinePassed())
    assert machine.state == Reconnecting(1, 1)
    assert run(machine, PongReceived(1, 1)) == []
    assert machine.state == Reconnecting(1, 1)


def test_the_session_ending_while_a_reconnect_connects() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketOpened(1), SocketClosed(1, False, 1006), BackoffElapsed())
    commands = run(machine, Stop())
    assert commands[:2] == [CancelTimer(Timer.CONNECT), CloseSocket(2, abort=True)]
    assert SendEndCall(2) not in commands  # the socket never opened
    assert run(machine, SocketOpened(2), ConnectFailed(2, "cancelled")) == []


def test_end_call_is_sent_exactly_once() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketOpened(1))
    commands = run(machine, Stop(), Stop(), Stop(), SocketClosed(1, True, 1000))
    assert commands.count(SendEndCall(1)) == 1


def test_no_end_call_after_vapi_ended_the_call() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketOpened(1), RemoteEnded(1))
    commands = run(machine, Stop())
    assert not [c for c in commands if isinstance(c, SendEndCall)]


def test_a_dead_link_after_vapi_ended_the_call_is_not_reconnected() -> None:
    machine = LinkMachine(SETTINGS)
    run(machine, Start(), SocketOpened(1), RemoteEnded(1))
    commands = run(machine, SocketClosed(1, clean=False, code=1006))
    assert machine.state == Closed(LinkClosedReason.REMOTE_ENDED)
    assert not [c for c in commands if isinstance(c, (OpenSocket, StartTimer))]


# --- random sequences against a model of the driver --------------------------


@dataclass
class DriverModel:
    """What a correct driver would have running after executing the commands."""

    timers: set[Timer] = field(default_factory=set)
    live_sockets: set[int] = field(default_factory=set)
    end_calls: int = 0
    closed_notices: int = 0
    failed_notices: int = 0

    def execute(self, commands: tuple[LinkCommand, ...]) -> None:
        for command in commands:
            match command:
                case StartTimer(timer=timer):
                    self.timers.add(timer)
                case CancelTimer(timer=timer):
                    assert timer in self.timers, f"cancelled {timer} that was not running"
                    self.timers.discard(timer)
                case OpenSocket(socket_id=sid):
                    assert not self.live_sockets, "a second socket while one is live"
                    self.live_sockets.add(sid)
                case CloseSocket(socket_id=sid):
                    self.live_sockets.discard(sid)
                case SendEndCall():
                    self.end_calls += 1
                case NotifyClosed():
                    self.closed_notices += 1
                case NotifyFailed():
                    self.failed_notices += 1


# Abstract actions; the test turns them into inputs the way a driver would:
# timers fire only if running; socket events are about the live socket or a
# stale one.
ACTIONS = st.sampled_from([
    "start", "stop", "opened", "closed-1000", "closed-1006", "connect-failed", "pong",
    "stale-pong", "remote-ended", "fire-timer", "stale-opened",
])


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.lists(st.tuples(ACTIONS, st.integers(0, 4)), max_size=40),
       st.sampled_from([LinkSettings(), LinkSettings(heartbeat_interval_ns=0),
                        LinkSettings(reconnect_attempts=0)]))
def test_random_sequences_keep_the_invariants(
    actions: list[tuple[str, int]], link_settings: LinkSettings
) -> None:
    machine = LinkMachine(link_settings)
    model = DriverModel()
    now = 0
    for action, pick in actions:
        now += 1_000_000
        state = machine.state
        sid = getattr(state, "socket_id", 0)
        event: LinkInput | None
        match action:
            case "start":
                event = Start()
            case "stop":
                event = Stop()
            case "opened":
                event = SocketOpened(sid)
            case "closed-1000":
                event = SocketClosed(sid, True, 1000)
            case "closed-1006":
                event = SocketClosed(sid, False, 1006)
            case "connect-failed":
                event = ConnectFailed(sid, "x")
            case "pong":
                event = PongReceived(sid, getattr(state, "ping_seq", 0))
            case "stale-pong":
                event = PongReceived(sid + 1, getattr(state, "ping_seq", 0))
            case "remote-ended":
                event = RemoteEnded(sid)
            case "stale-opened":
                event = SocketOpened(sid - 1)
            case _:
                running = sorted(model.timers, key=lambda t: t.value)
                event = TIMER_INPUTS[running[pick % len(running)]] if running else None
                if event is not None:
                    model.timers.discard(running[pick % len(running)])
        if event is None:
            continue
        if isinstance(event, (SocketClosed, ConnectFailed)):
            model.live_sockets.discard(event.socket_id)  # the driver forgets a dead socket
        model.execute(machine.handle(event, now))
        assert model.end_calls <= 1
        assert model.closed_notices <= 1
        assert model.failed_notices <= 1
        if isinstance(machine.state, (Closed, Failed)):
            assert model.timers == set(), machine.state
        if isinstance(machine.state, Open):
            expected = {Timer.PONG} if machine.state.awaiting_pong else (
                {Timer.HEARTBEAT} if link_settings.heartbeat_interval_ns else set())
            assert model.timers == expected
        if isinstance(machine.state, Reconnecting):
            assert model.timers == {Timer.BACKOFF}


def test_the_exhaustive_table_covers_every_state_kind() -> None:
    kinds = {type(state) for state in STATES.values()}
    assert kinds == {Idle, Connecting, Open, Reconnecting, Ending, Failed, Closed}
    assert replace(Open(5, 2), awaiting_pong=True) == Open(5, 2, awaiting_pong=True)
