"""The admin API through StubTreq over its Klein resource, with a real Switchboard on a
Clock, Twilio's REST API faked by a twisted.web resource, and (for outbound calls) the
real media socket reached over twisted.test.iosim.

Covers the Bearer token, listing and ending calls, placing outbound calls (the request
Twilio gets, its inline TwiML, Twilio's errors), and an outbound call's stream: its
token is checked against the outboundRef and its CallSid against the pending entry,
then the call opens with the assistant chosen when it was placed.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs

import known_secrets
import pytest
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from ini import minimal_ini
from inmemory import pipe, txaio_on
from klein import Klein
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from gateway.admin import (
    MAX_BODY_BYTES,
    AdminApi,
    parse_place_call,
    ring_timeout,
    twilio_error_status,
)
from gateway.admission import Admission
from gateway.bridge.outbound import OutboundCalls, PendingTableFullError
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.bridge.session import CallInfo, CallSession
from gateway.bridge.switchboard import Switchboard
from gateway.config import Settings, parse_settings
from gateway.twilio.media import media_stream_factory
from gateway.twilio.rest import HTTPClient, TwilioCredentials, TwilioRestClient
from gateway.twilio.routes import signature_validator_from, stream_tokens_from, twiml_answers_from
from gateway.twilio.stream import Audio, Started
from gateway.vapi.assistants import AssistantById
from gateway.vapi.calls import CreatedCall, SocketUrl
from gateway.vapi.link import (
    Closed,
    Connecting,
    LinkClosedReason,
    LinkFailure,
    LinkState,
    Open,
)

ADMIN_TOKEN = known_secrets.ADMIN_TOKEN
AUTH_TOKEN = known_secrets.TWILIO_AUTH_TOKEN
ACCOUNT = "AC" + "a" * 32
PUBLIC = "https://gw.example.com"
STREAM_URL = "wss://gw.example.com/twilio/media"
GATEWAY_NUMBER = "+15550002222"
CALLEE = "+15550001111"
CALL_SID = "CA" + "1" * 32
OTHER_CALL_SID = "CA" + "9" * 32
STREAM_SID = "MZ" + "2" * 32
NOW = 1_700_000_000.0


# -- fakes: Vapi, its links, the Twilio media socket, Twilio's REST API --------------------


@dataclass
class FakeLink:
    owner: Any
    created: CreatedCall
    state: LinkState = field(default_factory=lambda: Connecting(0, 1))
    messages: list[Any] = field(default_factory=list)
    stops: int = 0

    def start(self) -> None:
        pass

    def open(self) -> None:
        old, self.state = self.state, Open(1)
        self.owner.on_link_transition(old, self.state)
        self.owner.on_link_open()

    def stop(self) -> Deferred[LinkClosedReason]:
        self.stops += 1
        if isinstance(self.state, Open):
            self.messages.append("end-call")
        self.state = Closed(LinkClosedReason.STOPPED)
        self.owner.on_link_closed(LinkClosedReason.STOPPED)
        return succeed(LinkClosedReason.STOPPED)

    def when_open(self) -> Deferred[None]:
        return succeed(None)

    def send_audio(self, audio: bytes) -> bool:
        return isinstance(self.state, Open)

    def send_message(self, message: Any) -> bool:
        return isinstance(self.state, Open)


class FakeVapi:
    """Vapi's REST side: each create_call is answered when the test says."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, Any, Any]] = []
        self.pending: list[Deferred[CreatedCall]] = []

    def create_call(self, choice: Any, audio: Any, overrides: Any = None
                    ) -> Deferred[CreatedCall]:
        self.requests.append((choice, audio, overrides))
        d: Deferred[CreatedCall] = Deferred()
        self.pending.append(d)
        return d

    def answer(self) -> None:
        n = len(self.requests)
        self.pending.pop(0).callback(
            CreatedCall(f"vapi-call-{n}", SocketUrl(f"ws://127.0.0.1:9/call-{n}/transport")))


@dataclass
class FakeStream:
    closes: list[tuple[int, str]] = field(default_factory=list)

    def send_media(self, payload: bytes) -> None:
        pass

    def send_mark(self, name: str) -> None:
        pass

    def send_clear(self) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


