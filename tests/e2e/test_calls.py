"""Whole calls through the real ``twistd -n vapi-gateway`` on loopback: the local
assistant plays Vapi inside the daemon, the call simulator plays Twilio.

Every test checks the gateway's messages to Twilio conform to the protocol (the
simulator counts violations), that every Vapi call the gateway created was ended
(the local assistant logs each call's end, and whether ``end-call`` arrived), and that
no process is left behind.
"""

from __future__ import annotations

import array
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import known_secrets
import pytest
from ini import minimal_ini
from twilio.request_validator import RequestValidator

from gateway.tools.daemon_process import DaemonProcess, free_port

pytestmark = pytest.mark.e2e

NUMBERS = {
    "+15550100001": "local:speak",
    "+15550100002": "local:speak+interrupt",
    "+15550100003": "local:speak+drop:1200",
    "+15550100004": "local:speak+drop:1200+refuse-reconnect",
}


class Gateway:
    """One daemon with the local assistant, and the simulator pointed at it."""

    def __init__(self, workdir: Path, **sections: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        merged: dict[str, dict[str, str]] = {
            "gateway": {"listen": f"tcp:{self.port}:interface=127.0.0.1",
                        "public_url": self.base, "drain_timeout": "20"},
            "log": {"format": "json", "level": "info"},
            "admin": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
            "vapi": {"api_url": "local", "api_key": known_secrets.VAPI_API_KEY,
                     "reconnect_delay": "0.2"},
            "routing": dict(NUMBERS),
        }
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        self.daemon = DaemonProcess(minimal_ini(**merged), workdir=str(workdir))
        self.daemon.start()
        self.daemon.wait_ready()

    def sim_command(self, to: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway.tools.simulator", "--config",
                self.daemon.config_path, "--url", self.base, "--to", to, "--json", *args]

    def call(self, to: str, *args: str, timeout: float = 60) -> dict[str, Any]:
        """Run the simulator to completion; its JSON report."""
        out = subprocess.run(self.sim_command(to, *args), capture_output=True, text=True,
                             timeout=timeout)
        assert out.stdout, out.stderr
        report: dict[str, Any] = json.loads(out.stdout)
        report["exit_code"] = out.returncode
        return report

    def start_call(self, to: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.sim_command(to, *args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.events() if e.get("event") == name]

    def assert_vapi_calls_ended(self) -> None:
        created = self.events("local assistant call created")
        ended = self.events("local assistant call ended")
        assert len(ended) == len(created)
        for event in ended:
            assert event["ended_reason"] != "local-assistant-stopped", event


@pytest.fixture
def gateways(tmp_path: Path, log_capture_path: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    with log_capture_path.open("a", encoding="utf-8") as capture:
        for gateway in started:
            gateway.daemon.kill()
            capture.write("\n".join(gateway.daemon.lines) + "\n")


def start(gateways: list[Gateway], tmp_path: Path, **sections: dict[str, str]) -> Gateway:
    gateway = Gateway(tmp_path / f"gw{len(gateways)}", **sections)
    gateways.append(gateway)
    return gateway


def only_call(report: dict[str, Any]) -> dict[str, Any]:
    (call,) = report["calls"]
    assert call["violations"]["total"] == 0, call["violations"]
    return dict(call)


def test_a_normal_call(gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    report = gw.call("+15550100001", "--duration", "6", "--record", str(tmp_path / "a.wav"))
    call = only_call(report)
    assert report["exit_code"] == 0 and call["ok"], call
    assert call["speech"]["gaps"] == 0 and call["speech"]["played_ms"] > 1000
    assert call["timing"]["first_audio_ms"] < 1000
    assert call["end"]["ended_by"] == "caller" and call["end"]["status_callback"] == 204
    assert (tmp_path / "a.wav").stat().st_size > 44
    assert gw.daemon.terminate(30) == 0
    (summary,) = gw.events("call ended")
    assert summary["cause"] == "twilio-stop" and summary["underruns"] == 0
    (vapi_end,) = gw.events("local assistant call ended")
    assert vapi_end["end_call_received"] is True
    gw.assert_vapi_calls_ended()


def test_barge_in_cuts_the_assistant_off(gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    call = only_call(gw.call("+15550100002", "--duration", "5"))
    assert call["ok"] and call["clears"]["count"] >= 1
    assert call["clears"]["dropped_ms"] <= 300  # at most the playout lead was cut
    assert gw.daemon.terminate(30) == 0
    (summary,) = gw.events("call ended")
    assert summary["barge_ins"] == 1 and summary["barge_in_reaction_us"][0] < 5000
    gw.assert_vapi_calls_ended()


def test_a_dropped_vapi_socket_is_rejoined(gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    call = only_call(gw.call("+15550100003", "--duration", "5"))
    assert call["ok"] and call["end"]["ended_by"] == "caller"
    assert gw.daemon.terminate(30) == 0
    (summary,) = gw.events("call ended")
    assert summary["reconnects"] >= 1 and summary["cause"] == "twilio-stop"
    gw.assert_vapi_calls_ended()


def test_refused_recovery_plays_the_fallback_and_hangs_up(
        gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path, vapi={"on_vapi_loss": "hangup", "reconnect_attempts": "1"})
    call = only_call(gw.call("+15550100004", "--duration", "8"))
    assert call["end"]["ended_by"] == "gateway" and call["end"]["fallback_spoken"] is True
    assert gw.daemon.terminate(30) == 0
    (summary,) = gw.events("call ended")
    assert summary["cause"] == "vapi-lost"
    gw.assert_vapi_calls_ended()


def test_the_caller_dropping_ends_the_vapi_call(gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    call = only_call(gw.call("+15550100001", "--duration", "3", "--drop"))
    assert call["end"]["ended_by"] == "caller-drop"
    assert gw.daemon.terminate(30) == 0
    (summary,) = gw.events("call ended")
    assert summary["cause"] == "twilio-socket-closed"
    (vapi_end,) = gw.events("local assistant call ended")
    assert vapi_end["end_call_received"] is True
    gw.assert_vapi_calls_ended()


def _post_signed(gw: Gateway, path: str, params: dict[str, str]) -> int:
    signature = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(
        gw.base + path, params)
    return _post(gw, path, params, signature)


def _post(gw: Gateway, path: str, params: dict[str, str], signature: str | None) -> int:
    data = urllib.parse.urlencode(params).encode()
    request = urllib.request.Request(gw.base + path, data=data, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    if signature is not None:
        request.add_header("X-Twilio-Signature", signature)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_terminal_status_callback_ends_a_live_call(
        gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    running = gw.start_call("+15550100001", "--duration", "30")
    started = gw.daemon.wait_for("media stream started")
    status = _post_signed(gw, "/twilio/status", {"CallSid": started["call_sid"],
                                                 "CallStatus": "completed"})
    assert status == 204
    out, _ = running.communicate(timeout=30)
    call = only_call(json.loads(out))
    assert call["end"]["ended_by"] == "gateway"
    assert gw.daemon.terminate(30) == 0
    (summary,) = gw.events("call ended")
    assert summary["cause"] == "twilio-status"
    gw.assert_vapi_calls_ended()


def test_forged_signatures_are_refused(gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    params = {"CallSid": "CA" + "1" * 32, "From": "+1", "To": "+2"}
    assert _post(gw, "/twilio/voice", params, "forged=") == 403
    assert _post(gw, "/twilio/voice", params, None) == 403
    assert _post(gw, "/twilio/status", params, "forged=") == 403
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
        raw.sendall(b"GET /twilio/media HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\nX-Twilio-Signature: forged=\r\n\r\n")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403")
    assert gw.daemon.terminate(30) == 0
    assert gw.events("call admitted") == []


def test_capacity_reached_answers_busy(gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path, gateway={"max_concurrent_calls": "1"})
    running = gw.start_call("+15550100001", "--duration", "6")
    gw.daemon.wait_for("media stream started")
    busy = gw.call("+15550100001", "--duration", "2")
    (refused,) = busy["calls"]
    assert refused["outcome"] == "refused" and refused["answer"]["kind"] == "busy"
    out, _ = running.communicate(timeout=30)
    assert only_call(json.loads(out))["ok"]
    assert gw.daemon.terminate(30) == 0
    gw.assert_vapi_calls_ended()


def test_sigterm_lets_active_calls_finish_and_refuses_new_ones(
        gateways: list[Gateway], tmp_path: Path) -> None:
    gw = start(gateways, tmp_path)
    running = gw.start_call("+15550100001", "--duration", "5", "--calls", "2")
    gw.daemon.wait_for("media stream started")
    gw.daemon.wait_for("media stream started")
    assert gw.daemon.process is not None
    gw.daemon.process.terminate()  # SIGTERM: drain
    gw.daemon.wait_for("draining")
    late = gw.call("+15550100001", "--duration", "2")
    assert late["calls"][0]["outcome"] == "refused"
    out, _ = running.communicate(timeout=60)
    report = json.loads(out)
    assert [c["ok"] for c in report["calls"]] == [True, True], [
        (c["outcome"], c["detail"], c["answer"], c["timing"]) for c in report["calls"]
        if not c["ok"]]
    assert all(c["end"]["ended_by"] == "caller" for c in report["calls"])
    assert gw.daemon.wait(60) == 0
    causes = sorted(e["cause"] for e in gw.events("call ended"))
    assert causes == ["twilio-stop", "twilio-stop"]
    gw.assert_vapi_calls_ended()


def test_a_recording_of_what_the_caller_heard(gateways: list[Gateway], tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    gw = start(gateways, tmp_path, recording={"enabled": "true", "directory": str(folder)})
    call = only_call(gw.call("+15550100002", "--duration", "4"))
    assert gw.daemon.terminate(30) == 0
    with wave.open(str(folder / f"{call['call_sid']}.wav")) as recording:
        assert recording.getnchannels() == 2  # caller left, assistant right
        assert recording.getsampwidth() == 2 and recording.getframerate() == 8000
        seconds = recording.getnframes() / 8000
        frames = recording.readframes(recording.getnframes())
    assert 3.5 <= seconds <= 4.5
    samples = array.array("h", frames)
    caller, assistant = samples[0::2], samples[1::2]
    assert max(abs(s) for s in caller) > 1000  # the caller clip is on the left
    heard = [i for i in range(0, len(assistant), 160) if max(assistant[i:i + 160]) > 1000]
    assert heard, "the assistant is on the right"
    # the assistant was cut off by the barge-in: nothing of it after the clear
    clear_at = call["clears"]["samples"][0]["at_ms"]
    assert heard[-1] / 8 <= clear_at + 40
