"""Webhook authentication: shared secret, Bearer token and HMAC, each good, missing,
wrong, duplicated; HMAC skew and tampering; reasons never quote a secret; and
random headers never make it raise."""

from __future__ import annotations

import base64
import hashlib
import hmac

import known_secrets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from gateway.vapi.webhook_auth import (
    AuthResult,
    BearerAuth,
    HmacAuth,
    SharedSecretAuth,
    authenticate,
    headers_from_raw,
)

SECRET = known_secrets.VAPI_WEBHOOK_SECRET.encode()
BODY = b'{"message":{"type":"assistant-request","call":{"id":"c-1"}}}'
S = 1_000_000_000
NOW_S = 1_790_000_000
NOW_NS = NOW_S * S


def sign(body: bytes, timestamp: bytes, secret: bytes = SECRET, algorithm: str = "sha256") -> bytes:
    return hmac.new(secret, timestamp + b"." + body, algorithm).hexdigest().encode()


def hmac_headers(timestamp: bytes = str(NOW_S).encode(), body: bytes = BODY,
                 signature: bytes | None = None) -> dict[str, list[bytes]]:
    return {"x-timestamp": [timestamp],
            "x-signature": [signature if signature is not None else sign(body, timestamp)]}


def refused(result: AuthResult, contains: str) -> bool:
    return not result.ok and contains in result.reason


# --- shared secret ----------------------------------------------------------

def test_shared_secret_good_missing_wrong_duplicated() -> None:
    auth = SharedSecretAuth(SECRET)
    assert authenticate(auth, {"x-vapi-secret": [SECRET]}, BODY, NOW_NS).ok
    assert refused(authenticate(auth, {}, BODY, NOW_NS), "missing header x-vapi-secret")
    assert refused(authenticate(auth, {"x-vapi-secret": [b"nope"]}, BODY, NOW_NS),
                   "wrong secret")
    assert refused(authenticate(auth, {"x-vapi-secret": [SECRET[:-1]]}, BODY, NOW_NS),
                   "wrong secret")
    assert refused(authenticate(auth, {"x-vapi-secret": [SECRET, SECRET]}, BODY, NOW_NS),
                   "received 2 times")


def test_header_names_are_case_insensitive_through_headers_from_raw() -> None:
    raw = Headers({b"X-Vapi-Secret": [SECRET], b"Content-Type": [b"application/json"]})
    headers = headers_from_raw(raw.getAllRawHeaders())
    assert headers["x-vapi-secret"] == [SECRET]
    assert authenticate(SharedSecretAuth(SECRET, header="X-VAPI-SECRET"), headers, BODY,
                        NOW_NS).ok


# --- bearer -----------------------------------------------------------------

def test_bearer_in_authorization() -> None:
    auth = BearerAuth(SECRET)
    assert authenticate(auth, {"authorization": [b"Bearer " + SECRET]}, BODY, NOW_NS).ok
    assert authenticate(auth, {"authorization": [b"bearer  " + SECRET + b" "]}, BODY,
                        NOW_NS).ok
    assert refused(authenticate(auth, {"authorization": [SECRET]}, BODY, NOW_NS),
                   "not a Bearer credential")
    assert refused(authenticate(auth, {"authorization": [b"Basic " + SECRET]}, BODY, NOW_NS),
                   "not a Bearer credential")
    assert refused(authenticate(auth, {"authorization": [b"Bearer x"]}, BODY, NOW_NS),
                   "wrong token")
    assert refused(authenticate(auth, {}, BODY, NOW_NS), "missing header authorization")


def test_bearer_in_a_custom_header_without_prefix() -> None:
    auth = BearerAuth(SECRET, header="X-Gateway-Token", prefix=False)
    assert authenticate(auth, {"x-gateway-token": [SECRET]}, BODY, NOW_NS).ok
    assert refused(authenticate(auth, {"authorization": [b"Bearer " + SECRET]}, BODY, NOW_NS),
                   "missing header x-gateway-token")


# --- HMAC -------------------------------------------------------------------

def test_hmac_good() -> None:
    assert authenticate(HmacAuth(SECRET), hmac_headers(), BODY, NOW_NS) == AuthResult(True, "ok")


def test_hmac_tampered_body_is_refused() -> None:
    result = authenticate(HmacAuth(SECRET), hmac_headers(), BODY.replace(b"c-1", b"c-2"), NOW_NS)
    assert refused(result, "does not match the body")


def test_hmac_wrong_secret_or_timestamp_swap_is_refused() -> None:
    forged = sign(BODY, str(NOW_S).encode(), secret=b"another secret")
    assert refused(authenticate(HmacAuth(SECRET), hmac_headers(signature=forged), BODY, NOW_NS),
                   "does not match")
    # a valid signature for one timestamp, replayed with another
    headers = hmac_headers()
    headers["x-timestamp"] = [str(NOW_S + 1).encode()]
    assert refused(authenticate(HmacAuth(SECRET), headers, BODY, NOW_NS), "does not match")


