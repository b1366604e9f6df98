"""The fuzz targets: every parser that takes outside input, fed one input (bytes) at a time.

A :class:`FuzzTarget` says how one input reaches its parser (``feed``), which
exceptions are the parser's own way of saying "bad input" (``allowed``) and seed
inputs (valid ones, for the coverage-guided engine to mutate).  ``feed`` also checks
properties of what the parser returns with ``assert`` (e.g. a random string never
verifies as a stream token, a route never answers 500, a request body beyond its limit
never reaches a resource): any exception that is not in ``allowed`` — an
``AssertionError`` included — is a crash.  :func:`crash_of` runs one input and
returns the crash, if any.

The same targets serve the hypothesis tests (``test_fuzz_parsers.py``: structured
inputs, a few dozen per target) and the long runs of ``bench/fuzz.py`` (atheris:
coverage-guided mutation of the seeds).  Everything runs in memory: Klein routes
through ``StubTreq``, the HTTP listener through a ``StringTransport`` on a ``Clock``.
"""

from __future__ import annotations

import base64
import itertools
import json
import tempfile
import traceback
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

import known_secrets
import msgspec
import txaio
from ini import minimal_ini
from klein import Klein
from treq.testing import StubTreq
from twilio.request_validator import RequestValidator
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gateway.admin import BadRequestError, PlaceCallRequest, parse_place_call
from gateway.admission import Admission
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.config import ConfigError, Settings, parse_settings
from gateway.http_limits import HttpLimits, LimitedSite, request_path
from gateway.twilio.codec import (
    InboundMessage,
    MediaStreamDecoder,
    MediaStreamProtocolError,
    UnknownMessage,
)
from gateway.twilio.routes import (
    TwilioRoutes,
    signature_validator_from,
    stream_tokens_from,
    twiml_answers_from,
)
from gateway.twilio.signature import TwilioSignatureValidator, parse_form_body, public_url
from gateway.twilio.stream import CloseStream, MediaStreamState
from gateway.twilio.token import StreamTokens
from gateway.vapi.codec import CallMessageError, decode_event, is_barge_in, is_call_end
from gateway.vapi.routes import VapiRoutes
from gateway.vapi.webhook_auth import (
    BearerAuth,
    HmacAuth,
    SharedSecretAuth,
    authenticate,
    headers_from_raw,
)
from gateway.vapi.webhook_messages import WebhookBodyError, parse_server_message

__all__ = ["TARGETS", "Crash", "FuzzTarget", "crash_of", "signature_key"]

ROOT: Final = Path(__file__).resolve().parents[2]
PUBLIC: Final = "https://gw.example.com"
ACCOUNT: Final = "AC" + "0" * 32
CALL_SID: Final = "CA" + "1" * 32
STREAM_SID: Final = "MZ" + "2" * 32
NOW: Final = 1_700_000_000.0
SECRETS: Final = tuple(s.encode() for s in known_secrets.ALL)
FUZZ_ENVIRON: Final = {
    "TWILIO_AUTH_TOKEN": known_secrets.TWILIO_AUTH_TOKEN,
    "STREAM_TOKEN_SECRET": known_secrets.STREAM_TOKEN_SECRET,
    "VAPI_API_KEY": known_secrets.VAPI_API_KEY,
    "VAPI_WEBHOOK_SECRET": known_secrets.VAPI_WEBHOOK_SECRET,
}
"""The environment the ini target resolves ``env:`` secrets from (never os.environ)."""


@dataclass(frozen=True)
class FuzzTarget:
    """One parser under fuzzing."""

    name: str
    parser: str
    """What is fuzzed, for the report."""
    feed: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]] = field(repr=False)
    dictionary: tuple[bytes, ...] = ()
    """Tokens the coverage-guided engine may splice into inputs (libFuzzer ``-dict``)."""


@dataclass(frozen=True)
class Crash:
    """An input that made a target raise something other than its own errors."""

    target: str
    error: BaseException
    where: str
    """The innermost frame of the traceback, ``file:line`` (the crash's identity)."""

    @property
    def key(self) -> str:
        return f"{type(self.error).__name__} at {self.where}"


