"""Stream tokens: issue, verify, expiry, wrong call, tampering, replay, bounded memory."""

from __future__ import annotations

import base64
import itertools
import re

import known_secrets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.twilio.token import StreamTokens

SECRET = known_secrets.STREAM_TOKEN_SECRET
CALL = "CA0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000


def tokens(**options: int) -> StreamTokens:
    counter = itertools.count(1)
    return StreamTokens(SECRET, random_bytes=lambda n: next(counter).to_bytes(n, "big"), **options)


def reason(check: object) -> object:
    return getattr(check, "reason", None)


def test_issue_and_verify_once() -> None:
    store = tokens()
    token = store.issue(CALL, NOW)
    check = store.verify(token, CALL, NOW + 1)
    assert check.ok
    assert check
    assert check.reason is None
    assert store.used_count == 1


def test_tokens_are_url_and_xml_safe_and_short() -> None:
    token = StreamTokens(SECRET).issue(CALL, NOW)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert len(token) < 120
    assert SECRET not in token


def test_replay_is_refused() -> None:
    store = tokens()
    token = store.issue(CALL, NOW)
    assert store.verify(token, CALL, NOW).ok
    assert reason(store.verify(token, CALL, NOW + 5)) == "replayed"


def test_two_tokens_for_the_same_call_and_second_are_distinct() -> None:
    store = StreamTokens(SECRET)
    first, second = store.issue(CALL, NOW), store.issue(CALL, NOW)
    assert first != second
    assert store.verify(first, CALL, NOW).ok
    assert store.verify(second, CALL, NOW).ok


def test_expiry() -> None:
    store = tokens(ttl_seconds=30)
    token = store.issue(CALL, NOW)
    assert reason(store.verify(token, CALL, NOW + 30)) == "expired"
    assert reason(store.verify(token, CALL, NOW + 10_000)) == "expired"
    assert store.verify(token, CALL, NOW + 29.999).ok


def test_wrong_call() -> None:
    store = tokens()
    token = store.issue(CALL, NOW)
    assert reason(store.verify(token, "CA" + "f" * 32, NOW)) == "wrong-call"
    assert reason(store.verify(token, "", NOW)) == "wrong-call"
    # A failed check does not use the token up.
    assert store.verify(token, CALL, NOW).ok


def test_another_secret() -> None:
    token = tokens().issue(CALL, NOW)
    other = StreamTokens(b"x" * 32)
    assert reason(other.verify(token, CALL, NOW)) == "bad-signature"


def _raw(token: str) -> bytearray:
    return bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_tampering_with_any_byte_is_detected() -> None:
    store = tokens()
    token = store.issue(CALL, NOW)
    raw = _raw(token)
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        assert reason(store.verify(_encode(bytes(tampered)), CALL, NOW)) in (
            "bad-signature",
            "malformed",  # the version byte
        ), index
    assert store.verify(token, CALL, NOW).ok


def test_extending_the_expiry_is_detected() -> None:
    store = tokens(ttl_seconds=10)
    raw = _raw(store.issue(CALL, NOW))
    raw[1:9] = (NOW + 10_000).to_bytes(8, "big")
    assert reason(store.verify(_encode(bytes(raw)), CALL, NOW + 100)) == "bad-signature"


def test_moving_a_token_to_another_call_is_detected() -> None:
    store = tokens()
    raw = _raw(store.issue(CALL, NOW))
    other = "CA" + "e" * 32
    moved = raw[:21] + other.encode() + raw[-16:]
    assert reason(store.verify(_encode(bytes(moved)), other, NOW)) == "bad-signature"


@pytest.mark.parametrize(
    "token",
    ["x", "!!!!", "a+b/", "AAAA" * 200, "é" * 40, "AAAAA", "AQ", _encode(b"\x02" + b"\x00" * 60)],
)
def test_malformed(token: str) -> None:
    assert reason(tokens().verify(token, CALL, NOW)) == "malformed"


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token: str | None) -> None:
    assert reason(tokens().verify(token, CALL, NOW)) == "missing"


@settings(deadline=None)
@given(st.text(max_size=200), st.text(max_size=40), st.integers(min_value=0, max_value=2**40))
def test_verify_never_raises(token: str, call_sid: str, now: int) -> None:
    check = tokens().verify(token, call_sid, now)
    assert not check.ok


def test_used_tokens_are_forgotten_when_they_expire() -> None:
    store = tokens(ttl_seconds=60)
    for second in range(100):
        assert store.verify(store.issue(CALL, NOW + second), CALL, NOW + second).ok
    assert store.used_count == 60  # the first 40 expired and were pruned
    store.verify(None, CALL, NOW)  # a missing token prunes nothing...
    assert store.verify(store.issue(CALL, NOW + 1000), CALL, NOW + 1000).ok
    assert store.used_count == 1  # ...a verification does


def test_the_used_set_is_capped_and_fails_closed() -> None:
    store = tokens(ttl_seconds=60, max_used_tokens=3)
    for _ in range(3):
        assert store.verify(store.issue(CALL, NOW), CALL, NOW).ok
    assert reason(store.verify(store.issue(CALL, NOW), CALL, NOW)) == "replay-cache-full"
    assert store.verify(store.issue(CALL, NOW + 60), CALL, NOW + 60).ok


def test_configuration_errors() -> None:
    with pytest.raises(ValueError):
        StreamTokens("short")
    with pytest.raises(ValueError):
        StreamTokens(SECRET, ttl_seconds=0)
    with pytest.raises(ValueError):
        StreamTokens(SECRET, max_used_tokens=0)
    with pytest.raises(ValueError):
        StreamTokens(SECRET).issue("", NOW)
    with pytest.raises(ValueError):
        StreamTokens(SECRET).issue("C" * 65, NOW)
    assert SECRET not in repr(StreamTokens(SECRET))