class FakeHangups:
    """The switchboard's REST hang-up."""

    def __init__(self) -> None:
        self.hung_up: list[str] = []

    def hang_up(self, call_sid: str) -> Deferred[Any]:
        self.hung_up.append(call_sid)
        return succeed("hung-up")


TwilioAnswer = tuple[int, Any] | None  # status and JSON body; None never answers


class FakeTwilio(Resource):
    """Twilio's ``Calls.json``: answers each POST with the next scripted answer."""

    isLeaf = True

    def __init__(self, *answers: TwilioAnswer) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.waiting: list[Request] = []
        self.cancelled = 0

    def render_POST(self, request: Request) -> bytes | int:
        form = parse_qs(request.content.read().decode()) if request.content else {}
        self.requests.append({"path": request.path.decode(), "form": form})
        answer = self.answers.pop(0) if self.answers else (201, {"sid": CALL_SID})
        if answer is None:
            self.waiting.append(request)
            request.notifyFinish().addErrback(self._lost)
            return NOT_DONE_YET
        status, body = answer
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _lost(self, failure: Failure) -> None:
        self.cancelled += 1

    @property
    def form(self) -> dict[str, list[str]]:
        (request,) = self.requests
        return cast(dict[str, list[str]], request["form"])


# -- the rig -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class AdminRig:
    """A real Switchboard, the admin API over StubTreq, the media socket on a Site."""

    def __init__(self, *twilio_answers: TwilioAnswer, token: str | None = ADMIN_TOKEN,
                 rest: bool = True, **sections: dict[str, str]) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        twilio = {"account_sid": ACCOUNT} if rest else {}
        twilio.update(sections.pop("twilio", {}))
        gateway = {"public_url": PUBLIC, **sections.pop("gateway", {})}
        self.settings: Settings = parse_settings(
            minimal_ini(gateway=gateway, twilio=twilio, **sections), "gw.ini", {})
        self.registry = InMemoryCallRegistry()
        self.admission = Admission(self.registry, self.settings.gateway.max_concurrent_calls)
        self.vapi = FakeVapi()
        self.links: list[FakeLink] = []
        self.hangups = FakeHangups()
        self.board = Switchboard(self.settings, self.registry, self.admission, self.clock,
                                 self.vapi, self._link, self.hangups if rest else None)
        self.twilio = FakeTwilio(*twilio_answers)
        self.twilio_http = StubTreq(self.twilio)
        rest_client = TwilioRestClient(
            cast(HTTPClient, self.twilio_http), self.clock,
            TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN)) if rest else None
        self.tokens = stream_tokens_from(self.settings)
        self.outbound = OutboundCalls(self.board, ttl_seconds=self.tokens.ttl_seconds)
        self.api = AdminApi(self.settings, token=token, switchboard=self.board,
                            twilio_rest=rest_client, tokens=self.tokens,
                            twiml=twiml_answers_from(self.settings), clock=self.clock,
                            outbound=self.outbound)
        self.http: Any = StubTreq(self.api.resource())
        media_app = Klein()
        media_stream_factory(self.settings, validator=signature_validator_from(self.settings),
                             tokens=self.tokens, calls=self.board, clock=self.clock,
                             outbound=self.outbound).register(media_app)
        self.media_site = Site(media_app.resource(), reactor=self.clock)

    def _link(self, owner: Any, created: CreatedCall) -> FakeLink:
        link = FakeLink(owner, created)
        self.links.append(link)
        return link

    def request(self, method: str, path: str, *, body: Any = None,
                authorization: str | None = "default") -> Answer:
        headers = {}
        if authorization == "default":
            authorization = f"Bearer {ADMIN_TOKEN}"
        if authorization is not None:
            headers["Authorization"] = authorization
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        answers: list[Any] = []
        self.http.request(method, "http://127.0.0.1:9464" + path, data=data,
                          headers=headers).addBoth(answers.append)
        self.http.flush()
        assert answers, f"{method} {path}: no answer yet"
        return self.read(answers[0])

    def read(self, response: Any) -> Answer:
        if isinstance(response, Failure):
            response.raiseException()
        contents: list[bytes] = []
        self.http.content(response).addCallback(contents.append)
        headers = {k.decode().lower(): [v.decode() for v in vs]
                   for k, vs in response.headers.getAllRawHeaders()}
        body = json.loads(contents[0]) if contents[0] else None
        return Answer(response.code, body, headers)

    def place(self, **fields: Any) -> Answer:
        body = {"to": CALLEE, "from": GATEWAY_NUMBER, **fields}
        return self.request("POST", "/calls", body=body)

    def scripted_call(self, call_sid: str = CALL_SID) -> tuple[CallSession, FakeStream]:
        """An inbound call as the voice webhook and the media socket open it."""
        session = self.board.open_call(CallInfo(call_sid, CALLEE, GATEWAY_NUMBER, ACCOUNT))
        self.vapi.answer()
        self.links[-1].open()
        stream = FakeStream()
        self.board.attach_stream(stream, Started(call_sid, STREAM_SID, ACCOUNT, {}, ("inbound",)))
        return session, stream


