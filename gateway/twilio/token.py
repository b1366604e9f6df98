"""Stream tokens: single-use proof that a Media Streams socket belongs to a call we answered.

The voice webhook (signed by Twilio) issues a token for its CallSid and puts it
in a ``<Parameter>`` of ``<Connect><Stream>``; Twilio hands it back in
``start.customParameters``. The stream server then verifies it against the
``callSid`` of that ``start`` message, so a socket that passed (or skipped) the
upgrade signature check still cannot attach to a call it was not issued for,
after the token expired, or a second time.

Format (URL- and XML-safe: base64url without padding, ~95 characters)::

    version (1 byte) | expiry, unix seconds (8, big-endian) | nonce (12)
    | CallSid (UTF-8) | HMAC-SHA256(secret, domain | all of the above)[:16]

Sans-io: the current time is always passed in (``now``, seconds since the
epoch as ``reactor.seconds()`` gives it); the nonce source is injectable. The
used-token memory is in-process: it holds the nonce of every token accepted
until that token expires (pruned on every call, capped at ``max_used_tokens``),
so it cannot grow without bound. A restart forgets it: a token accepted before a
restart could be accepted once more within its TTL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import os
import re
import struct
from collections.abc import Callable
from typing import Final, Literal

import msgspec

__all__ = [
    "StreamTokenCheck",
    "StreamTokenFailure",
    "StreamTokens",
]

_VERSION: Final = 1
_HEADER: Final = struct.Struct(">BQ12s")  # version, expiry, nonce
_MAC_BYTES: Final = 16
_DOMAIN: Final = b"vapi-gateway/stream-token/v1\x00"
_MIN_SECRET_BYTES: Final = 32
_MAX_CALL_SID_BYTES: Final = 64
_MAX_TOKEN_CHARS: Final = 4 * ((_HEADER.size + _MAX_CALL_SID_BYTES + _MAC_BYTES + 2) // 3)
_TOKEN_ALPHABET: Final = re.compile(r"[A-Za-z0-9_-]+")

StreamTokenFailure = Literal[
    "missing",  # no token in the start message
    "malformed",  # not a token of this format (length, alphabet, version)
    "bad-signature",  # the MAC does not match: forged or tampered
    "wrong-call",  # a genuine token, issued for another CallSid
    "expired",  # a genuine token past its expiry
    "replayed",  # a genuine token that was already used
    "replay-cache-full",  # too many live used tokens to remember one more: refused
]


class StreamTokenCheck(msgspec.Struct, frozen=True):
    """The outcome of :meth:`StreamTokens.verify`."""

    ok: bool
    reason: StreamTokenFailure | None = None

    def __bool__(self) -> bool:
        return self.ok


_ACCEPTED: Final = StreamTokenCheck(ok=True)


def _refuse(reason: StreamTokenFailure) -> StreamTokenCheck:
    return StreamTokenCheck(ok=False, reason=reason)


class StreamTokens:
    """Issues and verifies stream tokens with one server-side secret."""

    def __init__(
        self,
        secret: bytes | str,
        *,
        ttl_seconds: int = 120,
        max_used_tokens: int = 100_000,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """
        :param secret: at least 32 bytes; never logged (``repr`` hides it).
        :param ttl_seconds: lifetime of a token. It must cover the greeting
            ``<Say>`` that plays before ``<Connect>`` plus the connection time.
        :param max_used_tokens: cap on remembered used tokens; when full of live
            entries, verification fails closed with ``replay-cache-full``.
        :param random_bytes: nonce source (tests inject a deterministic one).
        """
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(key) < _MIN_SECRET_BYTES:
            raise ValueError(f"stream token secret must be at least {_MIN_SECRET_BYTES} bytes")
        if ttl_seconds < 1:
            raise ValueError("ttl_seconds must be at least 1")
        if max_used_tokens < 1:
            raise ValueError("max_used_tokens must be at least 1")
        self._key: Final = key
        self._ttl: Final = ttl_seconds
        self._max_used: Final = max_used_tokens
        self._random_bytes: Final = random_bytes
        self._used: dict[bytes, int] = {}
        self._expiries: list[tuple[int, bytes]] = []

    def __repr__(self) -> str:
        return f"<StreamTokens ttl={self._ttl}s used={len(self._used)}>"

    @property
    def ttl_seconds(self) -> int:
        """Lifetime of the tokens issued."""
        return self._ttl

    @property
    def used_count(self) -> int:
        """Used tokens currently remembered (for metrics)."""
        return len(self._used)

    def issue(self, call_sid: str, now: float) -> str:
        """A token for ``call_sid`` valid until ``now + ttl_seconds``."""
        sid = call_sid.encode("utf-8")
        if not sid or len(sid) > _MAX_CALL_SID_BYTES:
            raise ValueError("call_sid must be 1 to 64 bytes")
        nonce = self._random_bytes(12)
        if len(nonce) != 12:
            raise ValueError("random_bytes returned the wrong length")
        signed = _HEADER.pack(_VERSION, int(now) + self._ttl, nonce) + sid
        raw = signed + self._mac(signed)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def verify(self, token: str | None, call_sid: str, now: float) -> StreamTokenCheck:
        """Accept ``token`` once, for ``call_sid``, before it expires. Never raises."""
        if not token:
            return _refuse("missing")
        raw = _decode(token)
        if raw is None or len(raw) <= _HEADER.size + _MAC_BYTES:
            return _refuse("malformed")
        signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        version, expiry, nonce = _HEADER.unpack_from(signed)
        if version != _VERSION:
            return _refuse("malformed")
        if not hmac.compare_digest(mac, self._mac(signed)):
            return _refuse("bad-signature")
        expected_sid = call_sid.encode("utf-8", "replace")
        if not hmac.compare_digest(signed[_HEADER.size :], expected_sid):
            return _refuse("wrong-call")
        if now >= expiry:
            return _refuse("expired")
        self._prune(now)
        if nonce in self._used:
            return _refuse("replayed")
        if len(self._used) >= self._max_used:
            return _refuse("replay-cache-full")
        self._used[nonce] = expiry
        heapq.heappush(self._expiries, (expiry, nonce))
        return _ACCEPTED

    def _mac(self, signed: bytes) -> bytes:
        return hmac.digest(self._key, _DOMAIN + signed, hashlib.sha256)[:_MAC_BYTES]

    def _prune(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, nonce = heapq.heappop(expiries)
            self._used.pop(nonce, None)


def _decode(token: str) -> bytes | None:
    """base64url without padding to bytes, or None if it is not that."""
    if len(token) > _MAX_TOKEN_CHARS or len(token) % 4 == 1:
        return None
    if _TOKEN_ALPHABET.fullmatch(token) is None:
        return None
    try:
        data = token.encode("ascii")
        return base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
