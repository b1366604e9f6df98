"""Validation of Twilio's ``X-Twilio-Signature`` on webhooks and the stream upgrade.

Built on :class:`twilio.request_validator.RequestValidator` (HMAC-SHA1 keyed by
the account's Auth Token, base64), with three rules the library leaves to us:

- The URL is the **public** one, rebuilt from configuration (the public base URL
  plus the raw request target, see :func:`public_url`): never from ``Host`` or
  ``X-Forwarded-*`` headers, which the caller of the webhook controls.
- Form parameters come from the raw body (:func:`parse_form_body`), not from
  Twisted's ``request.args``: that dict merges the query string into the form
  (a query parameter would then be signed twice), lets the body overwrite query
  values of the same name and also splits on ``;``. (Twisted has already read
  ``request.content``: ``seek(0)`` before reading the body.) Repeated names are
  kept: the library reads them through ``getlist()``; note that it signs each
  *distinct* value once, sorted (``sorted(set(values))``), as twilio-node does.
- Comparisons use :func:`hmac.compare_digest` (the library's ``compare`` returns
  early on a length mismatch and is not used).

Every check returns a :class:`SignatureCheck` and never raises, so a route can
log ``check.reason`` and answer 403.

The library (9.13) also knows a SharedKey scheme (HMAC-SHA256, announced by an
``X-Twilio-Webhooks-Signature-Settings`` header). It is not supported here: such
a request fails with ``mismatch``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final, Literal
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit, urlunsplit

import msgspec
from twilio.request_validator import RequestValidator

__all__ = [
    "SIGNATURE_HEADER",
    "SignatureCheck",
    "SignatureFailure",
    "TwilioSignatureValidator",
    "parse_form_body",
    "public_url",
]

SIGNATURE_HEADER: Final = "X-Twilio-Signature"

SignatureFailure = Literal[
    "missing-signature",  # no X-Twilio-Signature header (or an empty one)
    "mismatch",  # the signature does not match any accepted URL form / token
    "missing-body-hash",  # a JSON body, but no bodySHA256 in the URL
    "body-hash-mismatch",  # bodySHA256 in the URL is not the SHA-256 of the body
    "undecodable-parameters",  # form names or values are not UTF-8
    "bad-url",  # the public URL given is not absolute http(s)/ws(s)
]

_DEFAULT_PORTS: Final = {"https": 443, "wss": 443, "http": 80, "ws": 80}
_MAX_SIGNATURE_LENGTH: Final = 256


class SignatureCheck(msgspec.Struct, frozen=True):
    """The outcome of a check: ``ok``, or the reason it failed (for the log)."""

    ok: bool
    reason: SignatureFailure | None = None

    def __bool__(self) -> bool:
        return self.ok


_OK: Final = SignatureCheck(ok=True)


def _fail(reason: SignatureFailure) -> SignatureCheck:
    return SignatureCheck(ok=False, reason=reason)


class _MultiValueForm(dict[str, list[str]]):
    """A dict that RequestValidator reads through ``getlist`` (Django-style)."""

    def getlist(self, name: str) -> list[str]:
        return self[name]


def parse_form_body(body: bytes) -> dict[bytes, list[bytes]]:
    """Parse an ``application/x-www-form-urlencoded`` body (WHATWG rules) to bytes.

    Blank values are kept (Twilio signs them: ``name`` + ``""``). Unlike
    ``twisted.web.http.parse_qs`` it splits on ``&`` only (not ``;``) and keeps a
    name without ``=``; unlike ``urllib.parse.parse_qs`` on bytes it does not fail
    on percent-encoded UTF-8.
    """
    form: dict[bytes, list[bytes]] = {}
    for item in body.split(b"&"):
        if not item:
            continue
        name, _, value = item.partition(b"=")
        form.setdefault(unquote_to_bytes(name.replace(b"+", b" ")), []).append(
            unquote_to_bytes(value.replace(b"+", b" "))
        )
    return form


def public_url(public_base_url: str, request_target: bytes | str) -> str:
    """The URL Twilio called: configured base (scheme, host, optional prefix) + target.

    :param public_base_url: e.g. ``https://gw.example.com`` or ``https://example.com/gw``.
    :param request_target: the raw path and query as received, i.e. Twisted's
        ``request.uri`` (``b"/twilio/voice?x=1"``); percent-escapes are kept as sent.
    """
    target = (
        request_target.decode("ascii", "replace")
        if isinstance(request_target, bytes)
        else request_target
    )
    if not target.startswith("/"):
        target = "/" + target
    return public_base_url.rstrip("/") + target


def _signature_bytes(signature: bytes | str | None) -> bytes | None:
    if signature is None:
        return None
    raw = signature.encode("utf-8", "replace") if isinstance(signature, str) else signature
    raw = raw.strip()
    if not raw:
        return None
    return raw[:_MAX_SIGNATURE_LENGTH]


def _url_variants(url: str) -> list[str] | None:
    """The URL as given, without its port, and with the scheme's default port."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    default_port = _DEFAULT_PORTS.get(parts.scheme)
    if default_port is None or not parts.hostname:
        return None
    userinfo, at, host = parts.netloc.rpartition("@")
    bare_host = host if port is None else host[: host.rfind(":")]
    variants = [url]
    for netloc in (bare_host, f"{bare_host}:{default_port}"):
        candidate = urlunsplit(parts._replace(netloc=userinfo + at + netloc))
        if candidate not in variants:
            variants.append(candidate)
    return variants