# -- Twilio's end of an outbound call's media socket -----------------------------------------


class TwilioSide(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.closed_with: tuple[bool, int | None, str | None] | None = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_with = (wasClean, code, reason)


@dataclass
class TwilioStream:
    client: TwilioSide
    pump: iosim.IOPump

    def send(self, *messages: dict[str, Any]) -> None:
        for message in messages:
            self.client.sendMessage(json.dumps(message).encode())
        self.pump.flush()


def open_stream(rig: AdminRig) -> TwilioStream:
    """Connect to the media socket as Twilio does (signed upgrade), in memory."""
    signature = RequestValidator(AUTH_TOKEN).compute_signature(STREAM_URL, {})
    factory = WebSocketClientFactory(url=STREAM_URL, headers={"X-Twilio-Signature": signature})
    factory.protocol = TwilioSide
    server = rig.media_site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
    assert server is not None
    client = cast(TwilioSide, factory.buildProtocol(None))
    pump = pipe(server, client, rig.clock)
    pump.flush()
    return TwilioStream(client, pump)


def start_message(parameters: dict[str, str], call_sid: str = CALL_SID) -> dict[str, Any]:
    """Twilio's ``start`` carrying the TwiML's ``<Parameter>``s."""
    return {"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID,
            "start": {"accountSid": ACCOUNT, "streamSid": STREAM_SID, "callSid": call_sid,
                      "tracks": ["inbound"], "customParameters": parameters,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                      "channels": 1}}}


def stream_parameters(twiml: str) -> dict[str, str]:
    root = ET.fromstring(twiml)
    (stream,) = root.iter("Stream")
    return {p.attrib["name"]: p.attrib["value"] for p in stream.iter("Parameter")}


@pytest.fixture
def clean() -> Iterator[list[AdminRig]]:
    """Rigs registered here must end with no delayed call left on their clock."""
    rigs: list[AdminRig] = []
    yield rigs
    for rig in rigs:
        assert rig.clock.getDelayedCalls() == []


# -- authentication, routes ---------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", f"Bearer {ADMIN_TOKEN}x", f"Bearer {ADMIN_TOKEN[:-1]}", "Bearer",
    f"Basic {ADMIN_TOKEN}", f"Token {ADMIN_TOKEN}", ADMIN_TOKEN,
])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/calls"), ("POST", "/calls"), ("GET", f"/calls/{CALL_SID}"),
    ("DELETE", f"/calls/{CALL_SID}"),
])
def test_requests_without_the_right_token_are_refused(
        authorization: str | None, method: str, path: str) -> None:
    rig = AdminRig()
    session, _ = rig.scripted_call()
    answer = rig.request(method, path, authorization=authorization,
                         body={"to": CALLEE, "from": GATEWAY_NUMBER})
    assert answer.status == 401
    assert answer.body == {"error": "unauthorized"}
    assert answer.header("WWW-Authenticate") == 'Bearer realm="vapi-gateway admin"'
    assert not session.ended
    assert rig.twilio.requests == []


def test_the_bearer_scheme_is_case_insensitive() -> None:
    rig = AdminRig()
    assert rig.request("GET", "/calls", authorization=f"bearer  {ADMIN_TOKEN}").status == 200


