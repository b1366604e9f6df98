"""X-Twilio-Signature: the docs' vector, forgeries, repeated names, bodySHA256, WS upgrade."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from urllib.parse import urlencode

import known_secrets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from gateway.twilio.signature import (
    SignatureCheck,
    TwilioSignatureValidator,
    parse_form_body,
    public_url,
)

# The worked example of Twilio's security docs (twilio.com/docs/usage/security).
# Current edition: example.com with +14158675310 gives L/OH5Y...; the older edition
# (and the twilio libraries' tests) used mycompany.com with +12349013030 -> 0/KCTR6...
# NB: shared/reference/twilio.md pairs example.com with +12349013030 and expects
# L/OH5Y...: that mixes the two editions and is not a valid vector (see the test below).
DOCS_TOKEN = "12345"
DOCS_URL = "https://example.com/myapp.php?foo=1&bar=2"
DOCS_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675310"),
    ("Digits", "1234"),
    ("From", "+14158675310"),
    ("To", "+18005551212"),
]
DOCS_SIGNATURE = "L/OH5YylLD5NRKLltdqwSvS0BnU="
OLD_DOCS_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
OLD_DOCS_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+12349013030"),
    ("Digits", "1234"),
    ("From", "+12349013030"),
    ("To", "+18005551212"),
]
OLD_DOCS_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="

TOKEN = known_secrets.TWILIO_AUTH_TOKEN
VOICE_URL = "https://gw.example.com/twilio/voice"
STREAM_URL = "wss://gw.example.com/twilio/media"


def reference_signature(token: str, url: str, pairs: list[tuple[str, str]]) -> str:
    """Twilio's algorithm written out independently of the library."""
    data = url
    by_name: dict[str, set[str]] = {}
    for name, value in pairs:
        by_name.setdefault(name, set()).add(value)
    for name in sorted(by_name):
        for value in sorted(by_name[name]):
            data += name + value
    digest = hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def form_of(pairs: list[tuple[str, str]]) -> dict[bytes, list[bytes]]:
    """Exactly what Twisted builds from the body the pairs would travel in."""
    return parse_form_body(urlencode(pairs).encode())


def failed(check: SignatureCheck, reason: str) -> bool:
    return (not check.ok) and (not check) and check.reason == reason


docs_validator = TwilioSignatureValidator(DOCS_TOKEN)
validator = TwilioSignatureValidator(TOKEN)


# -- the docs' worked example ----------------------------------------------------------


def test_docs_worked_example() -> None:
    assert reference_signature(DOCS_TOKEN, DOCS_URL, DOCS_PARAMS) == DOCS_SIGNATURE
    check = docs_validator.check_form(DOCS_URL, form_of(DOCS_PARAMS), DOCS_SIGNATURE)
    assert check.ok
    assert check
    assert check.reason is None


def test_older_docs_worked_example() -> None:
    assert reference_signature(DOCS_TOKEN, OLD_DOCS_URL, OLD_DOCS_PARAMS) == OLD_DOCS_SIGNATURE
    assert docs_validator.check_form(OLD_DOCS_URL, form_of(OLD_DOCS_PARAMS), OLD_DOCS_SIGNATURE).ok


def test_the_mixed_vector_of_the_reference_notes_is_not_valid() -> None:
    """example.com + the +12349013030 numbers does not give L/OH5Y... (nor should it)."""
    mixed = docs_validator.check_form(DOCS_URL, form_of(OLD_DOCS_PARAMS), DOCS_SIGNATURE)
    assert not mixed.ok
    assert mixed.reason == "mismatch"


def test_docs_example_with_bytes_header_and_request_body() -> None:
    body = urlencode(DOCS_PARAMS).encode()
    assert docs_validator.check_request(
        DOCS_URL, b"application/x-www-form-urlencoded; charset=utf-8", body, DOCS_SIGNATURE.encode()
    ).ok


