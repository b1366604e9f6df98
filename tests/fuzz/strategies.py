"""Hypothesis strategies for the fuzz targets: inputs with the structure the parsers expect,
then broken in the ways that matter.

Messages start from valid templates (the targets' seeds) and get mutated: fields
dropped, replaced by any JSON value, extra fields added, strings turned into numbers
and back; the JSON text may then get bytes that are not UTF-8 spliced into one of its
strings, or an escaped lone surrogate (``\\ud800``) — the family of the msgspec
``UnicodeDecodeError`` found earlier.  Raw random bytes are mixed in too.
:data:`STRATEGIES` maps each target name of :mod:`fuzz.targets` to its strategy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from hypothesis import strategies as st

from fuzz.targets import ASSISTANT_FILE_MARK, TARGETS
from gateway.config import documented_options

__all__ = ["BAD_TEXT", "STRATEGIES", "corrupted", "json_values", "mutated"]

INVALID_UTF8: Final = (b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                       b"\xc0\xaf", b"\xe2\x82", b"\x80")
SURROGATE_ESCAPES: Final = (b"\\ud800", b"\\udfff", b"\\ud83d", b"\\ud83d\\ude00", b"\\u0000",
                            b"\\uFFFF", b"\\u12")
BAD_TEXT: Final = ("", " ", "\x00", "\ud800", "²", "٣", "\uff11\uff12", "\u202e", "a" * 600, "é",
                   "\r\n", "%", "+", "=", "&", "\\", '"', "nan", "inf", "-0", "1e999",
                   "9" * 5000)
"""Strings that have broken parsers before: empty, NUL, a lone surrogate, digits that
``str.isdigit`` accepts and ``int`` may not, RTL override, long, separators."""

json_scalars: Final = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(), st.text(max_size=16), st.sampled_from(BAD_TEXT),
)
json_values: Final = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=10,
)


@st.composite
def mutated(draw: st.DrawFn, template: Any, depth: int = 0) -> Any:
    """``template`` with some of its fields dropped, replaced, retyped or added."""
    if isinstance(template, dict) and depth < 4:
        out: dict[str, Any] = {}
        for key, value in template.items():
            action = draw(st.integers(0, 9))
            if action == 0:
                continue  # dropped
            if action == 1:
                out[key] = draw(json_values)
            elif action == 2 and isinstance(value, str):
                out[key] = draw(st.one_of(st.integers(-(2**64), 2**64), st.floats(),
                                          st.sampled_from(BAD_TEXT)))
            elif action == 3 and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = draw(st.sampled_from([str(value), -1, 2**53 + 1, 1e300, "x"]))
            else:
                out[key] = draw(mutated(value, depth + 1))
        for _ in range(draw(st.integers(0, 2))):
            out[draw(st.sampled_from([*template, "extra", ""]))] = draw(json_values)
        return out
    if isinstance(template, list) and depth < 4:
        items = [draw(mutated(item, depth + 1)) for item in template]
        return items + draw(st.lists(json_values, max_size=2))
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    return template


@st.composite
def corrupted(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` JSON text with bad UTF-8 or an escaped lone surrogate inside a string."""
    insert: bytes = draw(st.sampled_from(INVALID_UTF8 + SURROGATE_ESCAPES))
    quotes = [i for i, byte in enumerate(raw) if byte == ord('"')]
    at: int = draw(st.sampled_from(quotes)) + 1 if quotes else len(raw)
    return raw[:at] + insert + raw[at:]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def json_messages(templates: list[bytes]) -> st.SearchStrategy[bytes]:
    """Mutated templates as JSON, sometimes corrupted; any JSON value; any bytes."""
    decoded = [json.loads(t) for t in templates]
    message = st.sampled_from(decoded).flatmap(mutated).map(_dumps)
    return st.one_of(
        message,
        message.flatmap(corrupted),
        st.sampled_from(templates).flatmap(corrupted),
        json_values.map(_dumps),
        st.binary(max_size=64),
    )


def _seeds(name: str) -> list[bytes]:
    return TARGETS[name].seeds()


# -- per target ------------------------------------------------------------------------


