"""``POST /call`` without I/O: validating the body as Vapi would, and the answers.

:func:`parse_call_request` checks a websocket-transport call request and
returns a :class:`CallRequest`, or raises :class:`CallRequestError` whose
messages become the 400 answer (``{"message": [...], "error": "Bad Request",
"statusCode": 400}``, Vapi's shape). It also picks the call's script, in this
order:

1. ``assistantOverrides.variableValues.localScript`` (a script text);
2. an ``assistantId`` of the form ``local:<script>`` (e.g. ``local:speak+interrupt``;
   ``local`` alone, or any other assistantId, means the default script) -- this is
   what the gateway's ``[routing]`` table can name per dialled number;
3. an inline ``assistant``'s ``metadata.localScript``;
4. the configured default.

:func:`call_answer` and :func:`error_answer` build the JSON answers.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from gateway.tools.local_assistant.clips import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from gateway.tools.local_assistant.script import Script, ScriptError, parse_script
from gateway.vapi.calls import AudioFormat

__all__ = [
    "LOCAL_ASSISTANT_PREFIX",
    "CallRequest",
    "CallRequestError",
    "call_answer",
    "error_answer",
    "parse_call_request",
]

LOCAL_ASSISTANT_PREFIX: Final = "local:"
"""An ``assistantId`` starting with this names a script: ``local:speak+interrupt``."""
SCRIPT_VARIABLE: Final = "localScript"
"""The variable (``assistantOverrides.variableValues``) or inline ``metadata`` key
that names a call's script."""

_TOP_LEVEL: Final = frozenset({
    "assistantId", "assistant", "assistantOverrides", "transport", "name", "metadata",
    "customer", "customerId", "phoneNumber", "phoneNumberId", "squadId", "squad",
    "workflowId", "workflow", "schedulePlan",
})
_NOT_ON_WEBSOCKET: Final = ("phoneNumber", "phoneNumberId")
_NOT_SUPPORTED: Final = ("squadId", "squad", "workflowId", "workflow", "schedulePlan")
_TRANSPORT_KEYS: Final = frozenset({"provider", "audioFormat"})
_AUDIO_FORMAT_KEYS: Final = frozenset({"format", "container", "sampleRate"})
_DEFAULT_RATES: Final = {"pcm_s16le": 16000, "mulaw": 8000}


