"""Sans-io authentication of Vapi server-URL webhooks.

Three credential kinds, as Vapi offers them:

- :class:`SharedSecretAuth` -- the legacy ``server.secret``, sent verbatim in
  ``X-Vapi-Secret``;
- :class:`BearerAuth` -- a token in a configurable header (``Authorization:
  Bearer <token>`` by default);
- :class:`HmacAuth` -- ``x-signature`` = HMAC (SHA-256, hex, by default) over
  ``{x-timestamp}.{raw body}``, with the timestamp within a maximum skew of
  ``now``.

:func:`authenticate` compares in constant time, never raises, and returns an
:class:`AuthResult` whose ``reason`` is safe to log (it never quotes a secret,
a token, a signature or the body). Configuration errors are caught earlier:
the credential classes raise ``ValueError`` when built with bad settings.

Headers come in as a mapping of lower-case names to every raw value received;
:func:`headers_from_raw` builds it from ``Headers.getAllRawHeaders()``. A
credential header received more than once is refused.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "AuthResult",
    "BearerAuth",
    "HmacAuth",
    "SharedSecretAuth",
    "WebhookAuth",
    "authenticate",
    "headers_from_raw",
]

RawHeaders = Mapping[str, Sequence[bytes]]

HMAC_ALGORITHMS: Final = frozenset({"sha1", "sha256", "sha384", "sha512"})
_NS_PER_SECOND: Final = 1_000_000_000
# x-timestamp's unit is undocumented: values above this are taken as
# milliseconds (1e11 seconds is in the year 5138), below as seconds.
_MILLISECONDS_THRESHOLD: Final = 100_000_000_000


@dataclass(frozen=True)
class AuthResult:
    """The outcome: ``ok``, or not and why (``reason`` is safe to log)."""

    ok: bool
    reason: str


_OK: Final = AuthResult(ok=True, reason="ok")


def _refuse(reason: str) -> AuthResult:
    return AuthResult(ok=False, reason=reason)


def _require_secret(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or not value:
        raise ValueError(f"{what} must be non-empty bytes")


@dataclass(frozen=True)
class SharedSecretAuth:
    """The legacy shared secret in ``X-Vapi-Secret`` (or another header)."""

    secret: bytes = field(repr=False)
    header: str = "x-vapi-secret"

    def __post_init__(self) -> None:
        _require_secret(self.secret, "secret")
        object.__setattr__(self, "header", self.header.lower())


@dataclass(frozen=True)
class BearerAuth:
    """A token in ``header``; with ``prefix`` the value must read ``Bearer <token>``."""

    token: bytes = field(repr=False)
    header: str = "authorization"
    prefix: bool = True

    def __post_init__(self) -> None:
        _require_secret(self.token, "token")
        object.__setattr__(self, "header", self.header.lower())


@dataclass(frozen=True)
class HmacAuth:
    """An HMAC signature over ``{timestamp}.{body}`` with a bounded clock skew."""

    secret: bytes = field(repr=False)
    algorithm: str = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    signature_header: str = "x-signature"
    timestamp_header: str = "x-timestamp"
    max_skew_ns: int = 300 * _NS_PER_SECOND

    def __post_init__(self) -> None:
        _require_secret(self.secret, "secret")
        if self.algorithm not in HMAC_ALGORITHMS:
            raise ValueError(
                f"HMAC algorithm must be one of {sorted(HMAC_ALGORITHMS)}, "
                f"not {self.algorithm!r}"
            )
        if self.encoding not in ("hex", "base64"):
            raise ValueError("HMAC encoding must be 'hex' or 'base64'")
        if self.max_skew_ns <= 0:
            raise ValueError("max_skew_ns must be positive")
        object.__setattr__(self, "signature_header", self.signature_header.lower())
        object.__setattr__(self, "timestamp_header", self.timestamp_header.lower())


WebhookAuth = SharedSecretAuth | BearerAuth | HmacAuth


def headers_from_raw(pairs: Iterable[tuple[bytes, Sequence[bytes]]]) -> dict[str, list[bytes]]:
    """Index raw header pairs (``Headers.getAllRawHeaders()``) by lower-case name."""
    indexed: dict[str, list[bytes]] = {}
    for name, values in pairs:
        indexed.setdefault(name.decode("latin-1").lower(), []).extend(values)
    return indexed


def authenticate(auth: WebhookAuth, headers: RawHeaders, body: bytes, now_ns: int) -> AuthResult:
    """Check one webhook request; never raises."""
    if isinstance(auth, SharedSecretAuth):
        return _check_shared_secret(auth, headers)
    if isinstance(auth, BearerAuth):
        return _check_bearer(auth, headers)
    return _check_hmac(auth, headers, body, now_ns)


def _single_header(headers: RawHeaders, name: str) -> bytes | AuthResult:
    values = headers.get(name)
    if not values:
        return _refuse(f"missing header {name}")
    if len(values) > 1:
        return _refuse(f"header {name} received {len(values)} times")
    return values[0]


def _check_shared_secret(auth: SharedSecretAuth, headers: RawHeaders) -> AuthResult:
    value = _single_header(headers, auth.header)
    if isinstance(value, AuthResult):
        return value
    if not hmac.compare_digest(value, auth.secret):
        return _refuse(f"wrong secret in {auth.header}")
    return _OK


_BEARER_PREFIX: Final = b"bearer "


def _check_bearer(auth: BearerAuth, headers: RawHeaders) -> AuthResult:
    value = _single_header(headers, auth.header)
    if isinstance(value, AuthResult):
        return value
    token = value.strip()
    if auth.prefix:
        if token[: len(_BEARER_PREFIX)].lower() != _BEARER_PREFIX:
            return _refuse(f"{auth.header} is not a Bearer credential")
        token = token[len(_BEARER_PREFIX) :].strip()
    if not hmac.compare_digest(token, auth.token):
        return _refuse(f"wrong token in {auth.header}")
    return _OK


def _check_hmac(auth: HmacAuth, headers: RawHeaders, body: bytes, now_ns: int) -> AuthResult:
    signature = _single_header(headers, auth.signature_header)
    if isinstance(signature, AuthResult):
        return signature
    timestamp = _single_header(headers, auth.timestamp_header)
    if isinstance(timestamp, AuthResult):
        return timestamp

    timestamp_ns = _timestamp_ns(timestamp)
    if timestamp_ns is None:
        return _refuse(f"{auth.timestamp_header} is not a whole number")
    if abs(now_ns - timestamp_ns) > auth.max_skew_ns:
        return _refuse(f"{auth.timestamp_header} outside the allowed clock skew")

    received = _decode_signature(signature.strip(), auth)
    if received is None:
        return _refuse(f"{auth.signature_header} is not {auth.encoding}")
    expected = hmac.new(auth.secret, timestamp + b"." + body, auth.algorithm).digest()
    if not hmac.compare_digest(received, expected):
        return _refuse(f"{auth.signature_header} does not match the body")
    return _OK


def _timestamp_ns(raw: bytes) -> int | None:
    text = raw.strip()
    # Only plain ASCII digits: int() would also take "+1", "1_000" or Unicode digits.
    if not text or len(text) > 20 or not text.isdigit():
        return None
    value = int(text)
    if value > _MILLISECONDS_THRESHOLD:
        return value * 1_000_000
    return value * _NS_PER_SECOND


def _decode_signature(raw: bytes, auth: HmacAuth) -> bytes | None:
    # Tolerate a "sha256=" style prefix naming the configured algorithm.
    prefix = auth.algorithm.encode("ascii") + b"="
    if raw[: len(prefix)].lower() == prefix:
        raw = raw[len(prefix) :]
    try:
        if auth.encoding == "hex":
            return bytes.fromhex(raw.decode("ascii"))
        return base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        return None

