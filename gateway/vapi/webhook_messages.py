"""Sans-io parsing of Vapi server-URL webhook bodies.

A webhook body is ``{"message": {"type": ..., "call": {...}, ...}}``.
:func:`parse_server_message` turns it into:

- :class:`AssistantRequest` -- Vapi asks which assistant should take a call
  (answer it with :func:`gateway.vapi.calls.assistant_request_answer`);
- :class:`ServerEvent` -- the call id plus a :class:`~gateway.vapi.codec.StatusUpdate`,
  :class:`~gateway.vapi.codec.EndOfCallReport`, :class:`~gateway.vapi.codec.ToolCalls`,
  or :class:`~gateway.vapi.codec.UnknownEvent` for every other type.

The envelope is strict: a body that is not JSON, not an object, has no
``message`` object or no string ``type`` raises :class:`WebhookBodyError`
(its ``reason`` is meant for a 400 answer and the log). So is a status-update,
end-of-call-report or tool-calls message whose fields have the wrong JSON
types. The call object's fields are undocumented beyond ``id``, so the numbers
and the call id are read leniently: anything missing or of an unexpected type
is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from gateway.vapi.codec import (
    CallMessageError,
    EndOfCallReport,
    StatusUpdate,
    ToolCalls,
    UnknownEvent,
    event_from_object,
)

__all__ = [
    "AssistantRequest",
    "ServerEvent",
    "ServerMessage",
    "WebhookBodyError",
    "parse_server_message",
]


class WebhookBodyError(ValueError):
    """A webhook body the gateway cannot use; ``reason`` never quotes the body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AssistantRequest:
    """Vapi asks which assistant takes the call (answer within 7.5 s end to end).

    ``dialled_number`` is the Vapi phone number called (``phoneNumber.number``);
    ``customer_number`` is the caller (``customer.number``). Either may be absent
    (web and websocket calls have no phone number).
    """

    call_id: str | None
    dialled_number: str | None
    customer_number: str | None


@dataclass(frozen=True)
class ServerEvent:
    """Any other webhook: the call it is about and what happened."""

    call_id: str | None
    event: StatusUpdate | EndOfCallReport | ToolCalls | UnknownEvent


ServerMessage = AssistantRequest | ServerEvent

_TYPED_EVENTS: Final = frozenset({"status-update", "end-of-call-report", "tool-calls"})


def parse_server_message(body: bytes) -> ServerMessage:
    """Parse one webhook body; raises :class:`WebhookBodyError` (only) when unusable."""
    try:
        envelope: object = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise WebhookBodyError("body is not valid JSON") from None
    if not isinstance(envelope, dict):
        raise WebhookBodyError("body is not a JSON object")
    message = envelope.get("message")
    if not isinstance(message, dict):
        raise WebhookBodyError("body has no 'message' object")
    message_type = message.get("type")
    if not isinstance(message_type, str):
        raise WebhookBodyError("message has no string 'type'")

    call = message.get("call")
    call_id = _text_at(call, "id")
    if message_type == "assistant-request":
        return AssistantRequest(
            call_id=call_id,
            dialled_number=_text_at(message, "phoneNumber", "number")
            or _text_at(call, "phoneNumber", "number"),
            customer_number=_text_at(message, "customer", "number")
            or _text_at(call, "customer", "number"),
        )
    if message_type not in _TYPED_EVENTS:
        return ServerEvent(call_id=call_id, event=UnknownEvent(type=message_type))
    try:
        event = event_from_object(message)
    except CallMessageError as error:
        raise WebhookBodyError(f"bad {message_type} message: {error.detail}") from None
    assert isinstance(event, (StatusUpdate, EndOfCallReport, ToolCalls))
    return ServerEvent(call_id=call_id, event=event)


def _text_at(value: object, *path: str) -> str | None:
    """The non-empty string at ``path`` inside nested objects, else ``None``."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, str) and value else None
