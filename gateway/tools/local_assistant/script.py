"""Scripts: what the local assistant does on a call, written as ``speak+interrupt``.

A script is behaviours joined by ``+``; each may take arguments after ``:``
(omitted arguments take the :class:`~gateway.tools.local_assistant.settings.LocalAssistantSettings`
defaults; times are milliseconds)::

    echo[:DELAY]                 return the caller's audio DELAY ms later
    speak[:CLIP[,CLIP...]]       say the clips (default: agent) in turn, the first one
                                 as the first message, in bursts faster than real time
    interrupt[:AT]               AT ms into the utterance, the caller barges in: the
                                 utterance stops (no more of its audio), user-interrupted
                                 and speech-update (user, started) are sent
    stall[:AT[:FOR]]             AT ms into the utterance, the audio pauses FOR ms
                                 (a ``hang`` event is sent if the pause is long)
    drop[:AT]                    AT ms into the utterance, the socket is aborted (TCP
                                 abort, no close frame); the call may be rejoined ...
    refuse-reconnect             ... unless this is given: then the call is over
    flap[:EVERY][*N]             every socket is aborted (no close frame) EVERY ms after
                                 it opens, so a rejoined call keeps dropping; ``*N``:
                                 only the first N sockets of the call flap
    no-pong[:AT][*N]             AT ms after a socket opens, the assistant goes dark on
                                 it without closing it: WebSocket pings are no longer
                                 answered, nothing more is sent and what arrives is
                                 ignored (a stalled peer, as only a heartbeat can tell);
                                 ``*N``: only the first N sockets (default: every one)
    fail-create[:MODE][*N]       POST /call fails: MODE is an HTTP status 500..599
                                 (default 500), ``concurrency`` (400, concurrency limit),
                                 ``slow`` (answers after create_delay_ms; a client that
                                 gives up first leaves no call behind), ``late`` (the
                                 call is created at once, as Vapi does, and the 201
                                 comes after create_delay_ms: a client that gave up
                                 never learns of it) or ``no-socket-url`` (201 without
                                 transport.websocketCallUrl);
                                 ``*N``: only the first N requests with this script fail,
                                 later ones create the call and run the rest of the script
    silent                       nothing at all (the call still ends on silence)

``flap`` and ``no-pong`` act on sockets, counted from each socket's opening, not on
utterances: a call that is rejoined goes on with its next utterance.
``interrupt``, ``stall`` and ``drop`` act on one utterance (the first message
unless ``target_utterance`` says otherwise), so they imply ``speak``. Offsets
are measured in wall-clock time from the utterance's ``speech-update``
(started): what a caller listening in real time would have heard by then.

Examples: ``speak``, ``echo:200``, ``speak+interrupt:1500``,
``speak:agent,caller+stall:1000:4000``, ``speak+drop:2000+refuse-reconnect``,
``fail-create:503*2+speak``, ``fail-create:concurrency``,
``speak:agent,agent+flap:800*3``, ``speak:agent,agent+no-pong:500*1``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal

__all__ = ["FailCreate", "FailCreateMode", "Script", "ScriptError", "parse_script"]

FailCreateMode = Literal["status", "concurrency", "slow", "late", "no-socket-url"]

_MAX_MS: Final = 3_600_000
_MAX_TIMES: Final = 1000
_NAMES: Final = ("echo", "speak", "interrupt", "stall", "drop", "refuse-reconnect",
                 "fail-create", "flap", "no-pong", "silent")
_COUNTED: Final = ("fail-create", "flap", "no-pong")
"""The behaviours that take ``*N``."""
_SOCKET_BEHAVIOURS: Final = frozenset({"fail-create", "flap", "no-pong"})
"""What ``silent`` combines with: behaviours that say nothing themselves."""
_TIMED: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "echo": (("echo_delay_ms", "echo delay"),),
    "interrupt": (("interrupt_at_ms", "interrupt offset"),),
    "stall": (("stall_at_ms", "stall offset"), ("stall_ms", "stall duration")),
    "drop": (("drop_at_ms", "drop offset"),),
    "flap": (("flap_every_ms", "flap interval"),),
    "no-pong": (("no_pong_at_ms", "no-pong offset"),),
}
"""The behaviours whose arguments are times: each argument's field and what it is."""