def test_docs_example_with_public_url_from_request_target() -> None:
    url = public_url("https://example.com/", b"/myapp.php?foo=1&bar=2")
    assert url == DOCS_URL
    assert docs_validator.check_form(url, form_of(DOCS_PARAMS), DOCS_SIGNATURE).ok


def test_public_url_keeps_a_path_prefix_and_escapes() -> None:
    assert public_url("https://example.com/gw", "/twilio/voice?a=%20b") == (
        "https://example.com/gw/twilio/voice?a=%20b"
    )
    assert public_url("https://example.com", "twilio") == "https://example.com/twilio"


# -- forged, missing, tampered ---------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", b"", "   "])
def test_missing_signature(header: str | bytes | None) -> None:
    assert failed(
        docs_validator.check_form(DOCS_URL, form_of(DOCS_PARAMS), header), "missing-signature"
    )


@pytest.mark.parametrize(
    "signature",
    [
        "L/OH5YylLD5NRKLltdqwSvS0BnX=",  # one character off
        base64.b64encode(b"\x00" * 20).decode(),  # well-formed, wrong
        DOCS_SIGNATURE[:-1],  # truncated
        DOCS_SIGNATURE + "A",
        "é" * 28,  # not ASCII: must not raise
        "x" * 10_000,
        reference_signature("other-token", DOCS_URL, DOCS_PARAMS),  # another account's token
    ],
)
def test_forged_signatures(signature: str) -> None:
    assert failed(docs_validator.check_form(DOCS_URL, form_of(DOCS_PARAMS), signature), "mismatch")


def test_tampered_requests() -> None:
    tampered_value = [(n, "9999" if n == "Digits" else v) for n, v in DOCS_PARAMS]
    added = [*DOCS_PARAMS, ("Extra", "1")]
    removed = DOCS_PARAMS[:-1]
    for pairs in (tampered_value, added, removed):
        assert failed(
            docs_validator.check_form(DOCS_URL, form_of(pairs), DOCS_SIGNATURE), "mismatch"
        )
    for url in (
        "https://example.com/myapp.php?foo=1&bar=3",
        "https://example.com/myapp.php",
        "http://example.com/myapp.php?foo=1&bar=2",
        "https://evil.example/myapp.php?foo=1&bar=2",
    ):
        assert failed(
            docs_validator.check_form(url, form_of(DOCS_PARAMS), DOCS_SIGNATURE), "mismatch"
        )


def test_twisted_request_args_would_not_validate() -> None:
    """request.args merges the query into the form: the query would be signed twice."""
    merged = form_of([*DOCS_PARAMS, ("foo", "1"), ("bar", "2")])
    assert failed(docs_validator.check_form(DOCS_URL, merged, DOCS_SIGNATURE), "mismatch")


def test_port_variants() -> None:
    pairs = [("CallSid", "CA1")]
    without_port = reference_signature(TOKEN, VOICE_URL, pairs)
    with_port = reference_signature(TOKEN, "https://gw.example.com:443/twilio/voice", pairs)
    assert validator.check_form(
        "https://gw.example.com:443/twilio/voice", form_of(pairs), without_port
    ).ok
    assert validator.check_form(VOICE_URL, form_of(pairs), with_port).ok
    other_port = reference_signature(TOKEN, "https://gw.example.com:8443/twilio/voice", pairs)
    assert validator.check_form(
        "https://gw.example.com:8443/twilio/voice", form_of(pairs), other_port
    ).ok
    assert validator.check_form(
        "https://gw.example.com:8443/twilio/voice", form_of(pairs), without_port
    ).ok


def test_previous_auth_token_during_rotation() -> None:
    rotating = TwilioSignatureValidator(TOKEN, previous_auth_token="old-token-123")
    pairs = [("CallSid", "CA1")]
    for token in (TOKEN, "old-token-123"):
        assert rotating.check_form(
            VOICE_URL, form_of(pairs), reference_signature(token, VOICE_URL, pairs)
        ).ok
    assert not validator.check_form(
        VOICE_URL, form_of(pairs), reference_signature("old-token-123", VOICE_URL, pairs)
    ).ok
    assert TOKEN not in repr(rotating)


