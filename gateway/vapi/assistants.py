"""Choosing the Vapi assistant for a call: routing table, overrides, webhook answer.

All pure functions over plain data:

- :class:`AssistantById` / :class:`InlineAssistant` (:data:`AssistantChoice`)
  -- a saved assistant with optional ``assistantOverrides``, or a whole
  assistant configuration sent inline;
- :class:`RoutingTable` and :func:`choose_assistant` -- dialled number ->
  choice, with a default;
- :func:`merge_overrides` and :func:`twilio_call_overrides` -- the
  ``assistantOverrides`` for one phone call (caller's number, CallSid, and the
  first message to say when a lost call is recreated);
- :func:`assistant_request_answer` -- the JSON answer to Vapi's
  ``assistant-request`` webhook.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "AssistantById",
    "AssistantChoice",
    "InlineAssistant",
    "RoutingTable",
    "assistant_request_answer",
    "choose_assistant",
    "merge_overrides",
    "normalize_number",
    "twilio_call_overrides",
]

JsonObject = Mapping[str, Any]


@dataclass(frozen=True)
class AssistantById:
    """A saved Vapi assistant, optionally with ``assistantOverrides``."""

    assistant_id: str
    overrides: JsonObject | None = None

    def __post_init__(self) -> None:
        if not self.assistant_id.strip():
            raise ValueError("assistant_id must not be empty")


@dataclass(frozen=True)
class InlineAssistant:
    """A whole assistant configuration, sent as ``assistant``."""

    assistant: JsonObject

    def __post_init__(self) -> None:
        if not self.assistant:
            raise ValueError("an inline assistant must not be empty")


AssistantChoice = AssistantById | InlineAssistant

_NUMBER_SEPARATORS: Final = re.compile(r"[\s\-.()]")
_E164ISH: Final = re.compile(r"\+?[0-9]{3,15}")


def normalize_number(number: str) -> str | None:
    """``+1 (555) 010-0199`` -> ``+15550100199``; ``None`` if it is not a phone number.

    Only separators are removed: no country code is guessed.
    """
    compact = _NUMBER_SEPARATORS.sub("", number)
    return compact if _E164ISH.fullmatch(compact) else None


@dataclass(frozen=True)
class RoutingTable:
    """Dialled number -> assistant, with a default for every other number.

    Keys are normalised with :func:`normalize_number` when the table is built;
    a key that is not a phone number raises ``ValueError`` (a config error).
    """

    routes: Mapping[str, AssistantChoice] = field(default_factory=dict)
    default: AssistantChoice | None = None

    def __post_init__(self) -> None:
        normalised: dict[str, AssistantChoice] = {}
        for number, choice in self.routes.items():
            key = normalize_number(number)
            if key is None:
                raise ValueError(f"routing key {number!r} is not a phone number")
            if key in normalised:
                raise ValueError(f"routing key {number!r} is listed twice")
            normalised[key] = choice
        object.__setattr__(self, "routes", normalised)


def choose_assistant(table: RoutingTable, dialled_number: str | None) -> AssistantChoice | None:
    """The assistant for ``dialled_number``, else the default, else ``None``."""
    if dialled_number is not None:
        key = normalize_number(dialled_number)
        if key is not None:
            choice = table.routes.get(key)
            if choice is not None:
                return choice
    return table.default


def merge_overrides(base: JsonObject | None, extra: JsonObject | None) -> dict[str, Any]:
    """``extra`` over ``base``; ``variableValues`` are merged key by key."""
    merged: dict[str, Any] = dict(base or {})
    for key, value in (extra or {}).items():
        if key == "variableValues" and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def twilio_call_overrides(
    *,
    caller_number: str | None,
    dialled_number: str | None,
    call_sid: str,
    first_message: str | None = None,
) -> dict[str, Any]:
    """``assistantOverrides`` for one Twilio call.

    Prompts can use ``{{callerNumber}}``, ``{{dialledNumber}}`` and
    ``{{twilioCallSid}}``. ``first_message`` replaces the assistant's greeting
    (used when a lost Vapi call is recreated mid-conversation).
    """
    variables = {"twilioCallSid": call_sid}
    if caller_number:
        variables["callerNumber"] = caller_number
    if dialled_number:
        variables["dialledNumber"] = dialled_number
    overrides: dict[str, Any] = {"variableValues": variables}
    if first_message is not None:
        overrides["firstMessage"] = first_message
    return overrides


def assistant_request_answer(
    choice: AssistantChoice | None, unrouted_message: str
) -> dict[str, Any]:
    """The top-level JSON answer to an ``assistant-request`` webhook.

    ``{"assistantId": ..., "assistantOverrides"?: ...}`` or ``{"assistant": {...}}``;
    without a choice, ``{"error": unrouted_message}`` (Vapi speaks it to the caller).
    """
    if choice is None:
        return {"error": unrouted_message}
    if isinstance(choice, InlineAssistant):
        return {"assistant": dict(choice.assistant)}
    answer: dict[str, Any] = {"assistantId": choice.assistant_id}
    if choice.overrides:
        answer["assistantOverrides"] = dict(choice.overrides)
    return answer
