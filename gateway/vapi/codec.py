"""Sans-io codec for the JSON text frames of a Vapi call socket.

Vapi -> gateway: :func:`decode_event` turns one text frame into a typed event
(:data:`CallEvent`). Vapi does not publish the full list of event types, so a
type this module does not know becomes :class:`UnknownEvent` (the caller counts
it), and fields Vapi may omit are optional. Extra fields are ignored. Anything
that is not a JSON object with a string ``type``, or a known event whose fields
have the wrong JSON types, raises :class:`CallMessageError` -- never anything
else.

Gateway -> Vapi: :func:`encode_message` serialises the control messages the
spec documents as ``ClientInboundMessage`` (end-call, say, add-message,
control, transfer).

Wire names are camelCase; attribute names are snake_case (``rename="camel"``).
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

import msgspec

__all__ = [
    "AddMessage",
    "AssistantStalled",
    "CallEvent",
    "CallMessageError",
    "ClientMessage",
    "Control",
    "ControlCommand",
    "ControlMessage",
    "ConversationUpdate",
    "EndCall",
    "EndOfCallReport",
    "ErrorKind",
    "MessageToAdd",
    "ModelOutput",
    "NumberDestination",
    "Say",
    "SipDestination",
    "SpeechUpdate",
    "StatusUpdate",
    "ToolCall",
    "ToolCalls",
    "ToolFunction",
    "Transcript",
    "Transfer",
    "UnknownEvent",
    "UserInterrupted",
    "decode_event",
    "encode_message",
    "event_from_object",
    "is_barge_in",
    "is_call_end",
]

ErrorKind = Literal["malformed-json", "not-an-object", "missing-type", "invalid-field"]

# A turn id's JSON type is undocumented: accept a string or an integer.
TurnId = str | int


class CallMessageError(ValueError):
    """A text frame that is not a usable Vapi event.

    ``kind`` says what was wrong (for counters); ``detail`` is a short message
    for the log. Neither ever contains the frame itself.
    """

    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: ErrorKind = kind
        self.detail = detail


class _Event(
    msgspec.Struct, tag_field="type", rename="camel", omit_defaults=True, frozen=True
):
    """Base of the Vapi -> gateway events: flat objects tagged by ``type``."""


class SpeechUpdate(_Event, tag="speech-update", frozen=True):
    """Someone started or stopped speaking (``status`` started/stopped, ``role`` assistant/user)."""

    status: str | None = None
    role: str | None = None
    turn: int | None = None


class UserInterrupted(_Event, tag="user-interrupted", frozen=True):
    """The caller barged in: buffered assistant audio must stop at once."""

    turn_id: TurnId | None = None


class Transcript(_Event, tag="transcript", frozen=True):
    """A partial or final transcript (``transcript_type`` partial/final) of one role's speech."""

    role: str | None = None
    transcript_type: str | None = None
    transcript: str | None = None


class ModelOutput(_Event, tag="model-output", frozen=True):
    """A piece of the model's output (its JSON type is undocumented, so kept as decoded)."""

    output: Any = None
    turn_id: TurnId | None = None


class StatusUpdate(_Event, tag="status-update", frozen=True):
    """The call's status (queued, ringing, in-progress, forwarding, ended) and why it ended."""

    status: str | None = None
    ended_reason: str | None = None


class ConversationUpdate(_Event, tag="conversation-update", frozen=True):
    """The conversation so far (message shapes are undocumented, so kept as decoded)."""

    messages: list[Any] | None = None


class AssistantStalled(_Event, tag="hang", frozen=True):
    """Vapi's ``hang`` event: the assistant is stalled (slow model, voice or tool).

    This is NOT a hang-up; the call goes on.
    """


class EndOfCallReport(_Event, tag="end-of-call-report", frozen=True):
    """Vapi's summary once the call is over."""

    ended_reason: str | None = None
    duration_seconds: float | None = None


class ToolFunction(msgspec.Struct, frozen=True):
    """The OpenAI-style ``function`` of a tool call (``arguments`` as sent: object or JSON text)."""

    name: str | None = None
    arguments: dict[str, Any] | str | None = None


class ToolCall(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True):
    """One tool call. vapi.md documents ``{id, name, parameters}``; the OpenAI shape
    ``{id, function: {name, arguments}}`` is accepted too (see :attr:`tool_name`)."""

    id: str | None = None
    name: str | None = None
    parameters: dict[str, Any] | None = None
    function: ToolFunction | None = None

    @property
    def tool_name(self) -> str | None:
        """The tool's name from whichever shape carried it."""
        if self.name is not None:
            return self.name
        return self.function.name if self.function is not None else None


class ToolCalls(_Event, tag="tool-calls", frozen=True):
    """The assistant asks for tools to run."""

    tool_call_list: list[ToolCall] | None = None


class UnknownEvent(msgspec.Struct, frozen=True):
    """An event whose ``type`` this codec does not know (count it, otherwise ignore it)."""

    type: str