def test_without_a_configured_token_everything_is_refused() -> None:
    rig = AdminRig(token=None)
    for authorization in (None, "Bearer ", "Bearer None", f"Bearer {ADMIN_TOKEN}"):
        assert rig.request("GET", "/calls", authorization=authorization).status == 401


def test_unknown_routes_are_404_and_wrong_methods_405() -> None:
    rig = AdminRig()
    answer = rig.request("GET", "/nothing-here")
    assert (answer.status, answer.body) == (404, {"error": "not found"})
    assert answer.header("content-type") == "application/json"
    answer = rig.request("PUT", "/calls")
    assert (answer.status, answer.body) == (405, {"error": "method not allowed"})
    assert answer.header("Allow") == "GET, HEAD, POST"
    answer = rig.request("POST", f"/calls/{CALL_SID}")
    assert answer.status == 405
    assert answer.header("Allow") == "DELETE, GET, HEAD"


# -- listing and ending calls ---------------------------------------------------------------


def test_listing_the_active_calls() -> None:
    rig = AdminRig()
    answer = rig.request("GET", "/calls")
    assert (answer.status, answer.body) == (
        200, {"calls": [], "active_calls": 0, "pending_outbound": []})
    session, _ = rig.scripted_call()
    rig.board.tick()
    session.on_stream_audio(Audio(b"\xff" * 160, 0))
    answer = rig.request("GET", "/calls")
    assert answer.status == 200
    assert answer.header("cache-control") == "no-store"
    (call,) = answer.body["calls"]
    assert answer.body["active_calls"] == 1
    assert call["call_sid"] == CALL_SID
    assert (call["from"], call["to"]) == (CALLEE, GATEWAY_NUMBER)
    assert call["state"] == "streaming"
    assert call["vapi_call_id"] == "vapi-call-1"
    assert call["stream_sid"] == STREAM_SID
    assert call["frames_up"] == 1
    assert isinstance(call["started"], float)
    for key in ("lead_ms", "target_lead_ms", "buffered_ms", "frames_down", "underruns",
                "barge_ins", "reconnects"):
        assert key in call
    one = rig.request("GET", f"/calls/{CALL_SID}")
    assert one.status == 200
    assert one.body["call_sid"] == CALL_SID
    missing = rig.request("GET", f"/calls/{OTHER_CALL_SID}")
    assert (missing.status, missing.body) == (404, {"error": "no such call",
                                                    "call_sid": OTHER_CALL_SID})
    session.end("test-over")


def test_hanging_up_an_unknown_call_is_404() -> None:
    rig = AdminRig()
    answer = rig.request("DELETE", f"/calls/{CALL_SID}")
    assert (answer.status, answer.body) == (404, {"error": "no such call", "call_sid": CALL_SID})


def test_hanging_up_ends_the_call_over_rest() -> None:
    rig = AdminRig()
    session, stream = rig.scripted_call()
    answer = rig.request("DELETE", f"/calls/{CALL_SID}")
    assert (answer.status, answer.body) == (200, {
        "call_sid": CALL_SID, "cause": "admin-hangup", "state_before": "streaming",
        "twilio": "rest-hangup", "ended": True})
    assert session.cause == "admin-hangup"
    assert rig.links[0].messages == ["end-call"]
    assert rig.links[0].stops == 1
    assert rig.hangups.hung_up == [CALL_SID]
    assert stream.closes == [(1000, "call ended: admin-hangup")]
    assert len(rig.registry) == 0
    assert rig.request("GET", "/calls").body["calls"] == []
    assert rig.request("DELETE", f"/calls/{CALL_SID}").status == 404


def test_hanging_up_without_rest_closes_the_stream() -> None:
    rig = AdminRig(rest=False)
    session, stream = rig.scripted_call()
    answer = rig.request("DELETE", f"/calls/{CALL_SID}")
    assert answer.status == 200
    assert answer.body["twilio"] == "stream-closed"
    assert session.cause == "admin-hangup"
    assert rig.hangups.hung_up == []
    assert stream.closes == [(1000, "call ended: admin-hangup")]


