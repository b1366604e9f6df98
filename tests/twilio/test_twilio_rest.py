"""The REST client against a fake Twilio (StubTreq) on a Clock: answers, retries, timeouts."""

from __future__ import annotations

import base64
import json
from typing import Any, cast
from urllib.parse import parse_qs

import known_secrets
import pytest
from inmemory import result_of
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

import gateway
from gateway.twilio.rest import (
    MAX_TWIML_CHARS,
    HTTPClient,
    TwilioApiError,
    TwilioCredentials,
    TwilioRestClient,
    TwilioTransportError,
)

ACCOUNT = "AC" + "a" * 32
CALL = "CA" + "b" * 32
AUTH_TOKEN = known_secrets.TWILIO_AUTH_TOKEN
API_KEY = "SK" + "c" * 32
API_SECRET = known_secrets.TWILIO_API_KEY_SECRET

Answer = tuple[int, Any]  # status, JSON body (or bytes), or None for "never answer"


class FakeTwilio(Resource):
    """Answers each POST with the next scripted answer and records what it got."""

    isLeaf = True

    def __init__(self, *answers: Answer | None) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.pending: list[Request] = []
        self.cancelled = 0

    def render_POST(self, request: Request) -> bytes | int:
        self.requests.append(
            {
                "path": request.path.decode(),
                "authorization": request.getHeader(b"authorization"),
                "user_agent": request.getHeader(b"user-agent"),
                "content_type": request.getHeader(b"content-type"),
                "form": parse_qs(request.content.read().decode()) if request.content else {},
            }
        )
        answer = self.answers.pop(0) if self.answers else (500, {"code": 20500})
        if answer is None:
            self.pending.append(request)
            request.notifyFinish().addErrback(self._lost)
            return NOT_DONE_YET
        status, body = answer
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body if isinstance(body, bytes) else json.dumps(body).encode()

    def _lost(self, failure: Failure) -> None:
        self.cancelled += 1


def client(
    fake: FakeTwilio, clock: Clock, credentials: TwilioCredentials | None = None, **options: Any
) -> TwilioRestClient:
    return TwilioRestClient(
        stub(fake),
        clock,
        credentials or TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN),
        **options,
    )


def stub(fake: FakeTwilio) -> HTTPClient:
    """StubTreq sets its methods dynamically: tell mypy it is a treq-like client."""
    return cast(HTTPClient, StubTreq(fake))


def not_fired(deferred: Deferred[Any]) -> bool:
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    deferred.addBoth(keep)
    return not results


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


CALL_PATH = f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{CALL}.json"
CALLS_PATH = f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json"
NOT_FOUND = {
    "code": 20404,
    "message": "The requested resource was not found",
    "more_info": "https://www.twilio.com/docs/errors/20404",
    "status": 404,
}


# -- hang up ---------------------------------------------------------------------------


def test_hang_up() -> None:
    fake = FakeTwilio((200, {"sid": CALL, "status": "completed"}))
    assert result_of(client(fake, Clock()).hang_up(CALL)) == "hung-up"
    (request,) = fake.requests
    assert request["path"] == CALL_PATH
    assert request["form"] == {"Status": ["completed"]}
    assert request["authorization"] == basic(ACCOUNT, AUTH_TOKEN)
    assert request["user_agent"] == f"vapi-gateway/{gateway.__version__}".encode()
    assert request["content_type"] == b"application/x-www-form-urlencoded"


def test_cancel_a_ringing_call() -> None:
    fake = FakeTwilio((200, {"sid": CALL}))
    assert result_of(client(fake, Clock()).hang_up(CALL, status="canceled")) == "hung-up"
    assert fake.requests[0]["form"] == {"Status": ["canceled"]}


@pytest.mark.parametrize(
    "answer",
    [
        (404, NOT_FOUND),
        (404, b"<html>not found</html>"),
        (
            400,
            {"code": 21220, "message": "Call is not in-progress. Cannot redirect.", "status": 400},
        ),
        (400, {"code": "21220", "message": "code as a string", "status": 400}),
    ],
)
def test_hang_up_of_an_ended_call_succeeds(answer: Answer) -> None:
    fake = FakeTwilio(answer)
    assert result_of(client(fake, Clock()).hang_up(CALL)) == "already-ended"
    assert len(fake.requests) == 1