def media_stream() -> st.SearchStrategy[bytes]:
    """Several frames joined by newlines, starting (mostly) like a real stream."""
    frames = json_messages(_seeds("twilio-media-decoder"))
    valid = st.sampled_from(_seeds("twilio-media-decoder"))
    return st.lists(st.one_of(valid, frames, st.just(b"\x00binary")), max_size=10).map(
        b"\n".join)


_FORM_CHARS: Final = st.one_of(
    st.text(max_size=12), st.sampled_from(BAD_TEXT),
    st.binary(max_size=6).map(lambda b: "".join(f"%{c:02X}" for c in b)),
    st.sampled_from(["%", "%F", "%zz", "+", "%00", "%ED%A0%80", "%C3"]),
)


@st.composite
def twilio_forms(draw: st.DrawFn) -> bytes:
    """A form body, names and values percent-encoded or raw, some not UTF-8."""
    names = st.one_of(st.sampled_from(["CallSid", "AccountSid", "From", "To", "CallStatus",
                                       "StreamEvent", "SequenceNumber"]), _FORM_CHARS)
    pairs = draw(st.lists(st.tuples(names, _FORM_CHARS), max_size=8))
    parts = []
    for name, value in pairs:
        if draw(st.booleans()):
            parts.append(f"{name}={value}".encode("utf-8", "surrogatepass"))
        else:
            parts.append(name.encode("utf-8", "surrogatepass"))
    separator = draw(st.sampled_from([b"&", b"&&", b";", b"&="]))
    return separator.join(parts)


@st.composite
def twilio_form_requests(draw: st.DrawFn) -> bytes:
    """Content-Type selector, request target, signature header, body (see the target)."""
    selector = draw(st.integers(0, 255)).to_bytes(1, "big")
    target = draw(st.one_of(
        st.sampled_from([b"/twilio/voice", b"/twilio/voice?bodySHA256=00", b"/x?y=%zz",
                         b"", b"//evil.example/x", b"/a b", b"/\xff"]),
        st.binary(max_size=30).filter(lambda b: b"\n" not in b)))
    signature = draw(st.one_of(st.binary(max_size=40), st.sampled_from(
        [b"", b"   ", b"L/OH5YylLD5NRKLltdqwSvS0BnU=", b"\xff" * 300])).filter(
        lambda b: b"\n" not in b))
    body = draw(st.one_of(twilio_forms(), st.binary(max_size=80)))
    return selector + target + b"\n" + signature + b"\n" + body


@st.composite
def twilio_route_posts(draw: st.DrawFn) -> bytes:
    """Route selector (and signed or not), then a form body."""
    selector = draw(st.integers(0, 7)).to_bytes(1, "big")
    sids = ["CA" + "1" * 32, "CA1", "ca-1", "", "CA" + "x" * 70]
    voice = [f"CallSid={draw(st.sampled_from(sids))}",
             f"CallStatus={draw(st.sampled_from(['completed', 'ringing', '', '%FF']))}",
             f"StreamEvent={draw(st.sampled_from(['stream-error', 'stream-started', '']))}"]
    fields = draw(st.lists(st.sampled_from(voice), max_size=3))
    extra = draw(twilio_forms())
    return selector + b"&".join([f.encode() for f in fields] + [extra])


_INI_KEYS: Final = {name: tuple(keys) for name, keys in documented_options().items()}
_INI_KEYS_EXTRA: Final = {
    "routing": ("+15551230001", "+1 555 123 0002", "sales", "+"),
    "local_assistant": ("listen", "script", "speed_min", "speed_max", "utterances",
                        "frame_ms", "burst-min-ms", "seed"),
}
_INI_VALUES: Final = st.one_of(
    st.sampled_from(BAD_TEXT), st.text(max_size=20).map(lambda t: t.replace("\n", " ")),
    st.integers(-(2**40), 2**40).map(str), st.floats().map(str),
    st.sampled_from(["tcp:8080", "tcp:²", "tcp:port=١٢", "ssl:¹", "tcp6:٣:interface=::1",
                     "systemd:domain=INET:index=0", "systemd:index=0", "unix:/tmp/x",
                     "tcp:8080:interface=::1", "https://gw.example.com", "https://[::1",
                     "http://10.0.0.1", "local", "env:TWILIO_AUTH_TOKEN", "env:MISSING",
                     "file:assistant.json", "assistant.json", "file:", "file:setup.cfg",
                     "true", "off",
                     "user-interrupted,speech-update", "speak+interrupt", "fail-create:5xx*2",
                     "asst-1", "file:x.json", "x" * 40, "1_000", "0x10", "+5", "1e3"]),
)