def test_a_hang_up_still_under_way_is_202() -> None:
    rig = AdminRig()
    session, _ = rig.scripted_call()
    slow: Deferred[Any] = Deferred()
    rig.hangups.hang_up = lambda call_sid: slow  # type: ignore[method-assign]
    answer = rig.request("DELETE", f"/calls/{CALL_SID}")
    assert answer.status == 202
    assert answer.body["ended"] is False
    assert session.ended
    slow.callback("hung-up")


# -- placing outbound calls -----------------------------------------------------------------


def test_outbound_calls_need_rest_credentials() -> None:
    rig = AdminRig(rest=False)
    answer = rig.place()
    assert (answer.status, answer.body) == (
        503, {"error": "outbound calls need [twilio] account_sid"})


def test_placing_a_call(clean: list[AdminRig]) -> None:
    rig = AdminRig((201, {"sid": CALL_SID, "status": "queued"}))
    clean.append(rig)
    answer = rig.place(assistantId="asst-chosen", variables={"name": "Ada"})
    assert answer.status == 201
    assert answer.body == {
        "call_sid": CALL_SID, "status": "queued", "from": GATEWAY_NUMBER, "to": CALLEE,
        "assistant_id": "asst-chosen", "routed": False,
        "stream_deadline_s": rig.tokens.ttl_seconds}
    assert answer.header("Location") == f"/calls/{CALL_SID}"

    (request,) = rig.twilio.requests
    assert request["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json"
    form = rig.twilio.form
    assert form["To"] == [CALLEE]
    assert form["From"] == [GATEWAY_NUMBER]
    assert form["StatusCallback"] == [f"{PUBLIC}/twilio/status"]
    assert form["StatusCallbackEvent"] == ["completed"]
    assert form["StatusCallbackMethod"] == ["POST"]
    assert form["Timeout"] == [str(ring_timeout(rig.tokens.ttl_seconds))] == ["60"]

    root = ET.fromstring(form["Twiml"][0])
    assert [child.tag for child in root] == ["Connect", "Say", "Hangup"]
    (stream,) = list(root[0])
    assert stream.tag == "Stream"
    assert stream.attrib == {"url": STREAM_URL,
                             "statusCallback": f"{PUBLIC}/twilio/stream-status",
                             "statusCallbackMethod": "POST"}
    parameters = stream_parameters(form["Twiml"][0])
    assert set(parameters) == {"outboundRef", "From", "To", "streamToken"}
    assert parameters["outboundRef"].startswith("OB")
    assert len(parameters["outboundRef"]) == 34
    assert (parameters["From"], parameters["To"]) == (GATEWAY_NUMBER, CALLEE)
    assert "Ada" not in form["Twiml"][0]  # variables stay on the server
    # the token is bound to the reference, not to any CallSid
    assert rig.tokens.verify(parameters["streamToken"], CALL_SID, rig.clock.seconds()).reason \
        == "wrong-call"
    assert rig.tokens.verify(parameters["streamToken"], parameters["outboundRef"],
                             rig.clock.seconds()).ok

    (pending,) = rig.outbound.pending(rig.clock.seconds())
    assert (pending.reference, pending.call_sid) == (parameters["outboundRef"], CALL_SID)
    assert pending.choice == AssistantById("asst-chosen")
    assert pending.variables == {"name": "Ada"}
    listing = rig.request("GET", "/calls").body
    assert listing["calls"] == []
    assert listing["pending_outbound"] == [{
        "call_sid": CALL_SID, "from": GATEWAY_NUMBER, "to": CALLEE,
        "assistant_id": "asst-chosen", "stream_deadline_s": rig.tokens.ttl_seconds}]


def test_without_assistant_id_the_from_number_is_routed() -> None:
    rig = AdminRig(routing={GATEWAY_NUMBER: "asst-routed", CALLEE: "asst-wrong"})
    answer = rig.place()
    assert answer.status == 201
    assert (answer.body["assistant_id"], answer.body["routed"]) == ("asst-routed", True)
    (pending,) = rig.outbound.pending(rig.clock.seconds())
    assert pending.choice == AssistantById("asst-routed")
    other = AdminRig()
    assert other.place(**{"from": "+15559999999"}).body["assistant_id"] == "asst-test-0001"


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "the body is not JSON"),
    (b"{nope", "the body is not JSON"),
    (b"\xff\xfe", "the body is not UTF-8"),
    ([CALLEE], "the body must be a JSON object"),
    ({"from": GATEWAY_NUMBER}, "'to' is required"),
    ({"to": CALLEE}, "'from' is required"),
    ({"to": "5550001111", "from": GATEWAY_NUMBER}, "'to' must be an E.164 number"),
    ({"to": CALLEE, "from": "+1 555 000 2222"}, "'from' must be an E.164 number"),
    ({"to": "+0123", "from": GATEWAY_NUMBER}, "'to' must be an E.164 number"),
    ({"to": "+1234567890123456", "from": GATEWAY_NUMBER}, "'to' must be an E.164 number"),
    ({"to": 15550001111, "from": GATEWAY_NUMBER}, "'to' must be an E.164 number"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "assistantId": ""}, "'assistantId' must be"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "assistantId": 7}, "'assistantId' must be"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "assistantId": "a\nb"}, "'assistantId' must be"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "variables": ["x"]},
     "'variables' must be an object of strings"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "variables": {"n": 1}},
     "'variables.n' must be a string"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "variables": {"bad name": "x"}},
     "variable name 'bad name'"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "variables": {"n": "x" * 1001}},
     "'variables.n' is longer than 1000"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "variables": {f"v{i}": "x" for i in range(65)}},
     "'variables' has more than 64"),
    ({"to": CALLEE, "from": GATEWAY_NUMBER, "assistant_id": "x"},
     "unknown field(s): 'assistant_id'"),
])
def test_bad_bodies_are_400_with_a_reason(body: Any, reason: str) -> None:
    rig = AdminRig()
    answer = rig.request("POST", "/calls", body=body)
    assert answer.status == 400
    assert answer.body["error"] == "bad request"
    assert answer.body["reason"].startswith(reason), answer.body["reason"]
    assert rig.twilio.requests == []
    assert len(rig.outbound) == 0