def test_unauthorised_is_a_typed_error_without_retry_or_secret() -> None:
    fake = FakeTwilio(
        (
            401,
            {
                "code": 20003,
                "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            },
        )
    )
    with pytest.raises(TwilioApiError) as info:
        result_of(client(fake, Clock()).hang_up(CALL))
    error = info.value
    assert (error.status, error.code, error.message) == (401, 20003, "Authenticate")
    assert error.more_info == "https://www.twilio.com/docs/errors/20003"
    assert len(fake.requests) == 1
    assert AUTH_TOKEN not in str(error)
    assert AUTH_TOKEN not in repr(error)


def test_error_body_that_is_not_twilio_json() -> None:
    fake = FakeTwilio((400, b"bad request"), (400, b""), (400, [1, 2]))
    for expected in ("bad request", "(empty body)", "[1, 2]"):
        with pytest.raises(TwilioApiError) as info:
            result_of(client(fake, Clock()).redirect(CALL, twiml="<Response/>"))
        assert (info.value.status, info.value.code, info.value.message) == (400, None, expected)


# -- retries and backoff ---------------------------------------------------------------


def test_5xx_then_success_after_backoff() -> None:
    clock = Clock()
    fake = FakeTwilio((500, {"code": 20500, "message": "Internal"}), (200, {"sid": CALL}))
    deferred = client(fake, clock).hang_up(CALL)
    assert not_fired(deferred)
    assert len(fake.requests) == 1
    clock.advance(0.49)
    assert len(fake.requests) == 1
    clock.advance(0.01)
    assert len(fake.requests) == 2
    assert result_of(deferred) == "hung-up"


def test_5xx_every_time_gives_the_last_error_after_max_attempts() -> None:
    clock = Clock()
    fake = FakeTwilio(*[(503, {"code": 20503, "message": "Unavailable"})] * 5)
    deferred = client(fake, clock, max_attempts=3).hang_up(CALL)
    clock.advance(0.5)  # first backoff
    assert len(fake.requests) == 2
    clock.advance(0.99)
    assert not_fired(deferred)
    clock.advance(0.01)  # second backoff: 1.0 s
    assert len(fake.requests) == 3
    with pytest.raises(TwilioApiError) as info:
        result_of(deferred)
    assert (info.value.status, info.value.code) == (503, 20503)


def test_backoff_is_capped() -> None:
    clock = Clock()
    fake = FakeTwilio(*[(500, {})] * 6)
    deferred = client(fake, clock, max_attempts=6, backoff_max=1.5).hang_up(CALL)
    for delay in (0.5, 1.0, 1.5, 1.5, 1.5):
        clock.advance(delay)
    assert len(fake.requests) == 6
    with pytest.raises(TwilioApiError):
        result_of(deferred)


def test_4xx_is_never_retried() -> None:
    clock = Clock()
    fake = FakeTwilio((429, {"code": 20429, "message": "Too Many Requests"}), (200, {}))
    deferred = client(fake, clock).redirect(CALL, url="https://gw.example.com/twiml")
    clock.advance(100)
    with pytest.raises(TwilioApiError) as info:
        result_of(deferred)
    assert info.value.status == 429
    assert len(fake.requests) == 1


# -- timeouts on the injected clock ----------------------------------------------------


def test_timeout_then_success() -> None:
    clock = Clock()
    fake = FakeTwilio(None, (200, {"sid": CALL}))
    stub_treq = StubTreq(fake)
    credentials = TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN)
    http = cast(HTTPClient, stub_treq)
    deferred = TwilioRestClient(http, clock, credentials, timeout=5.0).hang_up(CALL)
    clock.advance(4.9)
    assert not_fired(deferred)
    assert len(fake.requests) == 1
    clock.advance(0.1)  # the first attempt times out and is cancelled
    stub_treq.flush()
    assert fake.cancelled == 1
    clock.advance(0.5)  # backoff
    assert len(fake.requests) == 2
    assert result_of(deferred) == "hung-up"


def test_timeout_every_time() -> None:
    clock = Clock()
    fake = FakeTwilio(None, None)
    stub_treq = StubTreq(fake)
    credentials = TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN)
    http = cast(HTTPClient, stub_treq)
    deferred = TwilioRestClient(http, clock, credentials, timeout=2.0, max_attempts=2).hang_up(CALL)
    clock.advance(2.0)
    clock.advance(0.5)
    clock.advance(2.0)
    stub_treq.flush()
    with pytest.raises(TwilioTransportError) as info:
        result_of(deferred)
    assert info.value.timed_out
    assert info.value.attempts == 2
    assert "2 s" in str(info.value)
    assert fake.cancelled == 2
    assert clock.getDelayedCalls() == []


