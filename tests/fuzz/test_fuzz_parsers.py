"""Fuzzing in the normal suite: every parser of outside input, a few dozen hypothesis
inputs each (``bench/fuzz.py`` runs the long, coverage-guided campaigns), then every
crash fuzzing has found, kept as a regression test.

Only a target's own error types may come out of it (see :mod:`fuzz.targets`); the
number of inputs per target is ``FUZZ_EXAMPLES`` (default 25) so the suite stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from ini import minimal_ini
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from fuzz.strategies import STRATEGIES
from fuzz.targets import ASSISTANT_FILE_MARK, TARGETS, FuzzTarget, all_seeds, crash_of
from gateway.admin import BadRequestError, parse_place_call
from gateway.config import ConfigError, parse_settings
from gateway.http_limits import HttpLimits, LimitedSite
from gateway.twilio.codec import MediaStreamDecoder, MediaStreamProtocolError, ViolationKind
from gateway.vapi.codec import CallMessageError, decode_event
from gateway.vapi.webhook_messages import WebhookBodyError, parse_server_message

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


def assert_no_crash(target: FuzzTarget, data: bytes) -> None:
    crash = crash_of(target, data)
    if crash is not None:
        raise crash.error  # the original traceback, for hypothesis to shrink and show


def test_every_parser_of_outside_input_has_a_target_and_a_strategy() -> None:
    assert set(STRATEGIES) == set(TARGETS)
    assert len(TARGETS) >= 13


@pytest.mark.parametrize(("target", "seed"), list(all_seeds()),
                         ids=lambda value: value.name if isinstance(value, FuzzTarget) else "")
def test_the_seeds_are_accepted(target: FuzzTarget, seed: bytes) -> None:
    assert_no_crash(target, seed)


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])
# One test per target (pytest-twisted re-wraps a hypothesis test once per parameter, so
# @given and @pytest.mark.parametrize do not mix here).


@FUZZ_SETTINGS
@given(STRATEGIES["twilio-media-decoder"])
def test_fuzz_twilio_media_decoder(data: bytes) -> None:
    assert_no_crash(TARGETS["twilio-media-decoder"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["twilio-media-stream"])
def test_fuzz_twilio_media_stream(data: bytes) -> None:
    assert_no_crash(TARGETS["twilio-media-stream"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["vapi-call-events"])
def test_fuzz_vapi_call_events(data: bytes) -> None:
    assert_no_crash(TARGETS["vapi-call-events"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["twilio-webhook-form"])
def test_fuzz_twilio_webhook_form(data: bytes) -> None:
    assert_no_crash(TARGETS["twilio-webhook-form"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["twilio-webhook-routes"])
def test_fuzz_twilio_webhook_routes(data: bytes) -> None:
    assert_no_crash(TARGETS["twilio-webhook-routes"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["vapi-webhook-body"])
def test_fuzz_vapi_webhook_body(data: bytes) -> None:
    assert_no_crash(TARGETS["vapi-webhook-body"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["vapi-webhook-route"])
def test_fuzz_vapi_webhook_route(data: bytes) -> None:
    assert_no_crash(TARGETS["vapi-webhook-route"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["vapi-webhook-auth"])
def test_fuzz_vapi_webhook_auth(data: bytes) -> None:
    assert_no_crash(TARGETS["vapi-webhook-auth"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["admin-place-call"])
def test_fuzz_admin_place_call(data: bytes) -> None:
    assert_no_crash(TARGETS["admin-place-call"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["ini-config"])
def test_fuzz_ini_config(data: bytes) -> None:
    assert_no_crash(TARGETS["ini-config"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["stream-token"])
def test_fuzz_stream_token(data: bytes) -> None:
    assert_no_crash(TARGETS["stream-token"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["websocket-frames"])
def test_fuzz_websocket_frames(data: bytes) -> None:
    assert_no_crash(TARGETS["websocket-frames"], data)


@FUZZ_SETTINGS
@given(STRATEGIES["http-limits"])
def test_fuzz_http_limits(data: bytes) -> None:
    assert_no_crash(TARGETS["http-limits"], data)


def test_every_target_has_a_hypothesis_test() -> None:
    tested = {name[len("test_fuzz_"):].replace("_", "-") for name in globals()
              if name.startswith("test_fuzz_")}
    assert tested == set(TARGETS)


# -- regressions: every crash fuzzing found -------------------------------------------------

REGRESSIONS: list[tuple[str, bytes]] = [
    # msgspec raised UnicodeDecodeError (not its DecodeError) for bytes that are not
    # UTF-8 inside a JSON string; each parser now answers with its own error.
    ("twilio-media-decoder", b'{"event":"media","streamSid":"MZ\xff"}'),
    ("twilio-media-decoder", b'{"event":"\xc3(","x":1}'),
    ("twilio-media-decoder", b'{"\xed\xa0\x80":1}'),
    ("twilio-media-stream", b'{"event":"connected"}\n{"event":"start","streamSid":"\xff"}'),
    ("vapi-call-events", b'{"type":"transcript","transcript":"\xf4\x90\x80\x80"}'),
    ("vapi-webhook-body", b'{"message":{"type":"status-update","status":"\xc0\xaf"}}'),
    ("vapi-webhook-route", b'{"message":{"type":"\x80"}}'),
    # the ini loader: a value check raised instead of reporting a problem
    ("ini-config", b"[gateway]\nlisten = tcp:\xc2\xb2\n"),  # "²".isdigit(), int("²") fails
    ("ini-config", b"[admin]\nlisten = ssl:\xc2\xb9\n"),
    ("ini-config", b"[local_assistant]\nlisten = tcp:port=\xc2\xb2\n"),
    ("ini-config", b"[gateway]\npublic_url = https://[::1\n"),  # urlsplit: Invalid IPv6 URL
    ("ini-config", b"[vapi]\napi_url = https://[::1\n"),
    # the ini loader: json.loads raised RecursionError for a deeply nested assistant file
    ("ini-config", minimal_ini(assistant={"id": "", "file": "assistant.json"}).encode()
     + ASSISTANT_FILE_MARK + b"[" * 5000),
    ("ini-config", minimal_ini(routing={"+15551230001": "file:assistant.json"}).encode()
     + ASSISTANT_FILE_MARK + b'{"a":' * 3000),
    # gateway.http_limits (found while it was written): a chunked body cut off with 413
    # went on decoding, and Twisted wrote "400 Bad Request" after the 413; Twisted's idle
    # timeout firing on a connection already closing after its own 400
    ("http-limits", b"POST /none HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nabcX /none HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("http-limits", b"X /none HTTP/1.1\r\nHost: x\r\nallow\r\n\r\n\xfd_n\xff"),
    # a false alarm of the harness (an HTTP/1.0 request is answered in HTTP/1.0), kept
    ("http-limits", b"POST /big HTTP/1.0\r\n\r\nost: e\r\nl5\nh\rlo"),
]


@pytest.mark.parametrize(("name", "data"), REGRESSIONS)
def test_regression(name: str, data: bytes) -> None:
    assert_no_crash(TARGETS[name], data)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("gateway", "listen", "tcp:\u00b2"), ("admin", "listen", "ssl:\u00b9"),
    ("gateway", "public_url", "https://[::1"), ("vapi", "api_url", "https://[::1"),
])
def test_odd_values_are_one_clear_config_error(section: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(minimal_ini(**{section: {key: value}}), "gw.ini", {})
    (problem,) = info.value.problems
    assert problem.startswith("gw.ini: [")
    assert "bad port" in problem or "not an absolute" in problem or "not a URL" in problem


def test_a_deeply_nested_assistant_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 5000)
    ini = minimal_ini(assistant={"id": "", "file": "deep.json"})
    with pytest.raises(ConfigError) as info:
        parse_settings(ini, str(tmp_path / "gw.ini"), {})
    assert info.value.problems == [
        f"{tmp_path / 'gw.ini'}: [assistant] file: {tmp_path / 'deep.json'} is not valid "
        "JSON: nested too deeply"]


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
def test_bad_utf8_inside_json_strings_is_each_parsers_own_error(bad: bytes) -> None:
    with pytest.raises(MediaStreamProtocolError) as media:
        MediaStreamDecoder().decode(b'{"event":"media","streamSid":"' + bad + b'"}')
    assert media.value.kind is ViolationKind.MALFORMED_JSON
    with pytest.raises(CallMessageError):
        decode_event(b'{"type":"transcript","transcript":"' + bad + b'"}')
    with pytest.raises(WebhookBodyError):
        parse_server_message(b'{"message":{"type":"' + bad + b'"}}')
    with pytest.raises(BadRequestError, match="not UTF-8"):
        parse_place_call(b'{"to":"' + bad + b'"}')


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udfff", b"\\ud83d"])
def test_escaped_lone_surrogates_are_refused_by_the_msgspec_parsers(escape: bytes) -> None:
    with pytest.raises(MediaStreamProtocolError):
        MediaStreamDecoder().decode(b'{"event":"mark","streamSid":"' + escape + b'"}')
    with pytest.raises(CallMessageError):
        decode_event(b'{"type":"transcript","transcript":"' + escape + b'"}')
    with pytest.raises(WebhookBodyError):
        parse_server_message(b'{"message":{"type":"x","call":{"id":"' + escape + b'"}}}')


# F5 (fixed in gateway/admin.py): escaped lone surrogates are refused with a 400
@pytest.mark.parametrize("body", [
    b'{"to":"+15550001111","from":"+15551230001","assistantId":"\\ud800"}',
    b'{"to":"+15550001111","from":"+15551230001","variables":{"name":"\\udfffAda"}}',
])
def test_place_call_refuses_text_that_cannot_be_sent_on(body: bytes) -> None:
    assert_no_crash(TARGETS["admin-place-call"], body)


def test_after_a_413_nothing_more_is_written_on_the_connection() -> None:
    """The chunked regression above, as bytes on the wire: one 413, then nothing."""
    clock = Clock()
    limits = HttpLimits(read_timeout=10, max_body_size=0)
    site = LimitedSite(Resource(), limits, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nabcX / HTTP/1.1\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    channel.connectionLost(Failure(ConnectionError("over")))
    assert clock.getDelayedCalls() == []
