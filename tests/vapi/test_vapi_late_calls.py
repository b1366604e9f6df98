"""A ``POST /call`` that outlives ``request_timeout``: the creator stops waiting for it and
retries, but the request runs on in the background, because Vapi creates the call whether
or not the client reads the answer.  A call it answers with late goes to ``on_late_call``
(exactly once); a late error goes nowhere; a request still unanswered at the late-answer
limit is cancelled and counted.  Time is a ``task.Clock``; Vapi is a fake HTTP client
whose answers the test gives (and, once, treq's ``StubTreq`` over a resource)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import known_secrets
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gateway.metrics import GatewayMetrics
from gateway.vapi.assistants import AssistantById
from gateway.vapi.calls import (
    AudioFormat,
    CallCreator,
    CreatedCall,
    HttpClient,
    VapiApiSettings,
    VapiUnavailableError,
)

API_KEY = known_secrets.VAPI_API_KEY
TOKEN = "late-call-capability-5e7d"
CHOICE = AssistantById("asst-1")
#: 1 s timeout, one retry after 0.5 s; the late-answer limit is then 30 s (the minimum)
SETTINGS = VapiApiSettings(api_key=API_KEY, api_url="https://api.vapi.test",
                           request_timeout_ns=1_000_000_000, retries=1)


def call_answer(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "status": "queued",
            "transport": {"provider": "vapi.websocket",
                          "websocketCallUrl": f"wss://api.vapi.ai/{TOKEN}-{call_id}/transport"}}


@dataclass
class Answer:
    """A treq-like response."""

    code: int
    body: bytes

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)


@dataclass
class HeldVapi:
    """A fake HTTP client: each POST /call waits until the test answers it."""

    requests: list[Deferred[Any]] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)

    def post(self, url: str, data: bytes | None = None, **kwargs: Any) -> Deferred[Any]:
        index = len(self.requests)
        request: Deferred[Any] = Deferred(lambda _: self.cancelled.append(index))
        self.requests.append(request)
        return request

    def answer(self, index: int, status: int, payload: Any) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.requests[index].callback(Answer(status, body))


@dataclass
class Creation:
    """One create_call through a creator whose late calls and abandonments are recorded."""

    http: HeldVapi
    clock: Clock
    creator: CallCreator
    results: list[Any]
    late: list[CreatedCall]
    abandoned: list[None]

    def at(self, when: float) -> None:
        """Advance the clock to ``when`` seconds after the call was asked for."""
        advance_to(self.clock, when)

    @property
    def created(self) -> CreatedCall:
        [created] = self.results
        assert isinstance(created, CreatedCall), created
        return created


def advance_to(clock: Clock, when: float) -> None:
    """Advance ``clock`` to ``when``, stopping at each timer due on the way (so that what a
    timer schedules runs at its own time, as on a reactor)."""
    while True:
        due = [call.getTime() for call in clock.getDelayedCalls()]
        step = min((t for t in due if t <= when), default=when)
        clock.advance(step - clock.seconds())
        if step >= when:
            return


def start(settings: VapiApiSettings = SETTINGS) -> Creation:
    http = HeldVapi()
    clock = Clock()
    late: list[CreatedCall] = []
    abandoned: list[None] = []
    creator = CallCreator(settings, http, clock, on_late_call=late.append,
                          on_late_request_abandoned=lambda: abandoned.append(None))
    results: list[Any] = []
    creator.create_call(CHOICE, AudioFormat()).addBoth(results.append)
    return Creation(http, clock, creator, results, late, abandoned)


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def test_the_timeout_stops_the_waiting_not_the_request() -> None:
    c = start()
    c.at(1.0)
    assert c.http.cancelled == [] and c.creator.late_requests == 1
    assert len(c.http.requests) == 1
    c.at(1.5)  # the retry goes ahead as before
    assert len(c.http.requests) == 2 and c.results == []


def test_a_late_201_goes_to_on_late_call_exactly_once(
        log_events: list[dict[str, Any]]) -> None:
    c = start()
    c.at(1.5)
    c.http.answer(1, 201, call_answer("call-retry"))
    assert c.created.call_id == "call-retry"  # the retry serves the phone call
    assert c.late == []
    c.at(7.0)
    c.http.answer(0, 201, call_answer("call-late"))
    assert [call.call_id for call in c.late] == ["call-late"]
    assert c.created.call_id == "call-retry"
    assert c.creator.late_calls == 1 and c.creator.late_requests == 0
    assert c.clock.getDelayedCalls() == []  # the late-answer limit was disarmed
    c.at(100.0)
    assert len(c.late) == 1 and c.abandoned == [] and c.http.cancelled == []
    [line] = named(log_events, "vapi call created by a timed-out POST /call; ending it")
    assert line["vapi_call_id"] == "call-late" and line["after_s"] == 7.0
    assert all(TOKEN not in repr(event) for event in log_events)


def test_a_late_201_before_the_retry_answers_does_not_serve_the_call() -> None:
    c = start()
    c.at(1.7)  # the retry was sent at 1.5 and is still out
    c.http.answer(0, 201, call_answer("call-late"))
    assert [call.call_id for call in c.late] == ["call-late"] and c.results == []
    c.http.answer(1, 201, call_answer("call-retry"))
    assert c.created.call_id == "call-retry" and len(c.late) == 1
    assert c.clock.getDelayedCalls() == []


def test_every_attempt_timed_out_then_both_calls_arrive() -> None:
    c = start()
    c.at(2.5)
    [failure] = c.results
    assert isinstance(failure.value, VapiUnavailableError)
    assert c.creator.late_requests == 2
    c.http.answer(1, 201, call_answer("call-2"))
    c.http.answer(0, 201, call_answer("call-1"))
    assert [call.call_id for call in c.late] == ["call-2", "call-1"]
    assert c.clock.getDelayedCalls() == []


@pytest.mark.parametrize("answer", [
    (500, {"message": "oops"}),
    (400, {"message": "Concurrency limit reached.", "error": "Bad Request"}),
    (201, {"id": "call-9", "transport": {"provider": "vapi.websocket"}}),  # no socket URL
    (201, b"not json"),
    (302, b""),
    ConnectionRefusedError("no route"),
])
def test_a_late_error_goes_nowhere(answer: Any, log_events: list[dict[str, Any]]) -> None:
    c = start()
    c.at(1.5)
    c.http.answer(1, 201, call_answer("call-retry"))
    c.at(4.0)
    if isinstance(answer, Exception):
        c.http.requests[0].errback(answer)
    else:
        c.http.answer(0, *answer)
    assert c.created.call_id == "call-retry"
    assert c.late == [] and c.abandoned == [] and c.creator.late_calls == 0
    assert c.creator.late_requests == 0 and c.creator.late_requests_abandoned == 0
    assert c.clock.getDelayedCalls() == []
    [line] = named(log_events, "a timed-out POST /call answered late without a call")
    assert line["after_s"] == 4.0


def test_unanswered_at_the_limit_is_cancelled_and_counted(
        log_events: list[dict[str, Any]]) -> None:
    c = start()
    c.at(1.5)
    c.http.answer(1, 201, call_answer("call-retry"))
    c.at(29.999)
    assert c.http.cancelled == [] and c.creator.late_requests == 1
    c.at(30.0)  # 30 s after the request was sent
    assert c.http.cancelled == [0] and c.abandoned == [None]
    assert c.creator.late_requests_abandoned == 1 and c.creator.late_requests == 0
    assert c.late == [] and c.created.call_id == "call-retry"
    assert c.clock.getDelayedCalls() == []
    [line] = named(log_events, "gave up on a timed-out POST /call at the late-answer limit; "
                               "a vapi call it may have created will not be ended by the "
                               "gateway")
    assert line["after_s"] == 30.0


def test_the_limit_counts_from_when_each_request_was_sent() -> None:
    c = start()
    c.at(2.5)  # both timed out: sent at 0 and at 1.5
    c.at(30.0)
    assert c.http.cancelled == [0]
    c.at(31.5)
    assert c.http.cancelled == [0, 1] and len(c.abandoned) == 2
    assert c.clock.getDelayedCalls() == []


def test_the_limit_is_a_few_timeouts_when_that_is_longer() -> None:
    assert SETTINGS.effective_late_answer_limit_ns == 30_000_000_000
    slow = VapiApiSettings(api_key=API_KEY, request_timeout_ns=10_000_000_000, retries=0)
    assert slow.effective_late_answer_limit_ns == 40_000_000_000
    c = start(slow)
    c.at(39.9)
    assert isinstance(c.results[0].value, VapiUnavailableError) and c.http.cancelled == []
    c.at(40.0)
    assert c.http.cancelled == [0] and c.clock.getDelayedCalls() == []


def test_an_explicit_limit() -> None:
    settings = VapiApiSettings(api_key=API_KEY, request_timeout_ns=1_000_000_000, retries=0,
                               late_answer_limit_ns=2_000_000_000)
    assert settings.effective_late_answer_limit_ns == 2_000_000_000
    c = start(settings)
    c.at(2.0)
    assert c.http.cancelled == [0] and c.abandoned == [None]
    with pytest.raises(ValueError, match="late_answer_limit_ns"):
        VapiApiSettings(api_key=API_KEY, request_timeout_ns=1_000_000_000,
                        late_answer_limit_ns=999_999_999)


def test_an_answer_in_time_leaves_nothing_running() -> None:
    c = start()
    c.at(0.999)
    c.http.answer(0, 201, call_answer("call-1"))
    assert c.created.call_id == "call-1" and c.late == []
    assert c.creator.late_requests == 0 and c.clock.getDelayedCalls() == []


def test_cancelling_the_creation_leaves_the_request_running() -> None:
    """Whoever stops waiting (here: cancels create_call) does not stop Vapi creating."""
    c = start()
    c.at(0.2)
    d = c.creator.create_call(CHOICE, AudioFormat())
    d.addErrback(lambda f: f.trap(CancelledError))
    d.cancel()
    assert c.http.cancelled == [] and c.creator.late_requests == 1
    c.http.answer(1, 201, call_answer("call-unwanted"))
    assert [call.call_id for call in c.late] == ["call-unwanted"]
    c.http.answer(0, 201, call_answer("call-wanted"))
    assert c.created.call_id == "call-wanted" and len(c.late) == 1
    assert c.clock.getDelayedCalls() == []


def test_a_failing_on_late_call_is_logged_not_raised(
        log_events: list[dict[str, Any]]) -> None:
    c = start()

    def broken(created: CreatedCall) -> None:
        raise RuntimeError("bug")

    c.creator.on_late_call = broken
    c.at(1.0)
    c.http.answer(0, 201, call_answer("call-late"))
    assert c.creator.late_calls == 1
    assert named(log_events, "a late POST /call callback failed")
    c.at(1.5)
    c.http.answer(1, 201, call_answer("call-retry"))
    assert c.created.call_id == "call-retry"


def test_without_on_late_call_a_late_call_is_an_error_line(
        log_events: list[dict[str, Any]]) -> None:
    c = start()
    c.creator.on_late_call = None
    c.at(1.0)
    c.http.answer(0, 201, call_answer("call-late"))
    [line] = named(log_events,
                   "vapi call created by a timed-out POST /call, and nothing to end it")
    assert line["vapi_call_id"] == "call-late" and line["log_level"].name == "error"
    assert c.creator.late_calls == 1


# --- through treq ----------------------------------------------------------------------


@dataclass
class SlowVapi(Resource):
    """Holds every ``POST /call`` until the test finishes it."""

    held: list[Request] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render_POST(self, request: Request) -> int:
        self.held.append(request)
        return NOT_DONE_YET

    def finish(self, index: int, status: int, payload: Any) -> None:
        request = self.held[index]
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        request.write(json.dumps(payload).encode())
        request.finish()


def test_through_treq_a_late_201_is_ended_and_a_hung_request_is_cut() -> None:
    vapi = SlowVapi()
    stub = StubTreq(vapi)
    clock = Clock()
    late: list[CreatedCall] = []
    abandoned: list[None] = []
    creator = CallCreator(SETTINGS, cast(HttpClient, stub), clock, on_late_call=late.append,
                          on_late_request_abandoned=lambda: abandoned.append(None))
    results: list[Any] = []
    creator.create_call(CHOICE, AudioFormat()).addBoth(results.append)
    stub.flush()
    clock.advance(1.0)
    clock.advance(0.5)
    stub.flush()
    assert len(vapi.held) == 2
    vapi.finish(1, 201, call_answer("call-retry"))
    stub.flush()
    assert [created.call_id for created in results] == ["call-retry"]
    vapi.finish(0, 201, call_answer("call-late"))
    stub.flush()
    assert [created.call_id for created in late] == ["call-late"]
    assert clock.getDelayedCalls() == []

    creator.create_call(CHOICE, AudioFormat()).addBoth(results.append)
    stub.flush()
    clock.advance(1.0)
    clock.advance(0.5)
    stub.flush()
    vapi.finish(3, 201, call_answer("call-retry-2"))
    stub.flush()
    clock.advance(30.0)  # the third request never answers: cut at the limit
    stub.flush()
    assert abandoned == [None] and len(late) == 1
    assert isinstance(results[-1], CreatedCall) and results[-1].call_id == "call-retry-2"
    assert not any(isinstance(result, Failure) for result in results)
    assert clock.getDelayedCalls() == []


# --- the daemon's wiring ---------------------------------------------------------------


def test_the_daemon_ends_and_counts_late_calls() -> None:
    from gateway.daemon import _vapi_calls  # the wiring under test

    settings = cast(Any, type("S", (), {"vapi": type("V", (), {
        "request_timeout": 1.0, "request_retries": 1})()})())
    metrics = GatewayMetrics()
    ended: list[CreatedCall] = []
    http = HeldVapi()
    clock = Clock()
    creator = _vapi_calls(settings, "https://api.vapi.test", API_KEY, http, clock, metrics,
                          ended.append)
    results: list[Any] = []
    creator.create_call(CHOICE, AudioFormat()).addBoth(results.append)
    advance_to(clock, 1.5)
    http.answer(0, 201, call_answer("call-late"))
    http.answer(1, 201, call_answer("call-retry"))
    creator.create_call(CHOICE, AudioFormat()).addBoth(results.append)  # both time out
    advance_to(clock, 4.0)
    advance_to(clock, 40.0)
    assert [call.call_id for call in ended] == ["call-late"]
    text = metrics.render().decode()
    assert "vapi_gateway_vapi_late_calls_ended_total 1.0" in text
    assert "vapi_gateway_vapi_late_creates_abandoned_total 2.0" in text
    assert clock.getDelayedCalls() == []
