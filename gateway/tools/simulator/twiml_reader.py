"""Reading the gateway's answer to the voice webhook, as Twilio would execute it.

:func:`read_twiml` parses the TwiML document (``xml.etree``) into a
:class:`TwimlAnswer`:

- ``connect``: optional greeting ``<Say>``s, then ``<Connect><Stream url=…
  statusCallback=…>`` with its ``<Parameter>``s (all of them become the stream's
  ``customParameters``), then the verbs Twilio runs once the stream ends (the
  spoken fallback, ``<Hangup/>``);
- ``busy``: ``<Say>`` and ``<Hangup/>`` without ``<Connect>`` (the gateway is full or
  draining);
- ``other``: anything else (the simulator reports it as a failure).

What Twilio would reject in a ``<Connect><Stream>`` (checked with the gateway's own
validators in :mod:`gateway.twilio.twiml`: ``wss://`` only, ``ws://`` for loopback
hosts, no query string; an https status callback; ``<Parameter>`` name + value
under 500 characters; only the inbound track; one ``<Stream>``) is listed in
``problems``, which the simulator reports as protocol violations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal
from xml.etree import ElementTree

from gateway.twilio.twiml import (
    MAX_PARAMETER_CHARS,
    validate_callback_url,
    validate_stream_url,
)

__all__ = ["StreamInstruction", "TwimlAnswer", "TwimlError", "read_twiml"]

AnswerKind = Literal["connect", "busy", "other"]

_MAX_TWIML_BYTES: Final = 64 * 1024


class TwimlError(ValueError):
    """The answer is not a TwiML document."""


@dataclass(frozen=True)
class StreamInstruction:
    """``<Connect><Stream>``: where to open the socket and what to hand over."""

    url: str
    status_callback: str | None = None
    status_callback_method: str = "POST"
    name: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TwimlAnswer:
    """The verbs of the answer, in the order Twilio runs them."""

    kind: AnswerKind
    greeting: tuple[str, ...] = ()
    """``<Say>`` texts before ``<Connect>`` (for a busy answer: the busy message)."""
    stream: StreamInstruction | None = None
    after_stream: tuple[str, ...] = ()
    """``<Say>`` texts after ``</Connect>``: heard when the gateway closes the stream."""
    hangup: bool = False
    problems: tuple[str, ...] = ()


def read_twiml(document: bytes | str) -> TwimlAnswer:
    """Parse a TwiML answer; :class:`TwimlError` if it is not a ``<Response>`` document."""
    if len(document) > _MAX_TWIML_BYTES:
        raise TwimlError(f"TwiML answer of {len(document)} bytes is too large")
    try:
        root = ElementTree.fromstring(document)
    except ElementTree.ParseError as error:
        raise TwimlError(f"TwiML answer is not XML: {error}") from None
    if root.tag != "Response":
        raise TwimlError(f"TwiML root element is <{root.tag}>, not <Response>")
    greeting: list[str] = []
    after: list[str] = []
    problems: list[str] = []
    stream: StreamInstruction | None = None
    connected = False
    hangup = False
    for verb in root:
        if verb.tag == "Say":
            (after if connected else greeting).append((verb.text or "").strip())
        elif verb.tag == "Connect":
            if connected:
                problems.append("a second <Connect>")
                continue
            connected = True
            stream = _read_connect(verb, problems)
        elif verb.tag == "Hangup":
            hangup = True
            break  # nothing after <Hangup/> runs
    if stream is not None:
        kind: AnswerKind = "connect"
    elif not connected and hangup and greeting:
        kind = "busy"
    else:
        kind = "other"
    return TwimlAnswer(kind, tuple(greeting), stream, tuple(after), hangup, tuple(problems))


def _read_connect(connect: ElementTree.Element, problems: list[str]) -> StreamInstruction | None:
    streams = [child for child in connect if child.tag == "Stream"]
    if not streams:
        problems.append("<Connect> without <Stream>")
        return None
    if len(streams) > 1:
        problems.append(f"{len(streams)} <Stream>s in <Connect> (Twilio allows one)")
    element = streams[0]
    url = element.get("url", "")
    try:
        validate_stream_url(url)
    except ValueError as error:
        problems.append(f"<Stream url>: {error}")
    callback = element.get("statusCallback") or None
    if callback is not None:
        try:
            validate_callback_url(callback)
        except ValueError as error:
            problems.append(f"<Stream statusCallback>: {error}")
    track = element.get("track")
    if track not in (None, "inbound_track"):
        problems.append(f"<Stream track={track!r}>: <Connect> streams only inbound_track")
    parameters: dict[str, str] = {}
    for parameter in element:
        if parameter.tag != "Parameter":
            continue
        name = parameter.get("name", "")
        value = parameter.get("value", "")
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            problems.append(f"<Parameter {name[:40]}>: name + value of 500 characters or more")
        parameters[name] = value
    return StreamInstruction(
        url=url,
        status_callback=callback,
        status_callback_method=(element.get("statusCallbackMethod") or "POST").upper(),
        name=element.get("name") or None,
        parameters=parameters,
    )
