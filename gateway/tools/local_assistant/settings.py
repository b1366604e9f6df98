"""The local assistant's settings: defaults, bounds, and parsing from strings.

:class:`LocalAssistantSettings` is frozen and validated on construction
(``ValueError`` naming the field). :func:`settings_from_strings` builds one from
``name -> text`` pairs (an ini section, or the command line's ``--set``),
converting each value to its field's type. Times are milliseconds unless the
name says seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.tools.local_assistant.script import ScriptError, parse_script

__all__ = ["LocalAssistantSettings", "settings_from_strings"]

_TRUE: Final = {"true", "yes", "on", "1"}
_FALSE: Final = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class LocalAssistantSettings:
    """How the local assistant behaves when a call does not say otherwise."""

    script: str = "speak"
    """The script of calls that do not choose one (see :mod:`.script`)."""
    silence_timeout_s: float = 30.0
    """End a call with ``silence-timed-out`` after this long without uplink audio
    (Vapi's ``silenceTimeoutSeconds``; a call's assistant or overrides may set it)."""
    max_concurrent_calls: int = 10
    """Open calls allowed at once (Vapi's default account limit); 0: no limit."""
    echo_delay_ms: int = 200
    """``echo``: how long after it arrived the caller's audio comes back."""
    first_message_delay_ms: int = 200
    """``speak``: from the socket opening to the first message's first audio."""
    utterances: tuple[str, ...] = ("agent",)
    """``speak``: the clips said in turn (packaged names or .wav paths)."""
    utterance_gap_ms: int = 1000
    """``speak``: silence between one utterance's end and the next one's start."""
    frame_ms: int = 20
    """Audio per binary frame sent (the last frame of an utterance may be shorter)."""
    burst_min_ms: int = 100
    burst_max_ms: int = 300
    """Audio per burst: each burst's length is drawn from this range."""
    speed_min: float = 2.0
    speed_max: float = 5.0
    """How much faster than real time the bursts come (drawn per burst)."""
    jitter_ms: int = 10
    """Each burst is sent up to this much early or late (never before the previous one)."""
    target_utterance: int = 0
    """Which utterance ``interrupt``, ``stall`` and ``drop`` act on (0: the first message)."""
    interrupt_at_ms: int = 1500
    """``interrupt``: how far into the utterance the caller barges in."""
    user_turn_ms: int = 1000
    """``interrupt``: how long the caller talks before speech-update (user, stopped)."""
    stall_at_ms: int = 1000
    stall_ms: int = 3000
    """``stall``: where the audio pauses, and for how long."""
    hang_after_ms: int = 1000
    """``stall``: a ``hang`` event is sent this long into a pause that lasts longer."""
    drop_at_ms: int = 1500
    """``drop``: how far into the utterance the socket is aborted."""
    flap_every_ms: int = 1000
    """``flap``: how long after it opens each socket is aborted."""
    no_pong_at_ms: int = 1000
    """``no-pong``: how long after it opens a socket goes dark (pings unanswered)."""
    create_delay_ms: int = 10_000
    """``fail-create:slow``: how long ``POST /call`` takes to answer."""
    seed: int = 0
    """Seeds the burst sizes, speeds and jitter (each call gets its own stream)."""
    max_recorded_audio_bytes: int = 1024 * 1024
    """Uplink audio kept per call for tests to inspect; the rest is only counted."""
    keep_ended_calls: int = 1000
    """Ended calls kept in ``LocalAssistant.calls``; older ones are forgotten."""

    def __post_init__(self) -> None:
        try:
            parse_script(self.script)
        except ScriptError as error:
            raise ValueError(f"script: {error}") from None
        _at_least(self, "silence_timeout_s", 0.001)
        _at_least(self, "max_concurrent_calls", 0)
        for name in ("echo_delay_ms", "first_message_delay_ms", "utterance_gap_ms",
                     "jitter_ms", "target_utterance", "interrupt_at_ms", "user_turn_ms",
                     "stall_at_ms", "stall_ms", "hang_after_ms", "drop_at_ms",
                     "create_delay_ms", "max_recorded_audio_bytes", "keep_ended_calls",
                     "no_pong_at_ms"):
            _at_least(self, name, 0)
        _at_least(self, "flap_every_ms", 1)
        _at_least(self, "frame_ms", 1)
        _at_least(self, "burst_min_ms", 1)
        _at_least(self, "speed_min", 0.1)
        if not self.utterances or not all(self.utterances):
            raise ValueError("utterances: give at least one clip name")
        if self.burst_max_ms < self.burst_min_ms:
            raise ValueError("burst_max_ms must not be below burst_min_ms")
        if self.speed_max < self.speed_min:
            raise ValueError("speed_max must not be below speed_min")


def _at_least(settings: LocalAssistantSettings, name: str, minimum: float) -> None:
    value = getattr(settings, name)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, not {value}")


def _convert(name: str, annotation: str, text: str) -> Any:
    text = text.strip()
    try:
        if annotation == "int":
            return int(text)
        if annotation == "float":
            return float(text)
        if annotation == "bool":
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a valid {annotation}") from None
    if annotation.startswith("tuple"):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    return text


def settings_from_strings(values: Mapping[str, str],
                          base: LocalAssistantSettings | None = None) -> LocalAssistantSettings:
    """``base`` (or the defaults) with ``values`` applied; ``ValueError`` names the problem."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(LocalAssistantSettings)}
    changes: dict[str, Any] = {}
    for name, text in values.items():
        key = name.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(fields))}")
        changes[key] = _convert(key, fields[key], text)
    return dataclasses.replace(base or LocalAssistantSettings(), **changes)
