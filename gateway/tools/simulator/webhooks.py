"""Where the simulated Twilio sends its requests, and how it signs them.

:class:`GatewayTarget` holds the two base URLs of a gateway: the **public** one
(``[gateway] public_url``), which Twilio signs over and which the TwiML's URLs
start with, and the one the simulator actually connects to (``--url``, e.g. a
daemon on loopback behind what would be a TLS terminator in production).
:meth:`GatewayTarget.local` maps any public URL (http(s) or its ws(s) twin) onto
the connect URL; URLs elsewhere are used as they are.  Two optional bases send parts
of a call elsewhere, as a load balancer in front of several instances may:
``stream_url`` (``--stream-url``) takes the media socket
(:meth:`GatewayTarget.local_stream`), ``status_callback_url`` (``--status-url``)
the terminal call status callback (:meth:`GatewayTarget.local_status`).

:class:`TwilioSigner` computes ``X-Twilio-Signature`` with the ``twilio`` library's
``RequestValidator.compute_signature``: over the public URL plus the sorted form
parameters for webhooks, over the stream URL with no parameters for the media
socket's upgrade, exactly as Twilio does.

The form builders give the parameters Twilio posts with the voice webhook, the
call status callback and the ``<Stream statusCallback>`` events.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

from gateway.config import Settings

__all__ = [
    "API_VERSION",
    "DEFAULT_ACCOUNT_SID",
    "GatewayTarget",
    "TwilioSigner",
    "call_status_form",
    "stream_event_form",
    "voice_form",
]

API_VERSION: Final = "2010-04-01"
DEFAULT_ACCOUNT_SID: Final = "AC" + "0" * 32
"""Used when neither the ini (``[twilio] account_sid``) nor ``--account-sid`` gives one."""

_WS_SCHEMES: Final = {"http": "ws", "https": "wss"}


def _ws_twin(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=_WS_SCHEMES.get(parts.scheme, parts.scheme)))


@dataclass(frozen=True)
class GatewayTarget:
    """A gateway as the simulated Twilio sees it (the auth token never shows in ``repr``)."""

    public_url: str
    auth_token: str = field(repr=False)
    url: str = ""
    """Where requests really go; empty: the public URL itself."""
    voice_path: str = "/twilio/voice"
    status_path: str = "/twilio/status"
    account_sid: str = DEFAULT_ACCOUNT_SID
    stream_url: str = ""
    """Where the media socket really connects (its ws twin); empty: ``url``."""
    status_callback_url: str = ""
    """Where the terminal call status callback really goes; empty: ``url``."""

    def __post_init__(self) -> None:
        for name in ("public_url", "url", "stream_url", "status_callback_url"):
            value = getattr(self, name)
            if value and urlsplit(value).scheme not in ("http", "https"):
                raise ValueError(f"{name} must be an http:// or https:// URL, not {value!r}")
        if not self.auth_token:
            raise ValueError("the auth token is empty")

    @classmethod
    def from_settings(cls, settings: Settings, url: str = "",
                      account_sid: str = "") -> GatewayTarget:
        """The target described by the gateway's own ini file."""
        twilio = settings.twilio
        if twilio.auth_token is None:
            raise ValueError("[twilio] auth_token is not set")
        return cls(
            public_url=settings.gateway.public_url,
            auth_token=twilio.auth_token.reveal(),
            url=url,
            voice_path=twilio.voice_path,
            status_path=twilio.status_path,
            account_sid=account_sid or twilio.account_sid or DEFAULT_ACCOUNT_SID,
        )

    @property
    def voice_url(self) -> str:
        """The public URL of the voice webhook (what is signed)."""
        return self.public_url.rstrip("/") + self.voice_path

    @property
    def status_url(self) -> str:
        """The public URL of the call status callback (what is signed)."""
        return self.public_url.rstrip("/") + self.status_path

    def local(self, public: str) -> str:
        """``public`` with the public base replaced by the connect URL (same scheme kind)."""
        return self._onto(public, self.url)

    def local_stream(self, public: str) -> str:
        """The ``<Stream url>`` mapped onto ``stream_url`` (else the connect URL)."""
        return self._onto(public, self.stream_url or self.url)

    def local_status(self, public: str) -> str:
        """The status callback URL mapped onto ``status_callback_url`` (else the connect
        URL)."""
        return self._onto(public, self.status_callback_url or self.url)

    def _onto(self, public: str, connect: str) -> str:
        if not connect:
            return public
        public_base = self.public_url.rstrip("/")
        connect_base = connect.rstrip("/")
        for public_prefix, connect_prefix in (
            (public_base, connect_base),
            (_ws_twin(public_base), _ws_twin(connect_base)),
        ):
            if public == public_prefix or public.startswith(public_prefix + "/"):
                return connect_prefix + public[len(public_prefix) :]
        return public


class TwilioSigner:
    """``X-Twilio-Signature`` values for one Auth Token."""

    __slots__ = ("_validator",)

    def __init__(self, auth_token: str) -> None:
        self._validator: Final = RequestValidator(auth_token)

    def __repr__(self) -> str:
        return "<TwilioSigner>"

    def sign_form(self, url: str, params: Mapping[str, str]) -> str:
        """A form POST: the full public URL, then every parameter sorted by name."""
        return str(self._validator.compute_signature(url, dict(params)))

    def sign_websocket(self, stream_url: str) -> str:
        """The media socket's upgrade: the ``wss://`` URL from the TwiML, no parameters."""
        return str(self._validator.compute_signature(stream_url, {}))


def voice_form(*, call_sid: str, account_sid: str, caller: str, called: str) -> dict[str, str]:
    """The voice webhook's parameters for an inbound call that is ringing."""
    return {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": called,
        "Caller": caller,
        "Direction": "inbound",
        "From": caller,
        "To": called,
    }


def call_status_form(*, call_sid: str, account_sid: str, caller: str, called: str,
                     status: str, duration_s: int, wall_time: float) -> dict[str, str]:
    """The call status callback Twilio posts when the call ends (``completed``)."""
    form = voice_form(call_sid=call_sid, account_sid=account_sid, caller=caller, called=called)
    form.update({
        "CallStatus": status,
        "CallDuration": str(duration_s),
        "CallbackSource": "call-progress-events",
        "SequenceNumber": "0",
        "Timestamp": _rfc2822(wall_time),
    })
    return form


def stream_event_form(*, call_sid: str, account_sid: str, stream_sid: str,
                      stream_name: str | None, event: str, wall_time: float) -> dict[str, str]:
    """A ``<Stream statusCallback>`` event (``stream-started`` / ``stream-stopped``)."""
    return {
        "AccountSid": account_sid,
        "CallSid": call_sid,
        "StreamEvent": event,
        "StreamName": stream_name or stream_sid,
        "StreamSid": stream_sid,
        "Timestamp": datetime.datetime.fromtimestamp(wall_time, datetime.UTC).isoformat(),
    }


def _rfc2822(wall_time: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall_time, datetime.UTC)
    return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")