@st.composite
def ini_texts(draw: st.DrawFn) -> bytes:
    """An ini file: known sections with their own keys (and some unknown ones), odd
    values, the required secrets most of the time, sometimes broken syntax."""
    sections: dict[str, dict[str, str]] = {}
    if draw(st.integers(0, 3)):
        sections = {"twilio": {"auth_token": "env:TWILIO_AUTH_TOKEN",
                               "stream_token_secret": "env:STREAM_TOKEN_SECRET"},
                    "assistant": {"id": "a-1"}}
    with_file = draw(st.booleans())
    if with_file and sections and draw(st.booleans()):
        sections["assistant"] = {"file": "assistant.json"}
    elif with_file and sections:
        sections["routing"] = {"+15551230001": "file:assistant.json"}
    names = [*_INI_KEYS, "routing", "local_assistant", "nope"]
    for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        known: tuple[str, ...] = _INI_KEYS.get(name, ()) + _INI_KEYS_EXTRA.get(name, ())
        section = sections.setdefault(name, {})
        for _ in range(draw(st.integers(1, 4))):
            unknown_key = not known or draw(st.integers(0, 4)) == 0
            key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
                       ) if unknown_key else draw(st.sampled_from(known))
            section[key] = draw(_INI_VALUES).replace("\n", " ").replace("\r", " ")
    lines = [f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
             for name, values in sections.items()]
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(
            ["no section header\n", "[unclosed\n", "  indented = continuation\n", "=\n",
             "[gateway]\nlisten = a\nlisten = b\n"])))
    text = "".join(lines).encode("utf-8", "surrogatepass")
    if with_file:
        text += ASSISTANT_FILE_MARK + draw(assistant_files())
    return text


def assistant_files() -> st.SearchStrategy[bytes]:
    """The content of ``assistant.json``: mutated assistants, deep nesting, not JSON."""
    template = {"firstMessage": "Hi", "model": {"provider": "openai", "model": "gpt-4o",
                                                "messages": [{"role": "system", "content": "x"}]}}
    return st.one_of(
        mutated(template).map(_dumps),
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * (n % 2)),
        st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.sampled_from([b"", b"{}", b"[]", b"null", b"\xff\xfe{", b'{"a":"\xc3"}', b"NaN"]),
        st.binary(max_size=40),
    )


@st.composite
def token_inputs(draw: st.DrawFn) -> bytes:
    """Mode byte, then a random token and CallSid (even) or XOR edits (odd)."""
    if draw(st.booleans()):
        token = draw(st.one_of(st.text(max_size=120), st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
            min_size=40, max_size=100)))
        call_sid = draw(st.one_of(st.sampled_from(["CA" + "1" * 32, ""]), st.text(max_size=70)))
        return b"\x00" + f"{token}\x00{call_sid}".encode("utf-8", "surrogatepass")
    return b"\x01" + draw(st.binary(max_size=12))


@st.composite
def webhook_auth_requests(draw: st.DrawFn) -> bytes:
    """Header lines for the Vapi credential checks, a blank line, a body."""
    names = st.sampled_from([b"x-vapi-secret", b"authorization", b"x-signature",
                             b"x-timestamp", b"X-Timestamp", b"other", b""])
    values = st.one_of(
        st.binary(max_size=40).filter(lambda b: b"\n" not in b),
        st.sampled_from([b"Bearer ", b"bearer  x", b"sha256=", b"sha256=zz", b"00" * 32,
                         b"1700000000", b"1700000000000", b"+1700000000", b"\xd9\xa1\xd9\xa2",
                         b"9" * 30, b"-5", b"=" * 3, b"AAAA"]))
    lines = draw(st.lists(st.tuples(names, values), max_size=5))
    body = draw(st.binary(max_size=40))
    return b"\n".join(name + b": " + value for name, value in lines) + b"\n\n" + body


