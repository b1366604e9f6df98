"""TwiML answers, parsed back with xml.etree and checked element by element."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from gateway.twilio.twiml import (
    CALL_SID_PARAMETER,
    CALLED_PARAMETER,
    CALLER_PARAMETER,
    STREAM_TOKEN_PARAMETER,
    TwimlAnswers,
    validate_callback_url,
    validate_stream_url,
)

STREAM_URL = "wss://gw.example.com/twilio/media"
CALLBACK_URL = "https://gw.example.com/twilio/stream-status"


def answers(**overrides: object) -> TwimlAnswers:
    settings: dict[str, object] = {
        "stream_url": STREAM_URL,
        "stream_status_callback_url": CALLBACK_URL,
        "fallback_message": "Sorry, the assistant is unavailable. Goodbye.",
        "busy_message": "All our lines are busy. Please call again later.",
        "greeting": "Connecting you now.",
        "voice": "Polly.Joanna",
        "language": "en-US",
    }
    settings.update(overrides)
    return TwimlAnswers(**settings)  # type: ignore[arg-type]


def connect(twiml: TwimlAnswers, **overrides: str) -> ET.Element:
    values = {
        "call_sid": "CA0001",
        "caller": "+15550001111",
        "called": "+15550002222",
        "stream_token": "tok-en_123",
    }
    values.update(overrides)
    text = twiml.connect(**values)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(text)


def test_connect_answer() -> None:
    root = connect(answers())
    assert root.tag == "Response"
    assert [child.tag for child in root] == ["Say", "Connect", "Say", "Hangup"]
    greeting, connect_element, fallback, _ = list(root)
    assert greeting.text == "Connecting you now."
    assert greeting.attrib == {"voice": "Polly.Joanna", "language": "en-US"}
    assert fallback.text == "Sorry, the assistant is unavailable. Goodbye."
    assert fallback.attrib == {"voice": "Polly.Joanna", "language": "en-US"}
    assert connect_element.attrib == {}
    (stream,) = list(connect_element)
    assert stream.tag == "Stream"
    assert stream.attrib == {
        "url": STREAM_URL,
        "statusCallback": CALLBACK_URL,
        "statusCallbackMethod": "POST",
    }
    assert all(child.tag == "Parameter" for child in stream)
    parameters = {child.attrib["name"]: child.attrib["value"] for child in stream}
    assert parameters == {
        CALL_SID_PARAMETER: "CA0001",
        CALLER_PARAMETER: "+15550001111",
        CALLED_PARAMETER: "+15550002222",
        STREAM_TOKEN_PARAMETER: "tok-en_123",
    }


def test_parameter_names_match_what_twilio_hands_back() -> None:
    assert (CALL_SID_PARAMETER, CALLER_PARAMETER, CALLED_PARAMETER, STREAM_TOKEN_PARAMETER) == (
        "CallSid",
        "From",
        "To",
        "streamToken",
    )


def test_values_are_escaped() -> None:
    nasty = '"><Hangup/><Say>&amp;'
    root = connect(answers(greeting='Tom & "Jerry" <3'), caller=nasty, called="client:alice")
    assert [child.tag for child in root] == ["Say", "Connect", "Say", "Hangup"]
    assert root[0].text == 'Tom & "Jerry" <3'
    stream = root.find("Connect/Stream")
    assert stream is not None
    parameters = {p.attrib["name"]: p.attrib["value"] for p in stream}
    assert parameters["From"] == nasty
    assert parameters["To"] == "client:alice"


def test_connect_without_greeting_fallback_callback_or_voice() -> None:
    root = connect(
        answers(
            greeting=None,
            fallback_message="",
            stream_status_callback_url=None,
            voice=None,
            language=None,
        )
    )
    assert [child.tag for child in root] == ["Connect", "Hangup"]
    stream = root.find("Connect/Stream")
    assert stream is not None
    assert stream.attrib == {"url": STREAM_URL}


def test_busy_answer() -> None:
    root = ET.fromstring(answers().busy())
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root[0].text == "All our lines are busy. Please call again later."
    assert root[0].attrib == {"voice": "Polly.Joanna", "language": "en-US"}
    plain = ET.fromstring(answers(voice=None, language=None).busy())
    assert plain[0].attrib == {}


@pytest.mark.parametrize(
    "url",
    [
        "ws://gw.example.com/twilio/media",
        "ws://10.0.0.1:8080/twilio/media",
        "ws://localhost.example.com/twilio/media",
        "https://gw.example.com/twilio/media",
        "wss://gw.example.com/twilio/media?token=1",
        "wss://gw.example.com/twilio/media?",
        "wss://gw.example.com/twilio/media#x",
        "wss:///twilio/media",
        "wss://user:pw@gw.example.com/twilio/media",
        "gw.example.com/twilio/media",
        "",
    ],
)
def test_bad_stream_urls(url: str) -> None:
    with pytest.raises(ValueError):
        validate_stream_url(url)
    with pytest.raises(ValueError):
        answers(stream_url=url)


def test_good_urls() -> None:
    assert (
        validate_stream_url("wss://gw.example.com:8443/media/")
        == "wss://gw.example.com:8443/media/"
    )
    assert validate_callback_url("https://gw.example.com/cb?x=1") == "https://gw.example.com/cb?x=1"
    with pytest.raises(ValueError):
        validate_callback_url("ftp://gw.example.com/cb")
    with pytest.raises(ValueError):
        answers(stream_status_callback_url="/relative")


@pytest.mark.parametrize(
    "url",
    ["ws://127.0.0.1:8080/twilio/media", "ws://localhost/twilio/media", "ws://[::1]:9/m"],
)
def test_plain_ws_only_for_loopback_hosts(url: str) -> None:
    assert validate_stream_url(url) == url
    assert answers(stream_url=url).stream_url == url


def test_plain_http_callback_only_for_loopback_hosts() -> None:
    assert validate_callback_url("http://127.0.0.1:8080/cb") == "http://127.0.0.1:8080/cb"
    assert validate_callback_url("http://localhost/cb") == "http://localhost/cb"
    for url in ("http://gw.example.com/cb", "http://192.168.1.2/cb"):
        with pytest.raises(ValueError, match="https"):
            validate_callback_url(url)
        with pytest.raises(ValueError):
            answers(stream_status_callback_url=url)


def test_parameter_length_limit() -> None:
    twiml = answers()
    connect(twiml, caller="x" * (500 - len("From") - 1))
    with pytest.raises(ValueError):
        twiml.connect(
            call_sid="CA1", caller="x" * (500 - len("From")), called="+1", stream_token="t"
        )


def test_text_xml_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError):
        answers().connect(call_sid="CA1", caller="+1\x00", called="+1", stream_token="t")
    with pytest.raises(ValueError):
        answers(greeting="hello\x07")
    with pytest.raises(ValueError):
        answers(busy_message="   ")
