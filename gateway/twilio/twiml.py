"""TwiML answers to Twilio's voice webhook, built with ``twilio``'s ``VoiceResponse``.

Three answers:

- :meth:`TwimlAnswers.connect`: an optional greeting ``<Say>``, then
  ``<Connect><Stream url="wss://…/twilio/media" statusCallback=… statusCallbackMethod="POST">``
  with ``<Parameter>``s carrying the call's identity (``CallSid``, ``From``,
  ``To``) and the stream token, then the spoken fallback ``<Say>`` and
  ``<Hangup/>``. ``<Connect>`` blocks until the gateway closes the socket, so the
  fallback is heard only when the stream ends without the call ending (the
  gateway failed or closed the stream on purpose).
- :meth:`TwimlAnswers.connect_outbound`: the same ``<Connect><Stream>`` for a call
  placed by the admin API, identified by ``outboundRef`` instead of ``CallSid``, and
  without the greeting.
- :meth:`TwimlAnswers.busy`: ``<Say>message</Say><Hangup/>``.

URLs must use TLS (``wss://`` for the stream, ``https://`` for the callback);
``ws://`` and ``http://`` are accepted only for loopback hosts (``localhost``,
``127.0.0.0/8``, ``::1``), for local tests and the call simulator, as the
configured ``public_url`` itself allows.

The static parts (URLs, messages, voice, language) are validated once, when
:class:`TwimlAnswers` is built from the configuration, so a bad value stops the
daemon at start-up instead of failing calls. Per-call values are validated on
every answer (``ValueError``): a ``<Parameter>`` must keep name + value under 500
characters and every text must be valid XML 1.0 characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

from twilio.twiml.voice_response import VoiceResponse

from gateway.config import is_loopback_host

__all__ = [
    "CALLED_PARAMETER",
    "CALLER_PARAMETER",
    "CALL_SID_PARAMETER",
    "MAX_PARAMETER_CHARS",
    "OUTBOUND_REF_PARAMETER",
    "STREAM_TOKEN_PARAMETER",
    "TwimlAnswers",
    "validate_callback_url",
    "validate_stream_url",
]

CALL_SID_PARAMETER: Final = "CallSid"
CALLER_PARAMETER: Final = "From"
CALLED_PARAMETER: Final = "To"
STREAM_TOKEN_PARAMETER: Final = "streamToken"
OUTBOUND_REF_PARAMETER: Final = "outboundRef"
"""Names of the ``<Parameter>``s; they come back in ``Started.custom_parameters``.
An outbound call's stream token is bound to its ``outboundRef`` (its CallSid is not
known when its TwiML is written: see :mod:`gateway.bridge.outbound`)."""

MAX_PARAMETER_CHARS: Final = 500
"""Twilio's limit: a ``<Parameter>``'s name plus value must stay under this."""

_INVALID_XML_CHARS: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def validate_stream_url(url: str) -> str:
    """Check a ``<Stream url>``: ``wss://host/path`` (``ws://`` only for a loopback
    host), no query, fragment or userinfo."""
    parts = urlsplit(url)
    if parts.scheme not in ("wss", "ws"):
        raise ValueError(f"stream URL must use wss://, not {parts.scheme or 'no scheme'}")
    if not parts.hostname:
        raise ValueError("stream URL has no host")
    if parts.scheme == "ws" and not is_loopback_host(parts.hostname):
        raise ValueError("stream URL must use wss:// (ws:// only for loopback hosts)")
    if parts.query or "?" in url:
        raise ValueError("stream URL must not carry a query string (use <Parameter>)")
    if parts.fragment or "#" in url:
        raise ValueError("stream URL must not carry a fragment")
    if "@" in parts.netloc:
        raise ValueError("stream URL must not carry credentials")
    _check_text("stream URL", url)
    return url


def validate_callback_url(url: str) -> str:
    """Check a status callback URL: absolute ``https://`` with a host (``http://`` only
    for a loopback host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("callback URL must be an absolute http(s) URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("callback URL must use https:// (http:// only for loopback hosts)")
    if parts.fragment:
        raise ValueError("callback URL must not carry a fragment")
    _check_text("callback URL", url)
    return url


def _check_text(what: str, text: str) -> None:
    if _INVALID_XML_CHARS.search(text):
        raise ValueError(f"{what} contains characters XML cannot carry")


class TwimlAnswers:
    """The gateway's TwiML, with the static configuration validated up front."""

    def __init__(
        self,
        *,
        stream_url: str,
        stream_status_callback_url: str | None,
        fallback_message: str | None,
        busy_message: str,
        greeting: str | None = None,
        voice: str | None = None,
        language: str | None = None,
    ) -> None:
        """
        :param stream_url: public ``wss://`` URL of the Media Streams route
            (``ws://`` for a loopback host).
        :param stream_status_callback_url: where Twilio posts ``stream-started`` /
            ``stream-stopped`` / ``stream-error``; None omits the attribute.
        :param fallback_message: spoken when the stream ends with the call still up;
            None or empty says nothing before hanging up.
        :param busy_message: spoken before hanging up when the gateway is full.
        :param greeting: spoken before the stream starts; None or empty for none.
        :param voice: ``<Say voice>`` (e.g. ``Polly.Joanna``); None for Twilio's default.
        :param language: ``<Say language>`` (e.g. ``en-US``); None for Twilio's default.
        """
        self.stream_url: Final = validate_stream_url(stream_url)
        self.stream_status_callback_url: Final = (
            validate_callback_url(stream_status_callback_url)
            if stream_status_callback_url
            else None
        )
        for what, text in (
            ("fallback message", fallback_message),
            ("busy message", busy_message),
            ("greeting", greeting),
            ("voice", voice),
            ("language", language),
        ):
            if text is not None:
                _check_text(what, text)
        if not busy_message.strip():
            raise ValueError("busy message is empty")
        self._fallback: Final = fallback_message or None
        self._busy: Final = busy_message
        self._greeting: Final = greeting or None
        self._voice: Final = voice or None
        self._language: Final = language or None

    def connect(self, *, call_sid: str, caller: str, called: str, stream_token: str) -> str:
        """The answer that streams the call to the gateway (an XML document)."""
        return self._streamed(
            ((CALL_SID_PARAMETER, call_sid), (CALLER_PARAMETER, caller),
             (CALLED_PARAMETER, called), (STREAM_TOKEN_PARAMETER, stream_token)),
            greeting=self._greeting)

    def connect_outbound(
        self, *, reference: str, caller: str, called: str, stream_token: str
    ) -> str:
        """The inline TwiML of an outbound call placed by the admin API: ``<Connect><Stream>``
        (same URL and status callback as :meth:`connect`) with ``outboundRef`` (the token
        is bound to it), ``From``, ``To`` and the stream token, then the spoken fallback
        and ``<Hangup/>``.  No greeting: the person called hears the assistant first."""
        return self._streamed(
            ((OUTBOUND_REF_PARAMETER, reference), (CALLER_PARAMETER, caller),
             (CALLED_PARAMETER, called), (STREAM_TOKEN_PARAMETER, stream_token)),
            greeting=None)

    def _streamed(self, parameters: tuple[tuple[str, str], ...], greeting: str | None) -> str:
        """[greeting] <Connect><Stream> with ``parameters``, the fallback, <Hangup/>."""
        _check_parameters(parameters)
        response = VoiceResponse()
        if greeting:
            self._say(response, greeting)
        stream = response.connect().stream(
            url=self.stream_url,
            status_callback=self.stream_status_callback_url,
            status_callback_method="POST" if self.stream_status_callback_url else None,
        )
        for name, value in parameters:
            stream.parameter(name=name, value=value)
        if self._fallback:
            self._say(response, self._fallback)
        response.hangup()
        return str(response)

    def busy(self) -> str:
        """The answer when no call can be taken: say the busy message, hang up."""
        response = VoiceResponse()
        self._say(response, self._busy)
        response.hangup()
        return str(response)

    def _say(self, response: VoiceResponse, text: str) -> None:
        response.say(text, voice=self._voice, language=self._language)


def _check_parameters(parameters: Sequence[tuple[str, str]]) -> None:
    for name, value in parameters:
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            raise ValueError(f"<Parameter {name}> is {len(value)} characters: too long")
        _check_text(f"<Parameter {name}>", value)