def test_a_body_too_large_is_413() -> None:
    rig = AdminRig()
    answer = rig.request("POST", "/calls", body=b" " * (MAX_BODY_BYTES + 1))
    assert answer.status == 413
    assert rig.twilio.requests == []


@pytest.mark.parametrize(("twilio_status", "code", "status"), [
    (400, 21211, 400),
    (400, 21210, 400),
    (404, 20404, 400),
    (409, 20409, 409),
    (401, 20003, 502),
    (403, 20003, 502),
    (429, 20429, 503),
    (500, 20500, 502),
    (503, 20503, 502),
])
def test_twilio_errors_come_back_with_twilios_code_and_message(
        twilio_status: int, code: int, status: int, clean: list[AdminRig]) -> None:
    message = f"Twilio says no ({code})"
    rig = AdminRig((twilio_status, {"code": code, "message": message, "status": twilio_status,
                                    "more_info": f"https://www.twilio.com/docs/errors/{code}"}))
    clean.append(rig)
    answer = rig.place()
    assert answer.status == status == twilio_error_status(twilio_status)
    assert answer.body == {"error": "twilio refused the call", "twilio_status": twilio_status,
                           "code": code, "message": message,
                           "more_info": f"https://www.twilio.com/docs/errors/{code}"}
    assert len(rig.twilio.requests) == 1  # creating a call is never retried blindly
    assert len(rig.outbound) == 0  # the reservation is dropped


def test_an_unreachable_twilio_is_502(clean: list[AdminRig]) -> None:
    rig = AdminRig(None)
    clean.append(rig)
    answers: list[Any] = []
    rig.http.request("POST", "http://127.0.0.1:9464/calls",
                     data=json.dumps({"to": CALLEE, "from": GATEWAY_NUMBER}).encode(),
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).addBoth(answers.append)
    rig.http.flush()
    assert answers == []
    assert len(rig.outbound) == 1
    rig.clock.advance(rig.settings.twilio.rest_timeout)
    rig.twilio_http.flush()
    rig.http.flush()
    answer = rig.read(answers[0])
    assert answer.status == 502
    assert answer.body["error"] == "twilio unreachable"
    assert answer.body["timed_out"] is True
    assert len(rig.outbound) == 0