def crash_of(target: FuzzTarget, data: bytes) -> Crash | None:
    """Feed ``data`` to ``target``; the crash it caused, or None."""
    try:
        target.feed(data)
    except target.allowed:
        return None
    except Exception as error:  # a crash: anything else, AssertionError included
        return Crash(target.name, error, signature_key(error))
    return None


def signature_key(error: BaseException) -> str:
    """``file:line`` of the innermost frame of ``error``'s traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    path = Path(last.filename)
    try:
        shown = str(path.relative_to(ROOT))
    except ValueError:
        shown = "/".join(path.parts[-2:])
    return f"{shown}:{last.lineno}"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- settings shared by the route targets -------------------------------------------


@cache
def _settings() -> Settings:
    return parse_settings(minimal_ini(gateway={"public_url": PUBLIC},
                                      routing={"+15551230001": "asst-sales"}),
                          "fuzz.ini", {})


# -- Twilio Media Streams ----------------------------------------------------------------

_DECODER: Final = MediaStreamDecoder()


def _media_seeds() -> list[bytes]:
    frames = [
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        {"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID,
         "start": {"accountSid": ACCOUNT, "streamSid": STREAM_SID, "callSid": CALL_SID,
                   "tracks": ["inbound"],
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                   "channels": 1},
                   "customParameters": {"CallSid": CALL_SID, "streamToken": "abc"}}},
        {"event": "media", "sequenceNumber": "2", "streamSid": STREAM_SID,
         "media": {"track": "inbound", "chunk": "1", "timestamp": "5",
                   "payload": "//////////8="}},
        {"event": "dtmf", "sequenceNumber": "3", "streamSid": STREAM_SID,
         "dtmf": {"track": "inbound_track", "digit": "1"}},
        {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM_SID,
         "mark": {"name": "g1-5"}},
        {"event": "stop", "sequenceNumber": "5", "streamSid": STREAM_SID,
         "stop": {"accountSid": ACCOUNT, "callSid": CALL_SID}},
    ]
    return [_json(frame) for frame in frames]


def _feed_media_decoder(data: bytes) -> None:
    """One frame, as bytes (what Autobahn delivers) and, if it is UTF-8, as text."""
    message = _DECODER.decode(data)
    assert isinstance(message, (*typing.get_args(InboundMessage), UnknownMessage))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    again = _DECODER.decode(text)
    assert again == message, "bytes and text of one frame decode differently"


def _feed_media_stream(data: bytes) -> None:
    """A whole stream: frames separated by newlines (a frame starting with NUL is
    binary).  ``receive_frame`` never raises; after CloseStream every frame is ignored;
    once started, the frames the gateway builds for the stream are valid JSON carrying
    the stream SID Twilio gave (whatever characters it holds)."""
    state = MediaStreamState(max_violations=4, max_message_bytes=4096)
    closed = False
    for frame in data.split(b"\n"):
        event = state.receive_frame(frame, frame.startswith(b"\x00"))
        if closed:
            assert event is None, "a frame after CloseStream was processed"
        closed = closed or isinstance(event, CloseStream)
    if state.started and state.stream_sid is not None:
        for outbound in (state.media_frame(b"\xff" * 160), state.mark_frame("g1-5"),
                         state.clear_frame()):
            decoded = msgspec.json.decode(outbound)
            assert decoded["streamSid"] == state.stream_sid


# -- Vapi call socket --------------------------------------------------------------------


def _vapi_event_seeds() -> list[bytes]:
    return [_json(event) for event in (
        {"type": "speech-update", "status": "started", "role": "user", "turn": 2},
        {"type": "user-interrupted", "turnId": "t-1"},
        {"type": "transcript", "role": "user", "transcriptType": "final", "transcript": "hi"},
        {"type": "model-output", "output": "Hello", "turnId": 3},
        {"type": "status-update", "status": "ended", "endedReason": "customer-ended-call"},
        {"type": "conversation-update", "messages": [{"role": "user", "message": "hi"}]},
        {"type": "hang"},
        {"type": "end-of-call-report", "endedReason": "hangup", "durationSeconds": 12.5},
        {"type": "tool-calls", "toolCallList": [
            {"id": "c1", "name": "lookup", "parameters": {"q": "x"}},
            {"id": "c2", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        {"type": "workflow.node.started", "node": {}},
    )]


def _feed_vapi_event(data: bytes) -> None:
    event = decode_event(data)
    is_barge_in(event)
    is_call_end(event)


# -- Twilio webhook forms and signatures -------------------------------------------------


@cache
def _validator() -> TwilioSignatureValidator:
    return signature_validator_from(_settings())


_CONTENT_TYPES: Final = (b"application/x-www-form-urlencoded", b"application/json",
                         b"text/plain", None, b"application/JSON; charset=utf-8")


def _twilio_form_seeds() -> list[bytes]:
    params = {"CallSid": CALL_SID, "AccountSid": ACCOUNT, "From": "+15550001111",
              "To": "+15550002222", "CallStatus": "ringing"}
    body = urlencode(params).encode()
    signature = str(RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(
        PUBLIC + "/twilio/voice", params)).encode()
    return [b"\x00/twilio/voice\n" + signature + b"\n" + body,
            b"\x01/twilio/voice?bodySHA256=abc\n" + signature + b"\n{\"a\":1}",
            b"\x00/twilio/status?x=1&y=%20\nsig\nCallSid=CA1&CallSid=CA2&Empty=&a+b=%E2%82%AC"]


def _feed_twilio_form(data: bytes) -> None:
    """``parse_form_body`` and the whole signature check never raise: first byte picks
    the Content-Type, then the request target, the signature header, the body."""
    kind = data[:1]
    target, _, rest = data[1:].partition(b"\n")
    signature, _, body = rest.partition(b"\n")
    form = parse_form_body(body)
    assert all(isinstance(k, bytes) and all(isinstance(v, bytes) for v in vs)
               for k, vs in form.items())
    content_type = _CONTENT_TYPES[kind[0] % len(_CONTENT_TYPES)] if kind else None
    url = public_url(PUBLIC, target)
    check = _validator().check_request(url, content_type, body, signature or None)
    assert check.ok or check.reason is not None
    _validator().check_websocket(url, signature)


# -- the Twilio webhook routes (through twisted.web) --------------------------------------


@dataclass
class _RecordingCalls:
    """The switchboard as the Twilio routes see it."""

    live: set[str] = field(default_factory=set)

    def open_call(self, info: Any) -> object:
        self.live.add(info.call_sid)
        return None

    def holds(self, call_sid: str) -> bool:
        return call_sid in self.live

    def call_status(self, call_sid: str, status: str) -> bool:
        return status == "completed" and self.end_call(call_sid, "status") is not None

    def end_call(self, call_sid: str, cause: str) -> object:
        if call_sid in self.live:
            self.live.discard(call_sid)
            return True
        return None

    def attach_stream(self, stream: Any, started: Any) -> Any:
        raise AssertionError("not used by the routes")


class _TwilioRoutesRig:
    """TwilioRoutes on a Klein app behind StubTreq (the real twisted.web request path)."""

    PATHS: Final = ("/twilio/voice", "/twilio/status", "/twilio/stream-status")

    def __init__(self) -> None:
        settings = _settings()
        clock = Clock()
        clock.advance(NOW)
        self.calls = _RecordingCalls()
        app = Klein()
        TwilioRoutes(settings, validator=signature_validator_from(settings),
                     tokens=stream_tokens_from(settings),
                     twiml=twiml_answers_from(settings),
                     admission=Admission(InMemoryCallRegistry(), 1_000_000),
                     calls=self.calls, clock=clock).register(app)
        self.stub: Any = StubTreq(app.resource())
        self.signer = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        response = _fired(self.stub.post("http://10.0.0.5:8080" + path, data=body,
                                         headers=headers))
        return response.code, _fired(self.stub.content(response))

    def sign(self, url: str, body: bytes) -> str:
        """The signature Twilio would send for this form body (repeated names kept)."""
        form: dict[str, list[str]] = _MultiValueForm()
        for name, values in parse_form_body(body).items():
            form.setdefault(name.decode("utf-8"), []).extend(v.decode("utf-8") for v in values)
        return str(self.signer.compute_signature(url, form))


class _MultiValueForm(dict[str, list[str]]):
    def getlist(self, name: str) -> list[str]:
        return self[name]


def _fired(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "StubTreq did not answer synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@cache
def _twilio_routes_rig() -> _TwilioRoutesRig:
    return _TwilioRoutesRig()


def _twilio_route_seeds() -> list[bytes]:
    voice = urlencode({"CallSid": CALL_SID, "AccountSid": ACCOUNT, "From": "+15550001111",
                       "To": "+15550002222"}).encode()
    status = urlencode({"CallSid": CALL_SID, "CallStatus": "completed",
                        "SequenceNumber": "3"}).encode()
    stream = urlencode({"CallSid": CALL_SID, "StreamEvent": "stream-error",
                        "StreamError": "31921", "StreamSid": STREAM_SID}).encode()
    return [b"\x00" + voice, b"\x01" + status, b"\x02" + stream, b"\x03" + voice,
            b"\x00CallSid=CA%FF&From=%C3"]


def _feed_twilio_route(data: bytes) -> None:
    """POST to one of the three webhooks, correctly signed whenever the body is UTF-8
    (bit 2 of the first byte: unsigned instead).  Only 200/204/400/403/413 may come back,
    and no secret in the answer."""
    if not data:
        return
    rig = _twilio_routes_rig()
    selector, body = data[0], data[1:]
    path = rig.PATHS[selector % 3]
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if not selector & 4:
        try:
            headers["X-Twilio-Signature"] = rig.sign(PUBLIC + path, body)
        except UnicodeDecodeError:
            headers["X-Twilio-Signature"] = "bm90IGEgc2lnbmF0dXJlIGF0IGFsbA=="
    code, answer = rig.post(path, body, headers)
    assert code in (200, 204, 400, 403, 413), f"{path} answered {code}"
    assert not any(secret in answer for secret in SECRETS), "a secret in the answer"


# -- Vapi server-URL webhooks ---------------------------------------------------------


def _vapi_webhook_seeds() -> list[bytes]:
    messages = [
        {"message": {"type": "assistant-request", "call": {"id": "v-1"},
                     "phoneNumber": {"number": "+15551230001"},
                     "customer": {"number": "+15550001111"}}},
        {"message": {"type": "status-update", "status": "ended",
                     "endedReason": "customer-ended-call", "call": {"id": "v-1"}}},
        {"message": {"type": "end-of-call-report", "endedReason": "hangup",
                     "call": {"id": "v-1"}}},
        {"message": {"type": "tool-calls", "call": {"id": "v-1"},
                     "toolCallList": [{"id": "t1", "name": "lookup", "parameters": {}}]}},
        {"message": {"type": "hang", "call": {"id": "v-1"}}},
    ]
    return [_json(message) for message in messages]


def _feed_vapi_webhook(data: bytes) -> None:
    parse_server_message(data)


class _VapiRoutesRig:
    """VapiRoutes (shared-secret auth) on a Klein app behind StubTreq."""

    def __init__(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        app = Klein()
        VapiRoutes(_settings(), calls=self, clock=clock).register(app)
        self.stub: Any = StubTreq(app.resource())

    def vapi_call_ended(self, vapi_call_id: str) -> bool:
        return False


@cache
def _vapi_routes_rig() -> _VapiRoutesRig:
    return _VapiRoutesRig()


def _feed_vapi_route(data: bytes) -> None:
    """POST /vapi/events with the right secret: 200 with JSON, 400 or 413 only."""
    stub = _vapi_routes_rig().stub
    response = _fired(stub.post("http://127.0.0.1:8080/vapi/events", data=data,
                                headers={"X-Vapi-Secret": known_secrets.VAPI_WEBHOOK_SECRET,
                                         "Content-Type": "application/json"}))
    answer = _fired(stub.content(response))
    assert response.code in (200, 400, 413), f"/vapi/events answered {response.code}"
    assert isinstance(json.loads(answer), dict)
    assert not any(secret in answer for secret in SECRETS), "a secret in the answer"


_AUTHS: Final = (
    SharedSecretAuth(known_secrets.VAPI_WEBHOOK_SECRET.encode()),
    BearerAuth(known_secrets.VAPI_WEBHOOK_SECRET.encode()),
    HmacAuth(known_secrets.VAPI_WEBHOOK_SECRET.encode()),
    HmacAuth(known_secrets.VAPI_WEBHOOK_SECRET.encode(), algorithm="sha1",
             encoding="base64"),
)


def _webhook_auth_seeds() -> list[bytes]:
    return [b"x-vapi-secret: abc\nauthorization: Bearer abc\n\n{}",
            b"x-signature: sha256=00ff\nx-timestamp: 1700000000\n\nbody",
            b"x-timestamp: 1700000000000\nx-timestamp: 1\n\n"]


def _feed_webhook_auth(data: bytes) -> None:
    """Header lines (``name: value``), a blank line, the body: never raises, never
    authenticates (the secret is not guessable)."""
    head, _, body = data.partition(b"\n\n")
    pairs: list[tuple[bytes, list[bytes]]] = []
    for line in head.split(b"\n"):
        name, _, value = line.partition(b":")
        pairs.append((name.strip(), [value.strip()]))
    headers = headers_from_raw(pairs)
    for auth in _AUTHS:
        result = authenticate(auth, headers, body, int(NOW * 1e9))
        assert not result.ok, "a random request authenticated"
        assert isinstance(result.reason, str)


# -- the admin API ------------------------------------------------------------------------


def _place_call_seeds() -> list[bytes]:
    return [_json(body) for body in (
        {"to": "+15550001111", "from": "+15551230001"},
        {"to": "+15550001111", "from": "+15551230001", "assistantId": "asst-1",
         "variables": {"name": "Ada", "plan.tier": "gold"}},
        {"to": "+1", "from": 5, "extra": None},
    )]


def _feed_place_call(data: bytes) -> None:
    """Anything accepted is usable downstream: JSON-encodable (the Vapi call body, the
    log line) and within the documented shapes."""
    wanted = parse_place_call(data)
    assert isinstance(wanted, PlaceCallRequest)
    msgspec.json.encode({"to": wanted.to, "from": wanted.caller,
                         "assistantId": wanted.assistant_id,
                         "variables": dict(wanted.variables)})


# -- the ini loader ------------------------------------------------------------------------


def _ini_seeds() -> list[bytes]:
    shipped = (ROOT / "etc" / "vapi-gateway.ini").read_bytes()
    assistant = (ROOT / "etc" / "assistant.json").read_bytes()
    return [minimal_ini().encode(), shipped + ASSISTANT_FILE_MARK + assistant,
            minimal_ini(assistant={"id": "", "file": "assistant.json"}).encode()
            + ASSISTANT_FILE_MARK + b'{"firstMessage": "Hi"}',
            b"[gateway]\nlisten = tcp:8080:interface=127.0.0.1\nmax_concurrent_calls = 7\n"
            b"[twilio]\nauth_token = env:TWILIO_AUTH_TOKEN\n[routing]\n+15551230001 = a\n"]


_UNSAFE_PATHS: Final = (b"/dev", b"/proc", b"/sys")
ASSISTANT_FILE_MARK: Final = b"\n\x00assistant.json\x00\n"
"""In an ini input, what follows this mark is the content of ``assistant.json`` (the
file ``file:assistant.json`` names, next to the ini file)."""


@cache
def _ini_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="vapi-gateway-fuzz-ini-"))


def _feed_ini(data: bytes) -> None:
    """Random ini text (and an assistant file next to it) gives a Settings or a
    ConfigError, nothing else.  ``env:`` resolves from a fixed dict; inputs naming device
    or kernel files are skipped (``file:/dev/zero`` would read forever: the config is the
    operator's, not an attacker's)."""
    ini, _, assistant = data.partition(ASSISTANT_FILE_MARK)
    if any(path in line for line in ini.split(b"\n") for path in _UNSAFE_PATHS
           if not line.lstrip().startswith((b";", b"#"))):
        return
    folder = _ini_folder()
    (folder / "assistant.json").write_bytes(assistant)
    text = ini.decode("utf-8", "replace")
    settings = parse_settings(text, str(folder / "fuzz.ini"), FUZZ_ENVIRON)
    assert isinstance(settings, Settings)


# -- stream tokens ------------------------------------------------------------------------


def _token_seeds() -> list[bytes]:
    genuine = _tokens_for_seeds().issue(CALL_SID, NOW)
    return [b"\x00" + genuine.encode() + b"\x00" + CALL_SID.encode(),
            b"\x01\x05\x07\x50\x01", b"\x00AAAA\x00CA1", b"\x01"]


def _tokens_for_seeds() -> StreamTokens:
    counter = itertools.count(1)
    return StreamTokens(known_secrets.STREAM_TOKEN_SECRET,
                        random_bytes=lambda n: next(counter).to_bytes(n, "big"))


def _feed_token(data: bytes) -> None:
    """First byte even: ``token NUL callSid`` as text, verified: never raises, never
    accepted unless it is the genuine token for its call.  Odd: a genuine token with
    bytes of the input XORed in at positions the input picks: accepted only if it still
    decodes to the genuine token's bytes (an alias), and then the genuine one is refused
    as replayed (single use)."""
    tokens = _tokens_for_seeds()
    if not data or data[0] % 2 == 0:
        token, _, call_sid = data[1:].decode("utf-8", "replace").partition("\x00")
        check = tokens.verify(token, call_sid, NOW)
        if check.ok:  # only the genuine token (a seed) for its own call
            genuine = _tokens_for_seeds().issue(CALL_SID, NOW)
            assert (_token_bytes(token), call_sid) == (_token_bytes(genuine), CALL_SID), (
                "a forged stream token verified")
        return
    genuine = tokens.issue(CALL_SID, NOW)
    chars = bytearray(genuine.encode())
    edits = data[1:]
    for position, flip in zip(edits[::2], edits[1::2], strict=False):
        chars[position % len(chars)] ^= flip
    mutated = chars.decode("latin-1")
    check = tokens.verify(mutated, CALL_SID, NOW + 1)
    if check.ok:
        assert _token_bytes(mutated) == _token_bytes(genuine), "a tampered token verified"
        assert tokens.verify(genuine, CALL_SID, NOW + 1).reason == "replayed"


def _token_bytes(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


# -- the HTTP listener (gateway.http_limits) ---------------------------------------------


class _BodyLengthResource(Resource):
    """Answers every request with the length of the body it was given, after checking
    that the body is within the limit of its path."""

    isLeaf = True

    def __init__(self, limits: HttpLimits) -> None:
        super().__init__()
        self.limits = limits
        self.served = 0

    def render(self, request: IRequest) -> bytes:
        content = request.content
        body = content.read() if content is not None else b""
        limit = self.limits.body_limit(request.uri)
        assert len(body) <= limit, f"a {len(body)}-byte body reached the resource (limit {limit})"
        self.served += 1
        return str(len(body)).encode()


_HTTP_LIMITS: Final = HttpLimits(read_timeout=10, max_body_size=64,
                                 max_body_size_by_path={b"/big": 256, b"/none": 0})


def _http_seeds() -> list[bytes]:
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    return [
        b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        b"POST /none?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: 100-continue\r\n"
        b"\r\nx",
        b"GET http://x/big HTTP/1.1\r\nHost: x\r\n\r\nGET /small HTTP/1.1\r\n\r\n",
        b"POST /big HTTP/1.1\r\nContent-Length: 300\r\n\r\n" + b"a" * 300,
    ]


def _feed_http(data: bytes) -> None:
    """Raw bytes into a LimitedSite (in two pieces, then the read deadline passes): no
    exception escapes, no body beyond its path's limit reaches the resource, every answer
    is HTTP (1.1, or 1.0 to a 1.0 request), and no timer outlives the connection."""
    clock = Clock()
    resource = _BodyLengthResource(_HTTP_LIMITS)
    site = LimitedSite(resource, _HTTP_LIMITS, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    middle = len(data) // 2
    for piece in (data[:middle], data[middle:]):
        if not transport.disconnecting:  # a closing TCP transport stops reading
            channel.dataReceived(piece)
    clock.advance(_HTTP_LIMITS.read_timeout)
    clock.advance(_HTTP_LIMITS.read_timeout)  # Twisted's idle timeout too, if it runs
    channel.connectionLost(Failure(ConnectionError("fuzz input over")))
    clock.advance(60)
    out = transport.value()
    assert not out or out.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), out[:40]
    assert not clock.getDelayedCalls(), "a timer outlived the connection"
    assert request_path(b"/x?y") == b"/x"


# -- WebSocket frames: the gateway's fast path against Autobahn --------------------------------


class _LenientTransport(StringTransport):
    """A StringTransport that, like TCP, tolerates Autobahn's abort and unregister."""

    aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class _RecordingSocket:
    """What a server socket saw: messages and the close."""

    def onOpen(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((bytes(payload), isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)


_WS_KEY: Final = base64.b64encode(b"0123456789abcdef")
_WS_HANDSHAKE: Final = (b"GET /twilio/media HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: " + _WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _ws_server(protocol_class: type[Any]) -> tuple[Any, _LenientTransport]:
    from autobahn.twisted.websocket import WebSocketServerFactory

    factory = WebSocketServerFactory("ws://127.0.0.1:8080")
    factory.protocol = protocol_class
    factory.setProtocolOptions(maxMessagePayloadSize=1024, maxFramePayloadSize=512,
                               autoPingInterval=0, openHandshakeTimeout=0,
                               closeHandshakeTimeout=0)
    protocol: Any = factory.buildProtocol(None)
    transport = _LenientTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(_WS_HANDSHAKE)
    transport.clear()
    return protocol, transport


def _ws_frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04"
              ) -> bytes:
    from gateway.websocket_fastpath import xor_mask

    n = len(payload)
    first = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head = first + bytes([0x80 | n])
    elif n < 65536:
        head = first + bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = first + bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + (xor_mask(mask, payload) if payload else b"")


def _websocket_seeds() -> list[bytes]:
    media = _media_seeds()[2]
    return [
        b"\x00" + _ws_frame(media) + _ws_frame(b"\xff" * 160, opcode=2),
        b"\x05" + _ws_frame(b"x" * 300, fin=False) + _ws_frame(b"y" * 10, opcode=0),
        b"\x03" + _ws_frame(b"ping", opcode=9) + _ws_frame(media) + _ws_frame(b"\x03\xe8", 8),
        b"\x01" + _ws_frame("caf\u00e9".encode()) + _ws_frame(b"\xc3(") + _ws_frame(b"z" * 600),
        b"\x02" + _ws_frame(b"a" * 200) + _ws_frame(b"b" * 2000),
    ]


def _feed_websocket(data: bytes) -> None:
    """Client frames (after the opening handshake) into a server socket with the gateway's
    FastFrames fast path and into plain Autobahn, cut in two where the first byte says:
    both must deliver the same messages, write the same bytes and end the same way."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    from gateway.websocket_fastpath import FastFrames

    class PlainSocket(_RecordingSocket, WebSocketServerProtocol):  # type: ignore[misc]
        pass

    class FastSocket(_RecordingSocket, FastFrames, WebSocketServerProtocol):  # type: ignore[misc]
        pass

    if not data:
        return
    cut, frames = data[0], data[1:]
    seen = []
    saved = txaio.config.loop  # type: ignore[attr-defined]
    txaio.config.loop = Clock()  # type: ignore[attr-defined]
    try:
        for protocol_class in (PlainSocket, FastSocket):
            protocol, transport = _ws_server(protocol_class)
            at = cut * len(frames) // 255
            for piece in (frames[:at], frames[at:]):
                if piece and not transport.disconnecting:
                    protocol.dataReceived(piece)
            seen.append((protocol.messages, protocol.state, transport.value(),
                         transport.aborted, protocol.wasClean, protocol.localCloseCode))
    finally:
        txaio.config.loop = saved  # type: ignore[attr-defined]
    assert seen[0] == seen[1], f"Autobahn: {seen[0]!r:.300}\nfast path: {seen[1]!r:.300}"


# -- the registry ------------------------------------------------------------------------------


_JSON_TOKENS: Final = (b'"', b"\\ud800", b"\\udfff", b"\\u0000", b"\xff", b"\xc3", b"\xed\xa0\x80",
                      b"null", b"true", b"1e999", b"-1", b"9007199254740993", b"[]", b"{}",
                      b'"event"', b'"type"', b'"message"', b'"sequenceNumber"', b'"payload"')
_INI_TOKENS: Final = (b"[gateway]\n", b"[twilio]\n", b"[vapi]\n", b"[admin]\n",
                      b"[assistant]\n", b"[routing]\n", b"[local_assistant]\n", b" = ",
                      b"listen", b"public_url", b"api_url", b"file", b"id", b"token",
                      b"tcp:", b"ssl:", b"port=", b"\xc2\xb2", b"\xd9\xa3", b"https://",
                      b"[::1", b"env:", b"file:assistant.json", b"nan", b"inf", b"1e999",
                      b"\n\x00assistant.json\x00\n", b"[[[[[[[[", b'{"a":{"a":')


def _target(name: str, parser: str, feed: Callable[[bytes], object],
            allowed: tuple[type[BaseException], ...], seeds: Callable[[], list[bytes]],
            dictionary: tuple[bytes, ...] = _JSON_TOKENS) -> tuple[str, FuzzTarget]:
    return name, FuzzTarget(name, parser, feed, allowed, seeds, dictionary)


TARGETS: Final[Mapping[str, FuzzTarget]] = dict((
    _target("twilio-media-decoder", "MediaStreamDecoder.decode", _feed_media_decoder,
            (MediaStreamProtocolError,), _media_seeds),
    _target("twilio-media-stream", "MediaStreamState.receive_frame (a whole stream)",
            _feed_media_stream, (), lambda: [b"\n".join(_media_seeds())]),
    _target("vapi-call-events", "gateway.vapi.codec.decode_event", _feed_vapi_event,
            (CallMessageError,), _vapi_event_seeds),
    _target("twilio-webhook-form", "parse_form_body + signature checks", _feed_twilio_form,
            (), _twilio_form_seeds),
    _target("twilio-webhook-routes", "voice/status/stream-status routes (StubTreq)",
            _feed_twilio_route, (), _twilio_route_seeds),
    _target("vapi-webhook-body", "parse_server_message", _feed_vapi_webhook,
            (WebhookBodyError,), _vapi_webhook_seeds),
    _target("vapi-webhook-route", "POST /vapi/events (StubTreq)", _feed_vapi_route, (),
            _vapi_webhook_seeds),
    _target("vapi-webhook-auth", "webhook_auth.authenticate (3 kinds)", _feed_webhook_auth,
            (), _webhook_auth_seeds),
    _target("admin-place-call", "parse_place_call", _feed_place_call, (BadRequestError,),
            _place_call_seeds),
    _target("ini-config", "parse_settings", _feed_ini, (ConfigError,), _ini_seeds,
            _INI_TOKENS),
    _target("stream-token", "StreamTokens.verify", _feed_token, (), _token_seeds, ()),
    _target("websocket-frames", "FastFrames vs Autobahn (server, client frames)",
            _feed_websocket, (), _websocket_seeds,
            (b"\x81", b"\x82", b"\x01", b"\x80", b"\x88", b"\x89", b"\x8a", b"\xfe", b"\xff",
             b"\x7e", b"\x7f", b"\x01\x02\x03\x04", b"\xc3", b"\xff\xff")),
    _target("http-limits", "LimitedSite (raw HTTP/1.1 bytes)", _feed_http, (), _http_seeds,
            (b"\r\n", b"Content-Length: ", b"Transfer-Encoding: chunked\r\n",
             b"Expect: 100-continue\r\n", b"POST /big HTTP/1.1\r\n", b"ffffffff", b"0\r\n\r\n")),
))


def all_seeds() -> Iterator[tuple[FuzzTarget, bytes]]:
    """Every target with each of its seeds."""
    for target in TARGETS.values():
        for seed in target.seeds():
            yield target, seed


def quoted(data: bytes) -> str:
    """A short printable form of an input for reports."""
    return quote(data[:120], safe="")