def test_cancelling_the_operation_ends_it_without_retry() -> None:
    clock = Clock()
    fake = FakeTwilio(None, (200, {}))
    deferred = client(fake, clock).hang_up(CALL)
    deferred.cancel()
    with pytest.raises(CancelledError):
        result_of(deferred)
    clock.advance(60)
    assert len(fake.requests) == 1
    assert clock.getDelayedCalls() == []


def test_cancelling_during_backoff() -> None:
    clock = Clock()
    fake = FakeTwilio((500, {}), (200, {}))
    deferred = client(fake, clock).hang_up(CALL)
    deferred.cancel()
    with pytest.raises(CancelledError):
        result_of(deferred)
    clock.advance(60)
    assert len(fake.requests) == 1


# -- create a call ---------------------------------------------------------------------


def test_create_call() -> None:
    fake = FakeTwilio((201, {"sid": "CA" + "d" * 32, "status": "queued"}))
    deferred = client(fake, Clock()).create_call(
        to="+15550002222",
        from_="+15550001111",
        twiml="<Response><Say>Hi</Say></Response>",
        status_callback="https://gw.example.com/twilio/status",
        status_callback_events=("initiated", "answered", "completed"),
        extra_parameters=[("Timeout", "20")],
    )
    assert result_of(deferred) == "CA" + "d" * 32
    (request,) = fake.requests
    assert request["path"] == CALLS_PATH
    assert request["form"] == {
        "To": ["+15550002222"],
        "From": ["+15550001111"],
        "Twiml": ["<Response><Say>Hi</Say></Response>"],
        "StatusCallback": ["https://gw.example.com/twilio/status"],
        "StatusCallbackEvent": ["initiated", "answered", "completed"],
        "StatusCallbackMethod": ["POST"],
        "Timeout": ["20"],
    }


def test_create_call_with_url_and_api_key() -> None:
    fake = FakeTwilio((201, {"sid": "CA1"}))
    credentials = TwilioCredentials.from_api_key(ACCOUNT, API_KEY, API_SECRET)
    deferred = client(fake, Clock(), credentials).create_call(
        to="+1", from_="+2", url="https://gw.example.com/twiml"
    )
    assert result_of(deferred) == "CA1"
    (request,) = fake.requests
    assert request["path"] == CALLS_PATH  # the account SID in the URL...
    assert request["authorization"] == basic(API_KEY, API_SECRET)  # ...the key in the auth
    assert request["form"] == {
        "To": ["+1"],
        "From": ["+2"],
        "Url": ["https://gw.example.com/twiml"],
    }
    assert API_SECRET not in repr(credentials)


def test_create_call_is_not_retried_on_ambiguous_failures_by_default() -> None:
    clock = Clock()
    fake = FakeTwilio((500, {"code": 20500, "message": "Internal"}), (201, {"sid": "CA1"}))
    deferred = client(fake, clock).create_call(to="+1", from_="+2", twiml="<Response/>")
    clock.advance(10)
    with pytest.raises(TwilioApiError):
        result_of(deferred)
    assert len(fake.requests) == 1

    fake = FakeTwilio(None, (201, {"sid": "CA1"}))
    deferred = client(fake, clock).create_call(to="+1", from_="+2", twiml="<Response/>")
    clock.advance(10)
    with pytest.raises(TwilioTransportError):
        result_of(deferred)
    assert len(fake.requests) == 1


def test_create_call_retried_when_asked() -> None:
    clock = Clock()
    fake = FakeTwilio((500, {}), (201, {"sid": "CA1"}))
    deferred = client(fake, clock).create_call(
        to="+1", from_="+2", twiml="<Response/>", retry_ambiguous_failures=True
    )
    clock.advance(0.5)
    assert result_of(deferred) == "CA1"


def test_created_but_no_sid() -> None:
    fake = FakeTwilio((201, {"status": "queued"}))
    with pytest.raises(TwilioApiError) as info:
        result_of(client(fake, Clock()).create_call(to="+1", from_="+2", twiml="<Response/>"))
    assert info.value.status == 201