class CallRequestError(ValueError):
    """The body is not a valid call request; ``messages`` say why (Vapi's 400)."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = tuple(messages)


@dataclass(frozen=True)
class CallRequest:
    """A valid websocket-transport call request."""

    audio: AudioFormat
    script: Script
    body: Mapping[str, Any] = field(default_factory=dict)
    assistant_id: str | None = None
    assistant: Mapping[str, Any] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    silence_timeout_s: float | None = None
    first_message: str | None = None


def _object(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _audio_format(transport: dict[str, Any], problems: list[str]) -> AudioFormat | None:
    for key in sorted(set(transport) - _TRANSPORT_KEYS):
        problems.append(f"transport.property {key} should not exist")
    if transport.get("provider") != "vapi.websocket":
        problems.append("transport.provider must be one of the following values: "
                        "vapi.websocket")
    raw = transport.get("audioFormat", {})
    audio_format = _object(raw)
    if audio_format is None:
        problems.append("transport.audioFormat must be an object")
        return None
    for key in sorted(set(audio_format) - _AUDIO_FORMAT_KEYS):
        problems.append(f"transport.audioFormat.property {key} should not exist")
    encoding = audio_format.get("format", "pcm_s16le")
    if encoding not in _DEFAULT_RATES:
        problems.append("transport.audioFormat.format must be one of the following values: "
                        "pcm_s16le, mulaw")
        return None
    if audio_format.get("container", "raw") != "raw":
        problems.append("transport.audioFormat.container must be one of the following "
                        "values: raw")
    rate = audio_format.get("sampleRate", _DEFAULT_RATES[encoding])
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate != int(rate):
        problems.append("transport.audioFormat.sampleRate must be a whole number")
        return None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        problems.append("transport.audioFormat.sampleRate must be between "
                        f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} (the local assistant's range)")
        return None
    return AudioFormat(encoding, int(rate))


def _silence_timeout(source: Mapping[str, Any] | None, where: str,
                     problems: list[str]) -> float | None:
    if source is None or "silenceTimeoutSeconds" not in source:
        return None
    value = source["silenceTimeoutSeconds"]
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not 10 <= value <= 3600):
        problems.append(f"{where}.silenceTimeoutSeconds must be a number from 10 to 3600")
        return None
    return float(value)


def _script_text(body: dict[str, Any], overrides: Mapping[str, Any]) -> str | None:
    variables = _object(overrides.get("variableValues")) or {}
    if SCRIPT_VARIABLE in variables:
        return str(variables[SCRIPT_VARIABLE])
    assistant_id = body.get("assistantId")
    if isinstance(assistant_id, str) and assistant_id.startswith(LOCAL_ASSISTANT_PREFIX):
        return assistant_id[len(LOCAL_ASSISTANT_PREFIX):]
    metadata = _object((_object(body.get("assistant")) or {}).get("metadata")) or {}
    if SCRIPT_VARIABLE in metadata:
        return str(metadata[SCRIPT_VARIABLE])
    return None


def parse_call_request(content: bytes, default_script: Script,
                       check_clip: Callable[[str], None] | None = None) -> CallRequest:
    """Validate a ``POST /call`` body; ``check_clip`` raises ``ValueError`` for a bad clip."""
    try:
        body: object = msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise CallRequestError(["the body must be JSON"]) from None
    if not isinstance(body, dict):
        raise CallRequestError(["the body must be a JSON object"])
    problems: list[str] = []
    for key in sorted(set(body) - _TOP_LEVEL):
        problems.append(f"property {key} should not exist")
    for key in _NOT_ON_WEBSOCKET:
        if key in body:
            problems.append(f"{key} is not allowed on a vapi.websocket transport call")
    for key in _NOT_SUPPORTED:
        if key in body:
            problems.append(f"{key} is not supported by the local assistant")
    assistant_id = body.get("assistantId")
    assistant = body.get("assistant")
    if assistant_id is not None and (not isinstance(assistant_id, str) or not assistant_id):
        problems.append("assistantId must be a non-empty string")
    if assistant is not None and not isinstance(assistant, dict):
        problems.append("assistant must be an object")
    if (assistant_id is None) == (assistant is None):
        problems.append("give exactly one of assistantId or assistant")
    overrides = body.get("assistantOverrides", {})
    if not isinstance(overrides, dict):
        problems.append("assistantOverrides must be an object")
        overrides = {}
    if not isinstance(overrides.get("variableValues", {}), dict):
        problems.append("assistantOverrides.variableValues must be an object")
    transport = body.get("transport")
    audio: AudioFormat | None = None
    if transport is None:
        problems.append("transport must be given (provider vapi.websocket)")
    elif not isinstance(transport, dict):
        problems.append("transport must be an object")
    else:
        audio = _audio_format(transport, problems)
    inline = assistant if isinstance(assistant, dict) else None
    timeout = _silence_timeout(overrides, "assistantOverrides", problems)
    if timeout is None:
        timeout = _silence_timeout(inline, "assistant", problems)
    first_message = overrides.get("firstMessage", (inline or {}).get("firstMessage"))
    script = default_script
    text = _script_text(body, overrides)
    if text is not None:
        try:
            script = parse_script(text) if text.strip() else default_script
        except ScriptError as error:
            problems.append(f"local assistant script {text!r}: {error}")
    for clip in script.utterances or ():
        if check_clip is not None:
            try:
                check_clip(clip)
            except ValueError as error:
                problems.append(str(error))
    if problems or audio is None:
        raise CallRequestError(problems or ["transport.audioFormat is not valid"])
    return CallRequest(
        audio=audio, script=script, body=body,
        assistant_id=assistant_id if isinstance(assistant_id, str) else None,
        assistant=inline, overrides=overrides, silence_timeout_s=timeout,
        first_message=first_message if isinstance(first_message, str) else None)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def call_answer(call_id: str, request: CallRequest, socket_url: str | None,
                created_at_s: float, status: str = "queued") -> dict[str, Any]:
    """The Call JSON of a created call (``socket_url`` ``None``: without the socket URL)."""
    transport: dict[str, Any] = {
        "provider": "vapi.websocket",
        "audioFormat": {"format": request.audio.encoding, "container": "raw",
                        "sampleRate": request.audio.sample_rate},
    }
    if socket_url is not None:
        transport["websocketCallUrl"] = socket_url
    answer: dict[str, Any] = {
        "id": call_id,
        "orgId": "local-assistant",
        "type": "vapi.websocketCall",
        "status": status,
        "createdAt": _iso(created_at_s),
        "updatedAt": _iso(created_at_s),
        "transport": transport,
    }
    if request.assistant_id is not None:
        answer["assistantId"] = request.assistant_id
    if request.overrides:
        answer["assistantOverrides"] = dict(request.overrides)
    return answer


_ERROR_NAMES: Final = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                       413: "Payload Too Large", 500: "Internal Server Error",
                       502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def error_answer(status: int, message: str | list[str], **extra: Any) -> dict[str, Any]:
    """Vapi's error body: ``message`` (a string or a list), ``error``, ``statusCode``."""
    return {"message": message, "error": _ERROR_NAMES.get(status, "Error"),
            "statusCode": status, **extra}