class ScriptError(ValueError):
    """A script that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class FailCreate:
    """How ``POST /call`` fails: ``mode`` (with ``status`` for an HTTP status), for the
    first ``times`` requests carrying this script (``None``: every request)."""

    mode: FailCreateMode = "status"
    status: int = 500
    times: int | None = None


@dataclass(frozen=True)
class Script:
    """One parsed script. ``None`` arguments take the settings' defaults."""

    text: str
    echo: bool = False
    echo_delay_ms: int | None = None
    speak: bool = False
    utterances: tuple[str, ...] | None = None
    interrupt: bool = False
    interrupt_at_ms: int | None = None
    stall: bool = False
    stall_at_ms: int | None = None
    stall_ms: int | None = None
    drop: bool = False
    drop_at_ms: int | None = None
    refuse_reconnect: bool = False
    flap: bool = False
    flap_every_ms: int | None = None
    flap_sockets: int | None = None
    """``flap``: how many sockets of the call flap (``None``: every one)."""
    no_pong: bool = False
    no_pong_at_ms: int | None = None
    no_pong_sockets: int | None = None
    """``no-pong``: how many sockets of the call go dark (``None``: every one)."""
    fail_create: FailCreate | None = None

    def without_fail_create(self) -> Script:
        """The same script once its ``fail-create`` has run out."""
        parts = [p for p in self.text.split("+") if not p.startswith("fail-create")]
        return replace(self, text="+".join(parts) or "silent", fail_create=None)


def _milliseconds(value: str, what: str) -> int:
    if not value.isdigit() or int(value) > _MAX_MS:
        raise ScriptError(f"{what} must be a whole number of milliseconds (0..{_MAX_MS}), "
                          f"not {value!r}")
    return int(value)


def _expect_args(name: str, args: list[str], most: int) -> None:
    if len(args) > most:
        raise ScriptError(f"{name} takes at most {most} argument(s)")


def _times(name: str, times_text: str | None) -> int | None:
    """The N of ``name*N`` (``None`` when not given)."""
    if times_text is None:
        return None
    if not times_text.isdigit() or not 1 <= int(times_text) <= _MAX_TIMES:
        raise ScriptError(f"{name} *N needs N in 1..{_MAX_TIMES}, not {times_text!r}")
    return int(times_text)


def _fail_create(args: list[str], times_text: str | None) -> FailCreate:
    _expect_args("fail-create", args, 1)
    times = _times("fail-create", times_text)
    mode = args[0] if args else "500"
    if mode.isdigit():
        if not 500 <= int(mode) <= 599:
            raise ScriptError(f"fail-create status must be 500..599, not {mode}")
        return FailCreate("status", int(mode), times)
    if mode in ("concurrency", "slow", "late", "no-socket-url"):
        return FailCreate(mode, 400 if mode == "concurrency" else 201, times)  # type: ignore[arg-type]
    raise ScriptError(f"fail-create mode {mode!r}: use a status 500..599, concurrency, "
                      "slow, late or no-socket-url")


def parse_script(text: str) -> Script:
    """Parse ``speak+interrupt:1500`` (see the module docstring); raises :class:`ScriptError`."""
    text = text.strip()
    if not text:
        raise ScriptError("the script is empty")
    fields: dict[str, object] = {}
    seen: list[str] = []
    for part in text.split("+"):
        token = part.strip()
        times_text: str | None = None
        if "*" in token:
            token, times_text = token.split("*", 1)
        name, *args = token.split(":")
        if name not in _NAMES:
            raise ScriptError(f"unknown behaviour {name!r}; known: {', '.join(_NAMES)}")
        if name in seen:
            raise ScriptError(f"{name} is given twice")
        if times_text is not None and name not in _COUNTED:
            raise ScriptError(f"only {', '.join(_COUNTED)} take *N, not {name}")
        seen.append(name)
        if name in _TIMED:
            timed = _TIMED[name]
            _expect_args(name, args, len(timed))
            flag = name.replace("-", "_")  # the Script field: no-pong -> no_pong
            fields[flag] = True
            for (field, what), value in zip(timed, args, strict=False):
                fields[field] = _milliseconds(value, what)
            if name in _COUNTED:
                fields[f"{flag}_sockets"] = _times(name, times_text)
            if fields.get("flap_every_ms") == 0:
                raise ScriptError("flap interval must be at least 1 ms")
        elif name == "speak":
            _expect_args(name, args, 1)
            fields["speak"] = True
            if args:
                clips = tuple(c.strip() for c in args[0].split(","))
                if not all(clips):
                    raise ScriptError("speak needs clip names separated by commas")
                fields["utterances"] = clips
        elif name == "refuse-reconnect":
            _expect_args(name, args, 0)
            fields["refuse_reconnect"] = True
        elif name == "fail-create":
            fields["fail_create"] = _fail_create(args, times_text)
        else:  # silent
            _expect_args(name, args, 0)
    if "silent" in seen and set(seen) - {"silent"} - _SOCKET_BEHAVIOURS:
        raise ScriptError("silent cannot be combined with other behaviours")
    if fields.get("refuse_reconnect") and not fields.get("drop"):
        raise ScriptError("refuse-reconnect needs drop")
    if fields.get("interrupt") or fields.get("stall") or fields.get("drop"):
        fields["speak"] = True
    canonical = "+".join(part.strip() for part in text.split("+"))
    return Script(text=canonical, **fields)  # type: ignore[arg-type]
