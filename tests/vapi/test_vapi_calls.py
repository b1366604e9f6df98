"""Creating the Vapi call over HTTP against a stubbed Vapi (treq's StubTreq over a
small Resource), with the clock injected: 201, 400 with Vapi's message, 401,
500 then 201, timeouts, connection errors, a 201 without the socket URL; and
the socket URL never showing in repr/str or a log event."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import known_secrets
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

import gateway
from gateway.vapi.assistants import AssistantById, InlineAssistant
from gateway.vapi.calls import (
    AudioFormat,
    BadCallAnswerError,
    CallCreator,
    CallRejectedError,
    CreatedCall,
    HttpClient,
    SocketUrl,
    VapiApiSettings,
    VapiUnavailableError,
    call_request_body,
    is_loopback_host,
)

API_KEY = known_secrets.VAPI_API_KEY
TOKEN = "c0ffee-call-capability-91ab"
WSS_URL = f"wss://api.vapi.ai/{TOKEN}/transport"
CALL = {"id": "call-123", "status": "queued",
        "transport": {"provider": "vapi.websocket", "websocketCallUrl": WSS_URL}}
CHOICE = AssistantById("asst-1", overrides={"variableValues": {"team": "sales"}})
SETTINGS = VapiApiSettings(api_key=API_KEY, api_url="https://api.vapi.test/")


@dataclass
class FakeVapi(Resource):
    """Answers ``POST /call`` from a script: (status, JSON or bytes) or "hang"."""

    script: list[Any] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render_POST(self, request: Request) -> bytes | int:
        self.requests.append({
            "path": request.path,
            "authorization": request.getHeader("authorization"),
            "user_agent": request.getHeader("user-agent"),
            "content_type": request.getHeader("content-type"),
            "body": json.loads(request.content.read() if request.content else b"null"),
        })
        answer = self.script.pop(0)
        if answer == "hang":
            return NOT_DONE_YET
        status, payload = answer
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def create(script: list[Any], clock: Clock | None = None, settings: VapiApiSettings = SETTINGS,
           choice: Any = CHOICE, overrides: dict[str, Any] | None = None
           ) -> tuple[FakeVapi, StubTreq, Clock, list[Any]]:
    vapi = FakeVapi(script=list(script))
    stub = StubTreq(vapi)
    clock = clock or Clock()
    results: list[Any] = []
    CallCreator(settings, cast(HttpClient, stub), clock).create_call(
        choice, AudioFormat("mulaw", 8000), overrides).addBoth(results.append)
    stub.flush()
    return vapi, stub, clock, results


def test_created_call() -> None:
    vapi, _, clock, results = create(
        [(201, CALL)], overrides={"variableValues": {"callerNumber": "+15550100199"}})
    [created] = results
    assert isinstance(created, CreatedCall)
    assert created.call_id == "call-123"
    assert created.socket_url.reveal() == WSS_URL
    [request] = vapi.requests
    assert request["path"] == b"/call"
    assert request["authorization"] == f"Bearer {API_KEY}"
    assert request["user_agent"] == f"vapi-gateway/{gateway.__version__}"
    assert request["content_type"] == "application/json"
    assert request["body"] == {
        "assistantId": "asst-1",
        "assistantOverrides": {"variableValues": {"team": "sales",
                                                  "callerNumber": "+15550100199"}},
        "transport": {"provider": "vapi.websocket",
                      "audioFormat": {"format": "mulaw", "container": "raw",
                                      "sampleRate": 8000}},
    }
    assert clock.getDelayedCalls() == []


def test_inline_assistant_body_and_pcm() -> None:
    body = call_request_body(InlineAssistant({"firstMessage": "Hi"}),
                             AudioFormat("pcm_s16le", 16000))
    assert body == {"assistant": {"firstMessage": "Hi"},
                    "transport": {"provider": "vapi.websocket",
                                  "audioFormat": {"format": "pcm_s16le", "container": "raw",
                                                  "sampleRate": 16000}}}
    assert "phoneNumber" not in body and "phoneNumberId" not in body


def test_400_is_a_typed_rejection_and_not_retried() -> None:
    vapi, _, clock, results = create([(400, {
        "message": "Concurrency limit reached.", "error": "Bad Request", "statusCode": 400,
        "subscriptionLimits": {"concurrencyBlocked": True, "concurrencyLimit": 10,
                               "remainingConcurrentCalls": 0}})])
    [failure] = results
    error = failure.value
    assert isinstance(error, CallRejectedError)
    assert error.status == 400
    assert error.messages == ("Concurrency limit reached.",)
    assert error.error == "Bad Request"
    assert error.subscription_limits == {"concurrencyBlocked": True, "concurrencyLimit": 10,
                                         "remainingConcurrentCalls": 0}
    assert "Concurrency limit reached." in str(error) and "concurrencyBlocked" in str(error)
    assert len(vapi.requests) == 1 and clock.getDelayedCalls() == []


def test_400_with_a_list_of_messages() -> None:
    _, _, _, [failure] = create([(400, {"message": ["assistantId must be a UUID", 7],
                                        "error": "Bad Request"})])
    assert failure.value.messages == ("assistantId must be a UUID",)


def test_401_is_not_retried_and_a_non_json_body_is_tolerated() -> None:
    vapi, _, _, [failure] = create([(401, b"<html>nope</html>")])
    assert isinstance(failure.value, CallRejectedError)
    assert failure.value.status == 401 and failure.value.messages == ()
    assert len(vapi.requests) == 1


def test_500_then_201_succeeds_after_the_backoff() -> None:
    vapi, stub, clock, results = create([(500, {"message": "oops"}), (201, CALL)])
    assert results == [] and len(vapi.requests) == 1
    clock.advance(0.49)
    stub.flush()
    assert len(vapi.requests) == 1
    clock.advance(0.01)
    stub.flush()
    assert len(vapi.requests) == 2
    assert isinstance(results[0], CreatedCall)
    assert clock.getDelayedCalls() == []


def test_5xx_every_time_gives_up_after_the_retries() -> None:
    vapi, stub, clock, results = create([(503, {}), (502, {}), (500, {})])
    clock.advance(0.5)
    stub.flush()
    clock.advance(1.0)  # backoff doubles
    stub.flush()
    [failure] = results
    assert isinstance(failure.value, VapiUnavailableError)
    assert failure.value.attempts == 3 and failure.value.last_problem == "HTTP 500"
    assert len(vapi.requests) == 3 and clock.getDelayedCalls() == []


def test_timeouts_run_on_the_injected_clock() -> None:
    settings = VapiApiSettings(api_key=API_KEY, api_url="https://api.vapi.test",
                               request_timeout_ns=3_000_000_000, retries=1)
    vapi, stub, clock, results = create(["hang", (201, CALL)], settings=settings)
    clock.advance(2.9)
    stub.flush()
    assert results == [] and len(vapi.requests) == 1
    clock.advance(0.1)  # the first attempt times out
    stub.flush()
    assert len(vapi.requests) == 1
    clock.advance(0.5)
    stub.flush()
    assert isinstance(results[0], CreatedCall)
    # the first request is not cancelled at the timeout (Vapi may create its call
    # anyway): it runs on until the late-answer limit, 30 s after it was sent
    clock.advance(30 - 3.5)
    stub.flush()
    assert clock.getDelayedCalls() == []


def test_timeouts_every_time_give_up() -> None:
    settings = VapiApiSettings(api_key=API_KEY, api_url="https://api.vapi.test", retries=1)
    _, stub, clock, results = create(["hang", "hang"], settings=settings)
    for step in (5.0, 0.5, 5.0):
        clock.advance(step)
        stub.flush()
    [failure] = results
    assert isinstance(failure.value, VapiUnavailableError)
    assert failure.value.last_problem == "no answer within 5 s"
    # both requests run on until the late-answer limit, 30 s after each was sent
    clock.advance(5.5 + 30 - 10.5)
    stub.flush()
    assert clock.getDelayedCalls() == []


@dataclass
class RefusingThenStub:
    """An HTTP client that refuses ``refusals`` connections, then uses StubTreq."""

    stub: StubTreq
    refusals: int
    posts: int = 0

    def post(self, url: str, data: bytes | None = None, **kwargs: Any) -> Deferred[Any]:
        self.posts += 1
        if self.refusals:
            self.refusals -= 1
            return fail(ConnectionRefusedError("no route"))
        result: Deferred[Any] = cast(HttpClient, self.stub).post(url, data=data, **kwargs)
        return result


def test_connection_errors_are_retried() -> None:
    clock = Clock()
    stub = StubTreq(FakeVapi(script=[(201, CALL)]))
    client = RefusingThenStub(stub, refusals=2)
    results: list[Any] = []
    CallCreator(SETTINGS, client, clock).create_call(CHOICE, AudioFormat()).addBoth(
        results.append)
    clock.advance(0.5)
    clock.advance(1.0)
    stub.flush()
    assert client.posts == 3 and isinstance(results[0], CreatedCall)


def test_programming_errors_are_not_retried() -> None:
    class Broken:
        def post(self, url: str, data: bytes | None = None, **kwargs: Any) -> Deferred[Any]:
            return fail(TypeError("bug"))

    results: list[Any] = []
    CallCreator(SETTINGS, Broken(), Clock()).create_call(CHOICE, AudioFormat()).addBoth(
        results.append)
    assert isinstance(results[0], Failure) and results[0].check(TypeError)


@pytest.mark.parametrize(("answer", "reason"), [
    ({"id": "call-9", "transport": {"provider": "vapi.websocket"}},
     "no transport.websocketCallUrl"),
    ({"id": "call-9"}, "no transport.websocketCallUrl"),
    ({"id": "call-9", "transport": {"websocketCallUrl": 5}}, "no transport.websocketCallUrl"),
    ({"id": "call-9", "transport": {"websocketCallUrl": f"ws://api.vapi.ai/{TOKEN}"}},
     "not loopback"),
    ({"id": "call-9", "transport": {"websocketCallUrl": f"https://api.vapi.ai/{TOKEN}"}},
     "scheme is not wss"),
    ({"transport": {"websocketCallUrl": WSS_URL}}, "no id"),
    ([CALL], "not a JSON object"),
    (b"not json", "not JSON"),
])
def test_unusable_201s_are_errors_that_never_quote_the_url(answer: Any, reason: str) -> None:
    vapi, _, _, [failure] = create([(201, answer)])
    error = failure.value
    assert isinstance(error, BadCallAnswerError) and reason in str(error)
    assert TOKEN not in str(error) and TOKEN not in repr(error)
    assert len(vapi.requests) == 1  # the call may exist: never create a second one


def test_the_socket_url_is_redacted_everywhere(log_events: list[dict[str, Any]]) -> None:
    _, _, _, [created] = create([(201, CALL)])
    url = created.socket_url
    percent = "%s %r" % (url, url)  # noqa: UP031 - %-formatting must redact too
    for shown in (str(url), repr(url), f"{url}", percent, repr(created)):
        assert TOKEN not in shown
    assert str(url) == "wss://api.vapi.ai/<redacted>"
    with pytest.raises(TypeError):
        pickle.dumps(url)
    assert url.host == "api.vapi.ai" and url.port == 443 and url.secure
    assert all(TOKEN not in repr(event) for event in log_events)


def test_retry_logs_never_carry_the_key_or_url(log_events: list[dict[str, Any]]) -> None:
    _, stub, clock, _ = create([(500, {}), (201, CALL)])
    clock.advance(0.5)
    stub.flush()
    assert log_events, "the retry is logged"
    for event in log_events:
        assert API_KEY not in repr(event) and TOKEN not in repr(event)


def test_settings_validation_and_repr() -> None:
    assert API_KEY not in repr(SETTINGS)
    with pytest.raises(ValueError, match="https"):
        VapiApiSettings(api_key=API_KEY, api_url="http://api.vapi.ai")
    assert VapiApiSettings(api_key=API_KEY, api_url="http://127.0.0.1:8080")
    with pytest.raises(ValueError, match="api_key"):
        VapiApiSettings(api_key="")
    with pytest.raises(ValueError, match="retries"):
        VapiApiSettings(api_key=API_KEY, retries=11)
    with pytest.raises(ValueError):
        AudioFormat("opus", 48000)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AudioFormat("mulaw", 4000)


@pytest.mark.parametrize(("url", "ok"), [
    ("wss://api.vapi.ai/x/transport", True),
    ("wss://api.vapi.ai:8443/x", True),
    ("ws://127.0.0.1:9000/x", True),
    ("ws://127.8.9.10/x", True),
    ("ws://[::1]:9000/x", True),
    ("ws://localhost/x", True),
    ("ws://api.vapi.ai/x", False),
    ("ws://10.0.0.5/x", False),
    ("ws://localhost.evil.com/x", False),
    ("wss:///x", False),
    ("wss://api.vapi.ai:99999/x", False),
    ("wss://api.vapi.ai/x#frag", False),
    ("http://api.vapi.ai/x", False),
])
def test_socket_url_rules(url: str, ok: bool) -> None:
    if ok:
        assert SocketUrl(url).reveal() == url
    else:
        with pytest.raises(ValueError) as caught:
            SocketUrl(url)
        assert "/x" not in str(caught.value)


def test_loopback_hosts() -> None:
    assert is_loopback_host("LOCALHOST.") and is_loopback_host("::1")
    assert not is_loopback_host("::ffff:8.8.8.8") and not is_loopback_host("example.com")