def _body_hash_in(url: str) -> list[str] | None:
    """The ``bodySHA256`` values in the URL's query, or None if the URL is unparsable."""
    try:
        return parse_qs(urlsplit(url).query).get("bodySHA256", [])
    except ValueError:
        return None


def _decode_form(form: Mapping[bytes, Sequence[bytes]]) -> _MultiValueForm:
    decoded = _MultiValueForm()
    for name, values in form.items():
        key = name.decode("utf-8")
        decoded.setdefault(key, []).extend(value.decode("utf-8") for value in values)
    return decoded


class TwilioSignatureValidator:
    """Checks ``X-Twilio-Signature`` against one Auth Token (plus an optional old one).

    ``previous_auth_token`` covers an Auth Token rotation: requests signed with
    the old primary token keep validating until it is removed from the config.
    """

    def __init__(self, auth_token: str, *, previous_auth_token: str | None = None) -> None:
        if not auth_token:
            raise ValueError("auth_token is empty")
        tokens = [auth_token]
        if previous_auth_token:
            tokens.append(previous_auth_token)
        self._validators: Final = tuple(RequestValidator(token) for token in tokens)

    def __repr__(self) -> str:
        return f"<TwilioSignatureValidator tokens={len(self._validators)}>"

    def check_form(
        self,
        url: str,
        form: Mapping[bytes, Sequence[bytes]],
        signature: bytes | str | None,
    ) -> SignatureCheck:
        """A form-encoded POST (or a GET with ``form={}``): URL + sorted parameters.

        :param url: the public URL, query string included (:func:`public_url`).
        :param form: the body parameters (:func:`parse_form_body`), not ``request.args``.
        :param signature: the ``X-Twilio-Signature`` header value, or None.
        """
        given = _signature_bytes(signature)
        if given is None:
            return _fail("missing-signature")
        try:
            params = _decode_form(form)
        except (UnicodeDecodeError, AttributeError):
            return _fail("undecodable-parameters")
        return self._check(url, params, given)

    def check_json(self, url: str, body: bytes, signature: bytes | str | None) -> SignatureCheck:
        """A JSON body: the URL carries ``bodySHA256=<hex>``; no parameters are signed."""
        given = _signature_bytes(signature)
        if given is None:
            return _fail("missing-signature")
        claimed = _body_hash_in(url)
        if claimed is None:
            return _fail("bad-url")
        if not claimed:
            return _fail("missing-body-hash")
        signed = self._check(url, {}, given)
        if not signed.ok:
            return signed
        actual = hashlib.sha256(body).hexdigest().encode("ascii")
        if not hmac.compare_digest(actual, claimed[0].strip().lower().encode("utf-8")):
            return _fail("body-hash-mismatch")
        return _OK

    def check_request(
        self,
        url: str,
        content_type: bytes | str | None,
        body: bytes,
        signature: bytes | str | None,
    ) -> SignatureCheck:
        """Dispatch on ``Content-Type``: JSON bodies via bodySHA256, anything else as a form.

        A URL with ``bodySHA256`` is always checked as JSON, whatever the header says.
        """
        media_type = (
            content_type.decode("latin-1")
            if isinstance(content_type, bytes)
            else (content_type or "")
        )
        media_type = media_type.split(";", 1)[0].strip().lower()
        if media_type == "application/json" or _body_hash_in(url):
            return self.check_json(url, body, signature)
        form = parse_form_body(body) if media_type == "application/x-www-form-urlencoded" else {}
        return self.check_form(url, form, signature)

    def check_websocket(self, stream_url: str, signature: bytes | str | None) -> SignatureCheck:
        """The Media Streams upgrade: the ``wss://`` URL from the TwiML, no parameters.

        Also accepts the URL with a trailing ``/`` added (or removed), as the docs suggest.
        """
        given = _signature_bytes(signature)
        if given is None:
            return _fail("missing-signature")
        alternate = stream_url[:-1] if stream_url.endswith("/") else stream_url + "/"
        first = self._check(stream_url, {}, given)
        if first.ok or first.reason == "bad-url":
            return first
        return self._check(alternate, {}, given)

    def _check(self, url: str, params: Mapping[str, list[str]], given: bytes) -> SignatureCheck:
        variants = _url_variants(url)
        if variants is None:
            return _fail("bad-url")
        matched = False
        for validator in self._validators:
            for candidate in variants:
                expected = str(validator.compute_signature(candidate, params)).encode("ascii")
                matched |= hmac.compare_digest(expected, given)
        return _OK if matched else _fail("mismatch")