def test_a_client_going_away_does_not_cancel_the_call(clean: list[AdminRig]) -> None:
    rig = AdminRig(None)
    clean.append(rig)
    asking = rig.http.request("POST", "http://127.0.0.1:9464/calls",
                              data=json.dumps({"to": CALLEE, "from": GATEWAY_NUMBER}).encode(),
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    asking.addErrback(lambda _: None)
    rig.http.flush()
    asking.cancel()
    rig.http.flush()
    assert rig.twilio.cancelled == 0  # the create request to Twilio goes on
    (waiting,) = rig.twilio.waiting
    waiting.setResponseCode(201)
    waiting.write(json.dumps({"sid": CALL_SID}).encode())
    waiting.finish()
    rig.twilio_http.flush()
    (pending,) = rig.outbound.pending(rig.clock.seconds())
    assert pending.call_sid == CALL_SID


def test_no_outbound_calls_while_draining_or_full() -> None:
    rig = AdminRig(gateway={"max_concurrent_calls": "2"})
    rig.admission.draining = True
    answer = rig.place()
    assert (answer.status, answer.body) == (
        503, {"error": "not admitting calls", "reason": "draining"})
    rig.admission.draining = False
    rig.scripted_call()
    assert rig.place().status == 201  # one active + one ringing = 2
    answer = rig.place()
    assert (answer.status, answer.body["reason"]) == (503, "capacity")
    assert len(rig.twilio.requests) == 1


def test_an_unanswered_call_leaves_nothing_behind() -> None:
    rig = AdminRig()
    assert rig.place().status == 201
    # busy / no-answer: the status callback finds no session and ends nothing
    assert rig.board.call_status(CALL_SID, "no-answer") is False
    assert len(rig.outbound) == 1
    rig.clock.advance(rig.tokens.ttl_seconds)
    assert rig.outbound.pending(rig.clock.seconds()) == []
    assert len(rig.outbound) == 0
    assert rig.request("GET", "/calls").body["pending_outbound"] == []


# -- an outbound call's stream -----------------------------------------------------------------


def test_the_answered_call_streams_with_the_chosen_assistant(clean: list[AdminRig]) -> None:
    rig = AdminRig((201, {"sid": CALL_SID}))
    clean.append(rig)
    with txaio_on(rig.clock):
        placed = rig.place(assistantId="asst-chosen", variables={"name": "Ada"})
        assert placed.status == 201
        parameters = stream_parameters(rig.twilio.form["Twiml"][0])
        assert rig.vapi.requests == []  # nothing is created before the call is answered

        twilio = open_stream(rig)
        twilio.send({"event": "connected", "protocol": "Call", "version": "1.0.0"},
                     start_message(parameters))
        session = rig.board.get(CALL_SID)
        assert session is not None
        assert session.stream is not None
        assert (session.info.caller, session.info.called) == (GATEWAY_NUMBER, CALLEE)
        ((choice, _, overrides),) = rig.vapi.requests
        assert choice == AssistantById("asst-chosen")
        assert overrides == {"variableValues": {
            "twilioCallSid": CALL_SID, "callerNumber": GATEWAY_NUMBER,
            "dialledNumber": CALLEE, "name": "Ada"}}
        assert len(rig.outbound) == 0
        rig.vapi.answer()
        rig.links[0].open()

        (call,) = rig.request("GET", "/calls").body["calls"]
        assert (call["call_sid"], call["from"], call["to"], call["state"]) == (
            CALL_SID, GATEWAY_NUMBER, CALLEE, "streaming")

        # a recreated Vapi call (the link lost) keeps the chosen assistant
        rig.links[0].owner.on_link_failed(LinkFailure("socket lost", 3, "recreate"))
        assert rig.vapi.requests[1][0] == AssistantById("asst-chosen")
        assert rig.vapi.requests[1][2]["variableValues"]["name"] == "Ada"
        rig.vapi.answer()

        # the same start again (a replay) is refused: the reference was consumed
        replay = open_stream(rig)
        replay.send(start_message(parameters))
        assert replay.client.closed_with == (True, 4008, "outbound call unknown")

        ended = rig.request("DELETE", f"/calls/{CALL_SID}")
        assert ended.body["twilio"] == "rest-hangup"
        twilio.pump.flush()
        assert twilio.client.closed_with == (True, 1000, "call ended: admin-hangup")
        assert rig.hangups.hung_up == [CALL_SID]
        assert all(link.stops == 1 for link in rig.links)
        assert len(rig.registry) == 0


def test_an_outbound_stream_with_another_call_sid_opens_nothing(clean: list[AdminRig]) -> None:
    rig = AdminRig((201, {"sid": CALL_SID}))
    clean.append(rig)
    with txaio_on(rig.clock):
        assert rig.place().status == 201
        parameters = stream_parameters(rig.twilio.form["Twiml"][0])
        twilio = open_stream(rig)
        twilio.send(start_message(parameters, call_sid=OTHER_CALL_SID))
        assert twilio.client.closed_with == (True, 4008, "outbound call wrong-call")
        assert rig.board.sessions() == []
        assert rig.vapi.requests == []
        # an expired reference is refused too
        rig.clock.advance(rig.tokens.ttl_seconds)
        late = open_stream(rig)
        late.send(start_message(parameters))
        assert late.client.closed_with == (True, 4008, "outbound call expired")
        assert rig.board.sessions() == []


def test_an_outbound_stream_while_full_is_refused(clean: list[AdminRig]) -> None:
    rig = AdminRig((201, {"sid": CALL_SID}), gateway={"max_concurrent_calls": "2"})
    clean.append(rig)
    with txaio_on(rig.clock):
        assert rig.place().status == 201
        parameters = stream_parameters(rig.twilio.form["Twiml"][0])
        rig.scripted_call(OTHER_CALL_SID)
        rig.admission.draining = True
        twilio = open_stream(rig)
        twilio.send(start_message(parameters))
        assert twilio.client.closed_with == (True, 4008, "call not admitted")
        assert rig.board.get(CALL_SID) is None
        rig.board.end_call(OTHER_CALL_SID, "test-over")


# -- the pending table ----------------------------------------------------------------------------


def test_the_pending_table_is_bounded_and_expires() -> None:
    board: Any = object()
    nonces = iter([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16])
    table = OutboundCalls(board, ttl_seconds=10, max_pending=2,
                          random_bytes=lambda n: next(nonces))
    choice = AssistantById("a")
    first = table.reserve(caller=GATEWAY_NUMBER, called=CALLEE, choice=choice, variables={},
                          now=100)
    assert first.reference == "OB" + "01" * 16
    assert first.expires_at == 110
    table.reserve(caller=GATEWAY_NUMBER, called=CALLEE, choice=choice, variables={}, now=105)
    with pytest.raises(PendingTableFullError):
        table.reserve(caller=GATEWAY_NUMBER, called=CALLEE, choice=choice, variables={},
                      now=109)
    assert table.placed(first.reference, CALL_SID, 109.5) is not None
    assert table.check(first.reference, CALL_SID, 109.9) is None
    assert table.check(first.reference, CALL_SID, 110) == "expired"
    assert table.placed(first.reference, CALL_SID, 110) is None
    third = table.reserve(caller=GATEWAY_NUMBER, called=CALLEE, choice=choice, variables={},
                          now=110)
    assert [call.reference for call in table.pending(110)] == ["OB" + "02" * 16, third.reference]
    assert [call.reference for call in table.pending(116)] == [third.reference]
    assert table.pending(120) == []
    assert len(table) == 0


def test_parse_place_call() -> None:
    wanted = parse_place_call(json.dumps({
        "to": CALLEE, "from": GATEWAY_NUMBER, "assistantId": "asst-1",
        "variables": {"name": "Ada", "order.id": "42"}}).encode())
    assert (wanted.to, wanted.caller, wanted.assistant_id) == (CALLEE, GATEWAY_NUMBER, "asst-1")
    assert wanted.variables == {"name": "Ada", "order.id": "42"}


def test_ring_timeout_fits_inside_the_token_ttl() -> None:
    assert ring_timeout(120) == 60
    assert ring_timeout(45) == 30
    assert ring_timeout(5) == 5