_HTTP_PATHS: Final = (b"/big", b"/small", b"/none", b"/big?x=1", b"http://h/big", b"*", b"/")


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """One to three HTTP/1.1 requests: declared and chunked bodies, honest or not."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"post", b"X"]))
        path = draw(st.sampled_from(_HTTP_PATHS))
        body = draw(st.binary(max_size=300))
        headers = [b"Host: x"]
        framing = draw(st.integers(0, 4))
        if framing == 0:
            headers.append(b"Content-Length: %d" % len(body))
        elif framing == 1:
            headers.append(b"Content-Length: %d" % draw(st.integers(0, 2**40)))
        elif framing == 2:
            headers.append(b"Transfer-Encoding: chunked")
            size = draw(st.integers(1, 64))
            chunks = [body[i:i + size] for i in range(0, len(body), size)]
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        elif framing == 3:
            headers.append(b"Transfer-Encoding: chunked")
            body = draw(st.sampled_from([b"ffffffff\r\n", b"zz\r\n", b"5\r\nabc", b"-1\r\n"]))
        if draw(st.booleans()):
            headers.append(b"Expect: 100-continue")
        if draw(st.integers(0, 5)) == 0:
            headers.append(draw(st.binary(max_size=20)))
        out += method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"
        out += body
    return out


@st.composite
def websocket_frames(draw: st.DrawFn) -> bytes:
    """Cut point, then client frames: text/binary/continuation/control/reserved opcodes,
    FIN and RSV bits, masked or not, lengths in any encoding (honest or not), payloads
    around the size limits (frame 512, message 1024), ASCII, UTF-8 or not UTF-8."""
    out = bytes([draw(st.integers(0, 255))])
    for _ in range(draw(st.integers(1, 6))):
        opcode = draw(st.sampled_from([1, 1, 1, 2, 2, 0, 8, 9, 10, 3, 11]))
        fin = draw(st.integers(0, 5)) > 0
        rsv = draw(st.sampled_from([0, 0, 0, 0x40, 0x20, 0x10]))
        payload = draw(st.one_of(
            st.binary(max_size=40), st.text(max_size=40).map(lambda t: t.encode()),
            st.sampled_from([b"\xc3(", b"\xed\xa0\x80", "caf\u00e9".encode(), b"\x03\xe8ok",
                             b'{"event":"media"}']),
            st.integers(100, 1100).map(lambda n: b"a" * n)))
        masked = draw(st.integers(0, 9)) > 0
        mask = draw(st.binary(min_size=4, max_size=4)) if masked else b""
        declared = len(payload) if draw(st.integers(0, 7)) else draw(st.integers(0, 70000))
        form = draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
        if form == "minimal" and declared < 126:
            length = bytes([declared | (0x80 if masked else 0)])
        elif form in ("minimal", "16") and declared < 65536:
            length = bytes([126 | (0x80 if masked else 0)]) + declared.to_bytes(2, "big")
        else:
            length = bytes([127 | (0x80 if masked else 0)]) + declared.to_bytes(8, "big")
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
        out += bytes([(0x80 if fin else 0) | rsv | opcode]) + length + mask + body
    return out


STRATEGIES: Final[Mapping[str, st.SearchStrategy[bytes]]] = {
    "twilio-media-decoder": json_messages(_seeds("twilio-media-decoder")),
    "twilio-media-stream": media_stream(),
    "vapi-call-events": json_messages(_seeds("vapi-call-events")),
    "twilio-webhook-form": twilio_form_requests(),
    "twilio-webhook-routes": twilio_route_posts(),
    "vapi-webhook-body": json_messages(_seeds("vapi-webhook-body")),
    "vapi-webhook-route": json_messages(_seeds("vapi-webhook-body")),
    "vapi-webhook-auth": webhook_auth_requests(),
    "admin-place-call": json_messages(_seeds("admin-place-call")),
    "ini-config": ini_texts(),
    "stream-token": token_inputs(),
    "websocket-frames": websocket_frames(),
    "http-limits": http_requests(),
}