def test_bad_inputs_give_reasons_not_exceptions() -> None:
    assert failed(validator.check_form("not a url", {}, "sig"), "bad-url")
    assert failed(validator.check_form("https://[::1/x", {}, "sig"), "bad-url")
    assert failed(validator.check_form("ftp://host/x", {}, "sig"), "bad-url")
    assert failed(
        validator.check_form(VOICE_URL, {b"\xff": [b"x"]}, "sig"), "undecodable-parameters"
    )
    assert failed(
        validator.check_form(VOICE_URL, {b"a": [b"\xc3"]}, "sig"), "undecodable-parameters"
    )
    with pytest.raises(ValueError):
        TwilioSignatureValidator("")


# -- repeated names and blank values ---------------------------------------------------


def test_repeated_names_sign_every_value_sorted() -> None:
    pairs = [
        ("StatusCallbackEvent", "ringing"),
        ("CallSid", "CA1"),
        ("StatusCallbackEvent", "answered"),
    ]
    signature = reference_signature(TOKEN, VOICE_URL, pairs)
    # By hand: names sorted, then each value sorted.
    by_hand = base64.b64encode(
        hmac.new(
            TOKEN.encode(),
            (
                VOICE_URL + "CallSidCA1StatusCallbackEventansweredStatusCallbackEventringing"
            ).encode(),
            hashlib.sha1,
        ).digest()
    ).decode()
    assert signature == by_hand
    assert validator.check_form(VOICE_URL, form_of(pairs), signature).ok
    # Arrival order of the repeated values does not matter.
    assert validator.check_form(VOICE_URL, form_of(pairs[::-1]), signature).ok
    # Keeping only one of the values breaks it (a plain dict would do that).
    assert not validator.check_form(VOICE_URL, form_of(pairs[:2]), signature).ok


def test_repeated_names_agree_with_the_library_getlist_path() -> None:
    class QueryDict(dict[str, list[str]]):
        def getlist(self, name: str) -> list[str]:
            return self[name]

    pairs = [("A", "2"), ("A", "1"), ("B", "x")]
    library = RequestValidator(TOKEN).compute_signature(
        VOICE_URL, QueryDict({"A": ["2", "1"], "B": ["x"]})
    )
    assert library == reference_signature(TOKEN, VOICE_URL, pairs)
    assert validator.check_form(VOICE_URL, form_of(pairs), library).ok


def test_blank_values_are_signed() -> None:
    pairs = [("CallSid", "CA1"), ("CallerName", "")]
    signature = reference_signature(TOKEN, VOICE_URL, pairs)
    assert validator.check_form(VOICE_URL, form_of(pairs), signature).ok


@settings(deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)), max_size=8))
def test_any_form_signed_by_the_reference_validates(pairs: list[tuple[str, str]]) -> None:
    signature = reference_signature(TOKEN, VOICE_URL, pairs)
    assert validator.check_form(VOICE_URL, form_of(pairs), signature).ok


# -- JSON bodies: bodySHA256 -----------------------------------------------------------


def json_request(body: bytes) -> tuple[str, str]:
    url = f"{VOICE_URL}?bodySHA256={hashlib.sha256(body).hexdigest()}"
    return url, reference_signature(TOKEN, url, [])


BODY = json.dumps({"CallSid": "CA1", "StreamEvent": "stream-started"}).encode()


def test_body_sha256() -> None:
    url, signature = json_request(BODY)
    assert validator.check_json(url, BODY, signature).ok
    assert validator.check_request(url, "application/json", BODY, signature).ok
    assert validator.check_request(url, b"application/json; charset=utf-8", BODY, signature).ok


