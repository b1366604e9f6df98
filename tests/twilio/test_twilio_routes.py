"""The Twilio webhooks through the real twisted.web stack (StubTreq over the Klein app):
signed voice webhook -> <Connect><Stream> TwiML with a valid stream token; forged,
missing and tampered signatures -> 403 on every route; busy TwiML at capacity and while
draining; 413, 400, wrong account; status and stream-status callbacks; the real
Switchboard satisfies CallControl."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode

import known_secrets
import pytest
from ini import minimal_ini
from inmemory import result_of
from klein import Klein
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Site

from gateway.admission import Admission, Refusal
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.bridge.session import CallInfo, CallSession, MediaSocket, VapiLink
from gateway.bridge.switchboard import Switchboard
from gateway.config import Settings, parse_settings
from gateway.twilio.routes import (
    STREAM_ERROR_CAUSE,
    CallControl,
    StreamSession,
    TwilioRoutes,
    signature_validator_from,
    status_callback_url,
    stream_tokens_from,
    stream_url,
    twiml_answers_from,
)
from gateway.twilio.stream import Started
from gateway.twilio.token import StreamTokens
from gateway.vapi.calls import CreatedCall

AUTH_TOKEN = known_secrets.TWILIO_AUTH_TOKEN
PUBLIC = "https://gw.example.com"
ACCOUNT = "AC" + "0" * 32
CALL_SID = "CA" + "1" * 32
CALLER = "+15550001111"
CALLED = "+15550002222"
NOW = 1_700_000_000.0


def make_settings(gateway: dict[str, str] | None = None, **twilio: str) -> Settings:
    text = minimal_ini(gateway={"public_url": PUBLIC, **(gateway or {})}, twilio=twilio)
    return parse_settings(text, "gw.ini", {})


@dataclass
class FakeCalls:
    """The switchboard as the routes see it: records every call."""

    opened: list[CallInfo] = field(default_factory=list)
    statuses: list[tuple[str, str]] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    fail_open: bool = False

    def open_call(self, info: CallInfo) -> object:
        if self.fail_open:
            raise RuntimeError("switchboard bug")
        self.opened.append(info)
        self.live.add(info.call_sid)
        return None

    def holds(self, call_sid: str) -> bool:
        return call_sid in self.live

    def call_status(self, call_sid: str, status: str) -> bool:
        self.statuses.append((call_sid, status))
        if status in {"completed", "busy", "failed", "no-answer", "canceled"}:
            return self.end_call(call_sid, "twilio-status") is not None
        return False

    def end_call(self, call_sid: str, cause: str) -> object:
        self.ended.append((call_sid, cause))
        if call_sid in self.live:
            self.live.discard(call_sid)
            return True
        return None

    def attach_stream(self, stream: MediaSocket, started: Started) -> StreamSession | None:
        raise AssertionError("not used by the routes")


@dataclass
class LiveCallDouble:
    """Something the registry can hold (to fill capacity)."""

    call_sid: str

    def end(self, cause: str) -> Deferred[None]:
        return succeed(None)


class Rig:
    """TwilioRoutes on a Klein app, driven through StubTreq."""

    def __init__(self, settings: Settings | None = None, max_calls: int = 2) -> None:
        self.settings = settings or make_settings()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.registry = InMemoryCallRegistry()
        self.admission = Admission(self.registry, max_calls)
        self.calls = FakeCalls()
        self.tokens = stream_tokens_from(self.settings)
        self.app = Klein()
        TwilioRoutes(
            self.settings,
            validator=signature_validator_from(self.settings),
            tokens=self.tokens,
            twiml=twiml_answers_from(self.settings),
            admission=self.admission,
            calls=self.calls,
            clock=self.clock,
        ).register(self.app)
        # StubTreq sets its methods dynamically
        self.stub: Any = StubTreq(self.app.resource())

    def post(
        self,
        path: str,
        params: dict[str, str],
        *,
        signature: str | None = "sign",
        signed_url: str | None = None,
        signed_params: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """POST form ``params`` to ``path``; by default correctly signed over the public URL."""
        all_headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signature == "sign":
            url = signed_url or PUBLIC + path
            signature = sign(url, params if signed_params is None else signed_params)
        if signature is not None:
            all_headers["X-Twilio-Signature"] = signature
        all_headers.update(headers or {})
        data = urlencode(params).encode() if body is None else body
        # The Host the gateway sees is not the public one: signatures never use it.
        response = result_of(
            self.stub.post("http://10.0.0.5:8080" + path, data=data, headers=all_headers)
        )
        content = result_of(self.stub.content(response))
        return Answer(response.code, response.headers, content)


@dataclass
class Answer:
    code: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return (
            None
            if not values
            else str(values[0].decode() if isinstance(values[0], bytes) else values[0])
        )

    def twiml(self) -> ET.Element:
        assert self.code == 200, (self.code, self.body)
        content_type = self.header("content-type")
        assert content_type is not None
        assert content_type.startswith("text/xml")
        return ET.fromstring(self.body)


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, params))


def voice_params(**overrides: str) -> dict[str, str]:
    params = {
        "CallSid": CALL_SID,
        "AccountSid": ACCOUNT,
        "From": CALLER,
        "To": CALLED,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    params.update(overrides)
    return {name: value for name, value in params.items() if value != "<drop>"}


def status_params(status: str = "completed", sequence: str = "3") -> dict[str, str]:
    return voice_params(CallStatus=status, SequenceNumber=sequence, CallDuration="42")


def stream_status_params(event: str, error: str = "") -> dict[str, str]:
    params = {
        "AccountSid": ACCOUNT,
        "CallSid": CALL_SID,
        "StreamSid": "MZ" + "2" * 32,
        "StreamName": "MZ" + "2" * 32,
        "StreamEvent": event,
        "Timestamp": "2025-01-01T00:00:00Z",
    }
    if error:
        params["StreamError"] = error
    return params


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event.get("event") == name]


# -- the voice webhook ---------------------------------------------------------------


def test_a_signed_voice_webhook_is_answered_with_connect_stream() -> None:
    rig = Rig()
    answer = rig.post("/twilio/voice", voice_params())
    root = answer.twiml()
    assert answer.header("cache-control") == "no-store"
    assert [child.tag for child in root] == ["Connect", "Say", "Hangup"]
    stream = root.find("Connect/Stream")
    assert stream is not None
    assert stream.attrib == {
        "url": "wss://gw.example.com/twilio/media",
        "statusCallback": "https://gw.example.com/twilio/stream-status",
        "statusCallbackMethod": "POST",
    }
    parameters = {p.attrib["name"]: p.attrib["value"] for p in stream}
    assert set(parameters) == {"CallSid", "From", "To", "streamToken"}
    assert (parameters["CallSid"], parameters["From"], parameters["To"]) == (
        CALL_SID,
        CALLER,
        CALLED,
    )
    assert root[1].text == rig.settings.twilio.fallback_message
    # The token is genuine, bound to this call, and single-use.
    token = parameters["streamToken"]
    assert rig.tokens.verify(token, "CA" + "9" * 32, NOW).reason == "wrong-call"
    assert rig.tokens.verify(token, CALL_SID, NOW + 1).ok
    assert rig.tokens.verify(token, CALL_SID, NOW + 2).reason == "replayed"
    assert rig.calls.opened == [CallInfo(CALL_SID, CALLER, CALLED, ACCOUNT)]


def test_the_signature_covers_the_query_string_of_the_public_url() -> None:
    rig = Rig()
    answer = rig.post("/twilio/voice?tenant=a%20b", voice_params())
    assert answer.code == 200
    assert len(rig.calls.opened) == 1


def test_a_greeting_comes_before_the_stream() -> None:
    rig = Rig(make_settings(greeting="Connecting you.", say_voice="Polly.Joanna"))
    root = rig.post("/twilio/voice", voice_params()).twiml()
    assert [child.tag for child in root] == ["Say", "Connect", "Say", "Hangup"]
    assert root[0].text == "Connecting you."
    assert root[0].attrib["voice"] == "Polly.Joanna"


@pytest.mark.parametrize(
    ("refusal", "prepare"),
    [
        (Refusal.CAPACITY, "fill"),
        (Refusal.DRAINING, "drain"),
    ],
)
def test_a_refused_call_hears_the_busy_message(
    refusal: Refusal, prepare: str, log_events: list[dict[str, Any]]
) -> None:
    rig = Rig(max_calls=1)
    if prepare == "fill":
        rig.registry.add(LiveCallDouble("CA" + "7" * 32))
    else:
        rig.admission.draining = True
    root = rig.post("/twilio/voice", voice_params()).twiml()
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root[0].text == rig.settings.twilio.busy_message
    assert rig.calls.opened == []
    assert rig.admission.refused[refusal] == 1
    (line,) = named(log_events, "call refused")
    assert line["reason"] == refusal.value
    assert line["call_sid"] == CALL_SID


def test_a_failing_switchboard_answers_busy_and_logs(log_events: list[dict[str, Any]]) -> None:
    rig = Rig()
    rig.calls.fail_open = True
    root = rig.post("/twilio/voice", voice_params()).twiml()
    assert [child.tag for child in root] == ["Say", "Hangup"]
    (line,) = named(log_events, "opening the call failed; answering busy")
    assert "log_failure" in line


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        (voice_params(CallSid="<drop>"), b"missing CallSid"),
        (voice_params(CallSid=""), b"missing CallSid"),
        (voice_params(CallSid="CA 1; drop"), b"malformed CallSid"),
    ],
)
def test_a_voice_webhook_without_a_usable_call_sid_is_400(
    params: dict[str, str], reason: bytes
) -> None:
    rig = Rig()
    answer = rig.post("/twilio/voice", params)
    assert (answer.code, answer.body) == (400, reason)
    assert rig.calls.opened == []


def test_an_unusable_caller_id_is_400_without_opening_a_call() -> None:
    rig = Rig()
    answer = rig.post("/twilio/voice", voice_params(From="x" * 600))
    assert answer.code == 400
    assert rig.calls.opened == []


def test_a_webhook_for_another_account_is_forbidden(log_events: list[dict[str, Any]]) -> None:
    rig = Rig(make_settings(account_sid=ACCOUNT))
    other = voice_params(AccountSid="AC" + "f" * 32)
    assert rig.post("/twilio/voice", other).code == 403
    assert rig.post("/twilio/status", {**other, "CallStatus": "completed"}).code == 403
    assert rig.calls.opened == []
    assert rig.calls.statuses == []
    assert len(named(log_events, "twilio webhook refused: wrong account")) == 2
    assert rig.post("/twilio/voice", voice_params()).code == 200


def test_only_post_is_routed() -> None:
    rig = Rig()
    response = result_of(rig.stub.get("http://10.0.0.5:8080/twilio/voice"))
    assert response.code == 405


# -- signatures on every route -------------------------------------------------------

ROUTES = {
    "/twilio/voice": voice_params(),
    "/twilio/status": status_params(),
    "/twilio/stream-status": stream_status_params("stream-error", "31921"),
}


def forgeries(path: str, params: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        "missing": {"signature": None},
        "empty": {"signature": ""},
        "garbage": {"signature": "not-a-signature"},
        "other-token": {"signature": sign(PUBLIC + path, params, "another-auth-token-000000")},
        "tampered-parameter": {"signed_params": {**params, "From": "+15559999999"}},
        "extra-parameter": {"signed_params": params, "params": {**params, "Digits": "1"}},
        "signed-for-the-internal-host": {"signed_url": "http://10.0.0.5:8080" + path},
        "signed-for-another-path": {"signed_url": PUBLIC + "/elsewhere"},
    }


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize("forgery", sorted(forgeries("/", {})))
def test_forged_missing_and_tampered_signatures_are_403(
    path: str, forgery: str, log_events: list[dict[str, Any]]
) -> None:
    rig = Rig()
    params = ROUTES[path]
    kwargs = dict(forgeries(path, params)[forgery])
    answer = rig.post(path, kwargs.pop("params", params), **kwargs)
    assert (answer.code, answer.body) == (403, b"forbidden")
    assert rig.calls.opened == []
    assert rig.calls.ended == rig.calls.statuses == []
    (line,) = named(log_events, "twilio webhook refused: bad signature")
    expected = "missing-signature" if forgery in ("missing", "empty") else "mismatch"
    assert line["reason"] == expected
    assert line["route"] == path.rsplit("/", 1)[1]
    signature = kwargs.get("signature")
    rendered = json.dumps(line, default=repr)
    if signature:
        assert signature not in rendered
    assert AUTH_TOKEN not in rendered


def test_the_previous_auth_token_still_validates_during_rotation() -> None:
    rig = Rig(make_settings(previous_auth_token="old-auth-token-1234567890"))
    params = voice_params()
    old = sign(PUBLIC + "/twilio/voice", params, "old-auth-token-1234567890")
    assert rig.post("/twilio/voice", params, signature=old).code == 200


def test_with_validation_off_every_request_logs_a_warning(
    log_events: list[dict[str, Any]],
) -> None:
    rig = Rig(make_settings(validate_signatures="false"))
    assert rig.post("/twilio/voice", voice_params(), signature=None).code == 200
    assert rig.post("/twilio/status", status_params(), signature="forged").code == 204
    warnings = named(
        log_events, "twilio signature validation is disabled: webhook accepted unchecked"
    )
    assert [line["route"] for line in warnings] == ["voice", "status"]


# -- body size -----------------------------------------------------------------------


def test_a_body_over_max_body_size_is_413() -> None:
    rig = Rig(make_settings(max_body_size="1024"))
    params = voice_params(Padding="x" * 1100)
    answer = rig.post("/twilio/voice", params)
    assert answer.code == 413
    assert rig.calls.opened == []
    # Just under the limit is fine.
    small = voice_params(Padding="x" * 700)
    assert rig.post("/twilio/voice", small).code == 200


def raw_request(site: Site, request: bytes) -> bytes:
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    channel.connectionLost(Failure(ConnectionError("test over")))
    return bytes(transport.value())


def chunked(body: bytes, size: int = 100) -> bytes:
    out = b""
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def test_a_chunked_body_over_the_limit_is_413_by_its_actual_size() -> None:
    rig = Rig(make_settings(max_body_size="1024"))
    clock = Clock()
    site = Site(rig.app.resource(), reactor=clock)
    params = voice_params(Padding="x" * 1100)
    body = urlencode(params).encode()
    head = (
        b"POST /twilio/voice HTTP/1.1\r\nHost: 10.0.0.5\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"X-Twilio-Signature: " + sign(PUBLIC + "/twilio/voice", params).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    response = raw_request(site, head + chunked(body))
    assert response.startswith(b"HTTP/1.1 413 ")
    assert rig.calls.opened == []
    # The same request under the limit goes through the same path to a 200.
    params = voice_params(Padding="x" * 100)
    body = urlencode(params).encode()
    head = head.replace(
        head.split(b"X-Twilio-Signature: ")[1].split(b"\r\n")[0],
        sign(PUBLIC + "/twilio/voice", params).encode(),
    )
    assert raw_request(site, head + chunked(body)).startswith(b"HTTP/1.1 200 ")
    assert clock.getDelayedCalls() == []


# -- status callbacks ----------------------------------------------------------------


def test_a_terminal_call_status_ends_the_call_and_duplicates_are_harmless(
    log_events: list[dict[str, Any]],
) -> None:
    rig = Rig()
    rig.post("/twilio/voice", voice_params())
    first = rig.post("/twilio/status", status_params("completed", "3"))
    assert (first.code, first.body) == (204, b"")
    again = rig.post("/twilio/status", status_params("completed", "3"))
    late = rig.post("/twilio/status", status_params("ringing", "1"))  # out of order
    assert again.code == late.code == 204
    assert rig.calls.statuses == [
        (CALL_SID, "completed"),
        (CALL_SID, "completed"),
        (CALL_SID, "ringing"),
    ]
    lines = named(log_events, "call status")
    assert [(line["status"], line["ended_call"]) for line in lines] == [
        ("completed", True),
        ("completed", False),
        ("ringing", False),
    ]
    assert all(line["call_sid"] == CALL_SID for line in lines)


def test_a_call_status_without_status_is_400() -> None:
    rig = Rig()
    params = status_params()
    del params["CallStatus"]
    answer = rig.post("/twilio/status", params)
    assert (answer.code, answer.body) == (400, b"missing CallStatus")
    assert rig.calls.statuses == []


def test_stream_error_ends_the_call(log_events: list[dict[str, Any]]) -> None:
    rig = Rig()
    answer = rig.post("/twilio/stream-status", stream_status_params("stream-error", "31920"))
    assert (answer.code, answer.body) == (204, b"")
    assert rig.calls.ended == [(CALL_SID, STREAM_ERROR_CAUSE)]
    (line,) = named(log_events, "stream error reported by twilio; ending the call")
    assert (line["call_sid"], line["stream_error"]) == (CALL_SID, "31920")


@pytest.mark.parametrize("event", ["stream-started", "stream-stopped", "stream-whatever"])
def test_other_stream_events_are_only_logged(event: str, log_events: list[dict[str, Any]]) -> None:
    rig = Rig()
    assert rig.post("/twilio/stream-status", stream_status_params(event)).code == 204
    assert rig.calls.ended == []
    (line,) = named(log_events, "stream status")
    assert (line["stream_event"], line["call_sid"]) == (event, CALL_SID)


# -- URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("public", "stream", "callback"),
    [
        (
            "https://gw.example.com",
            "wss://gw.example.com/twilio/media",
            "https://gw.example.com/twilio/stream-status",
        ),
        (
            "https://gw.example.com:8443/prefix/",
            "wss://gw.example.com:8443/prefix/twilio/media",
            "https://gw.example.com:8443/prefix/twilio/stream-status",
        ),
        (
            "http://127.0.0.1:8080",
            "ws://127.0.0.1:8080/twilio/media",
            "http://127.0.0.1:8080/twilio/stream-status",
        ),
    ],
)
def test_stream_and_callback_urls(public: str, stream: str, callback: str) -> None:
    settings = make_settings({"public_url": public})
    assert stream_url(settings) == stream
    assert status_callback_url(settings) == callback
    twiml = twiml_answers_from(settings)  # validates both URLs
    assert (twiml.stream_url, twiml.stream_status_callback_url) == (stream, callback)


# -- the real switchboard fits ---------------------------------------------------------


class NoVapi:
    def create_call(self, choice: Any, audio: Any, overrides: Any = None) -> Deferred[Any]:
        return Deferred()


def no_links(session: CallSession, created: CreatedCall) -> VapiLink:
    raise AssertionError("no Vapi link in this test")


def test_the_switchboard_satisfies_call_control() -> None:
    settings = make_settings()
    registry = InMemoryCallRegistry()
    admission = Admission(registry, 5)
    switchboard = Switchboard(settings, registry, admission, Clock(), NoVapi(), no_links, None)
    calls: CallControl = switchboard  # checked by mypy: the real thing fits the Protocol
    tokens: StreamTokens = stream_tokens_from(settings)
    assert calls.call_status(CALL_SID, "completed") is False
    assert calls.end_call(CALL_SID, "test") is None
    assert tokens.ttl_seconds == settings.twilio.stream_token_ttl



def test_a_retried_webhook_for_a_held_call_skips_admission() -> None:
    rig = Rig(max_calls=1)
    first = rig.post("/twilio/voice", voice_params()).twiml()
    assert [child.tag for child in first] == ["Connect", "Say", "Hangup"]
    rig.registry.add(LiveCallDouble(CALL_SID))  # the call now fills the only slot
    again = rig.post("/twilio/voice", voice_params()).twiml()  # Twilio retries
    assert [child.tag for child in again] == ["Connect", "Say", "Hangup"]
    other = rig.post("/twilio/voice", voice_params(CallSid="CA" + "3" * 32)).twiml()
    assert [child.tag for child in other] == ["Say", "Hangup"]