def test_create_call_argument_checks() -> None:
    rest = client(FakeTwilio(), Clock())
    with pytest.raises(ValueError):
        rest.create_call(to="+1", from_="+2", twiml="x" * (MAX_TWIML_CHARS + 1))
    with pytest.raises(ValueError):
        rest.create_call(to="+1", from_="+2", twiml="<Response/>", url="https://x")
    with pytest.raises(ValueError):
        rest.create_call(to="+1", from_="+2")
    with pytest.raises(ValueError):
        rest.create_call(to="", from_="+2", twiml="<Response/>")
    with pytest.raises(ValueError):
        rest.create_call(
            to="+1",
            from_="+2",
            twiml="<Response/>",
            status_callback="https://x",
            status_callback_events=["exploded"],
        )
    with pytest.raises(ValueError):
        rest.create_call(
            to="+1", from_="+2", twiml="<Response/>", status_callback_events=["ringing"]
        )
    with pytest.raises(TwilioApiError):  # accepted and sent: the fake answers 500
        result_of(rest.create_call(to="+1", from_="+2", twiml="x" * MAX_TWIML_CHARS))


# -- redirect --------------------------------------------------------------------------


def test_redirect() -> None:
    fake = FakeTwilio((200, {}), (200, {}))
    rest = client(fake, Clock())
    assert result_of(rest.redirect(CALL, twiml="<Response><Hangup/></Response>")) is None
    assert result_of(rest.redirect(CALL, url="https://gw.example.com/next", method="GET")) is None
    assert fake.requests[0]["form"] == {"Twiml": ["<Response><Hangup/></Response>"]}
    assert fake.requests[1]["form"] == {"Url": ["https://gw.example.com/next"], "Method": ["GET"]}
    assert fake.requests[1]["path"] == CALL_PATH
    with pytest.raises(ValueError):
        rest.redirect(CALL)


@pytest.mark.parametrize("sid", ["", "../Calls", "CA1/../../x", "CA 1", "1234"])
def test_sids_are_checked_before_use_in_a_path(sid: str) -> None:
    rest = client(FakeTwilio(), Clock())
    with pytest.raises(ValueError):
        rest.hang_up(sid)
    with pytest.raises(ValueError):
        TwilioCredentials.from_auth_token(sid, AUTH_TOKEN)


# -- network failures ------------------------------------------------------------------


class FailingFirst:
    """A treq-like client whose first requests fail with the given exceptions."""

    def __init__(self, fake: FakeTwilio, *failures: Exception) -> None:
        self.inner = stub(fake)
        self.failures = list(failures)
        self.calls = 0

    def request(
        self, method: str, url: str, *, data: bytes, headers: Headers, allow_redirects: bool
    ) -> Deferred[Any]:
        self.calls += 1
        if self.failures:
            return fail(self.failures.pop(0))
        return self.inner.request(
            method, url, data=data, headers=headers, allow_redirects=allow_redirects
        )


def test_connection_refused_is_retried_even_for_create_call() -> None:
    clock = Clock()
    http = FailingFirst(FakeTwilio((201, {"sid": "CA1"})), ConnectionRefusedError())
    rest = TwilioRestClient(http, clock, TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN))
    deferred = rest.create_call(to="+1", from_="+2", twiml="<Response/>")
    clock.advance(0.5)
    assert result_of(deferred) == "CA1"
    assert http.calls == 2


def test_lost_response_is_retried_for_hang_up_not_for_create_call() -> None:
    clock = Clock()
    credentials = TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN)
    http = FailingFirst(FakeTwilio((200, {})), ResponseNeverReceived([]))
    deferred = TwilioRestClient(http, clock, credentials).hang_up(CALL)
    clock.advance(0.5)
    assert result_of(deferred) == "hung-up"

    http = FailingFirst(FakeTwilio((201, {"sid": "CA1"})), ResponseNeverReceived([]))
    created = TwilioRestClient(http, clock, credentials).create_call(
        to="+1", from_="+2", twiml="<Response/>"
    )
    with pytest.raises(TwilioTransportError) as info:
        result_of(created)
    assert not info.value.timed_out
    assert "ResponseNeverReceived" in str(info.value)
    assert http.calls == 1


def test_other_exceptions_are_not_swallowed() -> None:
    http = FailingFirst(FakeTwilio(), KeyError("bug"))
    rest = TwilioRestClient(http, Clock(), TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN))
    with pytest.raises(KeyError):
        result_of(rest.hang_up(CALL))


def test_configuration_checks() -> None:
    credentials = TwilioCredentials.from_auth_token(ACCOUNT, AUTH_TOKEN)
    for bad in ({"timeout": 0}, {"max_attempts": 0}, {"backoff_factor": 0.5}):
        with pytest.raises(ValueError):
            TwilioRestClient(stub(FakeTwilio()), Clock(), credentials, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TwilioCredentials.from_auth_token(ACCOUNT, "")
    assert AUTH_TOKEN not in repr(credentials)
    assert AUTH_TOKEN not in repr(TwilioRestClient(stub(FakeTwilio()), Clock(), credentials))