def test_body_sha256_tampered_body() -> None:
    url, signature = json_request(BODY)
    assert failed(validator.check_json(url, BODY + b" ", signature), "body-hash-mismatch")
    # Even when the Content-Type claims a form, a bodySHA256 URL is checked as JSON.
    assert failed(
        validator.check_request(url, "application/x-www-form-urlencoded", b"x=1", signature),
        "body-hash-mismatch",
    )


def test_body_sha256_missing_or_resigned() -> None:
    signature = reference_signature(TOKEN, VOICE_URL, [])
    assert failed(validator.check_json(VOICE_URL, BODY, signature), "missing-body-hash")
    url, _ = json_request(BODY)
    assert failed(validator.check_json(url, BODY, signature), "mismatch")
    # An attacker recomputing bodySHA256 for a new body cannot re-sign the URL.
    forged_url, _ = json_request(b"{}")
    _, old_signature = json_request(BODY)
    assert failed(validator.check_json(forged_url, b"{}", old_signature), "mismatch")
    assert failed(validator.check_json(url, BODY, None), "missing-signature")


def test_body_sha256_hex_case_is_ignored() -> None:
    url = f"{VOICE_URL}?bodySHA256={hashlib.sha256(BODY).hexdigest().upper()}"
    assert validator.check_json(url, BODY, reference_signature(TOKEN, url, [])).ok


# -- the WebSocket upgrade -------------------------------------------------------------


def test_websocket_upgrade() -> None:
    signature = reference_signature(TOKEN, STREAM_URL, [])
    assert validator.check_websocket(STREAM_URL, signature).ok
    assert validator.check_websocket(STREAM_URL, signature.encode()).ok


def test_websocket_upgrade_trailing_slash() -> None:
    with_slash = reference_signature(TOKEN, STREAM_URL + "/", [])
    assert validator.check_websocket(STREAM_URL, with_slash).ok
    without_slash = reference_signature(TOKEN, STREAM_URL, [])
    assert validator.check_websocket(STREAM_URL + "/", without_slash).ok


def test_websocket_upgrade_with_default_port() -> None:
    signature = reference_signature(TOKEN, "wss://gw.example.com:443/twilio/media", [])
    assert validator.check_websocket(STREAM_URL, signature).ok


def test_websocket_upgrade_refusals() -> None:
    assert failed(validator.check_websocket(STREAM_URL, None), "missing-signature")
    https_form = reference_signature(TOKEN, "https://gw.example.com/twilio/media", [])
    assert failed(validator.check_websocket(STREAM_URL, https_form), "mismatch")
    other_path = reference_signature(TOKEN, "wss://gw.example.com/twilio/other", [])
    assert failed(validator.check_websocket(STREAM_URL, other_path), "mismatch")
    assert failed(validator.check_websocket("nonsense", "x"), "bad-url")


# -- the form parser -------------------------------------------------------------------


def test_parse_form_body() -> None:
    body = b"CallerName=Jos%C3%A9+P%C3%A9rez&A=1;2&A=3&Empty=&Flag&&B=%2B1"
    assert parse_form_body(body) == {
        b"CallerName": ["José Pérez".encode()],
        b"A": [b"1;2", b"3"],
        b"Empty": [b""],
        b"Flag": [b""],
        b"B": [b"+1"],
    }


@settings(deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1), st.text()), max_size=10))
def test_parse_form_body_inverts_urlencode(pairs: list[tuple[str, str]]) -> None:
    expected: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        expected.setdefault(name.encode(), []).append(value.encode())
    assert parse_form_body(urlencode(pairs).encode()) == expected


def test_non_ascii_parameters_validate() -> None:
    pairs = [("CallSid", "CA1"), ("CallerName", "José Pérez")]
    signature = reference_signature(TOKEN, VOICE_URL, pairs)
    body = urlencode(pairs).encode()
    assert validator.check_request(
        VOICE_URL, "application/x-www-form-urlencoded", body, signature
    ).ok