CallEvent = (
    SpeechUpdate
    | UserInterrupted
    | Transcript
    | ModelOutput
    | StatusUpdate
    | ConversationUpdate
    | AssistantStalled
    | EndOfCallReport
    | ToolCalls
    | UnknownEvent
)

_EVENT_TYPES: Final[dict[str, type[_Event]]] = {
    "speech-update": SpeechUpdate,
    "user-interrupted": UserInterrupted,
    "transcript": Transcript,
    "model-output": ModelOutput,
    "status-update": StatusUpdate,
    "conversation-update": ConversationUpdate,
    "hang": AssistantStalled,
    "end-of-call-report": EndOfCallReport,
    "tool-calls": ToolCalls,
}


def decode_event(frame: bytes | str) -> CallEvent:
    """Decode one text frame from the call socket.

    Raises :class:`CallMessageError` (only) for anything unusable.
    """
    try:
        decoded: object = msgspec.json.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
        # msgspec raises ValidationError (a DecodeError) for out-of-range
        # numbers and RecursionError for very deep nesting.
        raise CallMessageError("malformed-json", str(error)) from None
    return event_from_object(decoded)


def event_from_object(decoded: object) -> CallEvent:
    """Build an event from an already decoded JSON value (a webhook's ``message``, say)."""
    if not isinstance(decoded, dict):
        raise CallMessageError("not-an-object", f"got a JSON {_json_type_name(decoded)}")
    event_type = decoded.get("type")
    if not isinstance(event_type, str):
        raise CallMessageError("missing-type", "no string 'type' field")
    struct_type = _EVENT_TYPES.get(event_type)
    if struct_type is None:
        return UnknownEvent(type=event_type)
    try:
        event: CallEvent = msgspec.convert(decoded, struct_type)  # type: ignore[assignment]
    except msgspec.ValidationError as error:
        raise CallMessageError("invalid-field", f"{event_type}: {error}") from None
    return event


def _json_type_name(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null"


def is_barge_in(event: CallEvent) -> bool:
    """Whether the caller started talking over the assistant (stop its audio now)."""
    if isinstance(event, UserInterrupted):
        return True
    return (
        isinstance(event, SpeechUpdate)
        and event.role == "user"
        and event.status == "started"
    )


def is_call_end(event: CallEvent) -> bool:
    """Whether Vapi says the call is over (the socket's close will be expected)."""
    if isinstance(event, EndOfCallReport):
        return True
    return isinstance(event, StatusUpdate) and event.status == "ended"


# --- gateway -> Vapi ---------------------------------------------------------


class _ClientMessage(
    msgspec.Struct, tag_field="type", rename="camel", omit_defaults=True, frozen=True
):
    """Base of the gateway -> Vapi control messages."""


class EndCall(_ClientMessage, tag="end-call", frozen=True):
    """End the call."""


class Say(_ClientMessage, tag="say", frozen=True):
    """Make the assistant say ``content``; unset options keep Vapi's defaults."""

    content: str
    end_call_after_spoken: bool | None = None
    interrupt_assistant_enabled: bool | None = None
    interruptions_enabled: bool | None = None


class MessageToAdd(msgspec.Struct, frozen=True):
    """A message for the conversation (``role`` such as system/user/assistant)."""

    role: str
    content: str


class AddMessage(_ClientMessage, tag="add-message", frozen=True):
    """Add a message to the conversation; Vapi answers it unless told not to."""

    message: MessageToAdd
    trigger_response_enabled: bool | None = None


class ControlCommand(enum.Enum):
    """The ``control`` values the spec documents."""

    MUTE_ASSISTANT = "mute-assistant"
    UNMUTE_ASSISTANT = "unmute-assistant"
    MUTE_CUSTOMER = "mute-customer"
    UNMUTE_CUSTOMER = "unmute-customer"
    SAY_FIRST_MESSAGE = "say-first-message"


class Control(_ClientMessage, tag="control", frozen=True):
    """Mute or unmute a side, or make the assistant say its first message."""

    control: ControlCommand


class _Destination(
    msgspec.Struct, tag_field="type", rename="camel", omit_defaults=True, frozen=True
):
    """Base of transfer destinations."""


class NumberDestination(_Destination, tag="number", frozen=True):
    """Transfer to a phone number (E.164)."""

    number: str
    message: str | None = None


class SipDestination(_Destination, tag="sip", frozen=True):
    """Transfer to a SIP URI."""

    sip_uri: str
    message: str | None = None


class Transfer(_ClientMessage, tag="transfer", frozen=True):
    """Transfer the call; ``content`` is said first if given."""

    destination: NumberDestination | SipDestination
    content: str | None = None


ControlMessage = Say | AddMessage | Control | Transfer
"""What the bridge may send on an open link (end-call belongs to the link itself)."""

ClientMessage = EndCall | ControlMessage

_encoder: Final = msgspec.json.Encoder()


def encode_message(message: ClientMessage) -> bytes:
    """Serialise a control message to the JSON of one text frame."""
    return _encoder.encode(message)