@pytest.mark.parametrize("offset_s", [-301, 301, -10**6])
def test_hmac_outside_the_skew_is_refused(offset_s: int) -> None:
    headers = hmac_headers(timestamp=str(NOW_S + offset_s).encode())
    assert refused(authenticate(HmacAuth(SECRET), headers, BODY, NOW_NS), "clock skew")


@pytest.mark.parametrize("offset_s", [-300, 0, 300])
def test_hmac_inside_the_skew_is_accepted(offset_s: int) -> None:
    headers = hmac_headers(timestamp=str(NOW_S + offset_s).encode())
    assert authenticate(HmacAuth(SECRET), headers, BODY, NOW_NS).ok


def test_hmac_skew_is_configurable() -> None:
    headers = hmac_headers(timestamp=str(NOW_S - 20).encode())
    assert refused(authenticate(HmacAuth(SECRET, max_skew_ns=10 * S), headers, BODY, NOW_NS),
                   "clock skew")


def test_hmac_timestamps_in_milliseconds_are_understood() -> None:
    stamp = str(NOW_S * 1000 + 250).encode()
    assert authenticate(HmacAuth(SECRET), hmac_headers(timestamp=stamp), BODY, NOW_NS).ok


@pytest.mark.parametrize("stamp", [b"", b"abc", b"-5", b"+5", b"1_000", b"1.5", "١٢".encode(),
                                   b"9" * 25])
def test_hmac_bad_timestamps_are_refused(stamp: bytes) -> None:
    headers = hmac_headers(timestamp=stamp, signature=b"00")
    assert not authenticate(HmacAuth(SECRET), headers, BODY, NOW_NS).ok


def test_hmac_missing_headers_are_refused() -> None:
    auth = HmacAuth(SECRET)
    assert refused(authenticate(auth, {"x-timestamp": [b"1"]}, BODY, NOW_NS),
                   "missing header x-signature")
    assert refused(authenticate(auth, {"x-signature": [b"00"]}, BODY, NOW_NS),
                   "missing header x-timestamp")


def test_hmac_signature_forms() -> None:
    stamp = str(NOW_S).encode()
    upper = sign(BODY, stamp).upper()
    prefixed = b"sha256=" + sign(BODY, stamp)
    assert authenticate(HmacAuth(SECRET), hmac_headers(signature=upper), BODY, NOW_NS).ok
    assert authenticate(HmacAuth(SECRET), hmac_headers(signature=prefixed), BODY, NOW_NS).ok
    assert refused(authenticate(HmacAuth(SECRET), hmac_headers(signature=b"zz"), BODY, NOW_NS),
                   "is not hex")
    digest = hmac.new(SECRET, stamp + b"." + BODY, hashlib.sha512).digest()
    b64 = HmacAuth(SECRET, algorithm="sha512", encoding="base64")
    assert authenticate(b64, hmac_headers(signature=base64.b64encode(digest)), BODY, NOW_NS).ok
    assert refused(authenticate(b64, hmac_headers(signature=b"!!!"), BODY, NOW_NS),
                   "is not base64")


def test_bad_settings_fail_when_built() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        HmacAuth(SECRET, algorithm="md5")
    with pytest.raises(ValueError, match="non-empty"):
        SharedSecretAuth(b"")
    with pytest.raises(ValueError, match="max_skew_ns"):
        HmacAuth(SECRET, max_skew_ns=0)


def test_secrets_stay_out_of_reprs_and_reasons() -> None:
    secret_text = known_secrets.VAPI_WEBHOOK_SECRET
    for auth in (SharedSecretAuth(SECRET), BearerAuth(SECRET), HmacAuth(SECRET)):
        assert secret_text not in repr(auth)
        result = authenticate(auth, {"x-vapi-secret": [SECRET + b"x"],
                                     "authorization": [b"Bearer " + SECRET + b"x"],
                                     "x-signature": [SECRET], "x-timestamp": [SECRET]},
                              BODY, NOW_NS)
        assert not result.ok and secret_text not in result.reason


header_values = st.lists(st.binary(max_size=80), max_size=3)


@settings(max_examples=300)
@given(st.sampled_from([SharedSecretAuth(SECRET), BearerAuth(SECRET), HmacAuth(SECRET),
                        HmacAuth(SECRET, encoding="base64")]),
       st.dictionaries(st.sampled_from(["x-vapi-secret", "authorization", "x-signature",
                                        "x-timestamp", "other"]), header_values),
       st.binary(max_size=100), st.integers(-(2**70), 2**70))
def test_authenticate_never_raises(auth: SharedSecretAuth | BearerAuth | HmacAuth,
                                   headers: dict[str, list[bytes]], body: bytes,
                                   now_ns: int) -> None:
    result = authenticate(auth, headers, body, now_ns)
    assert isinstance(result, AuthResult)
