"""What end-to-end tests send to and read from a running daemon: signed Twilio status
callbacks and samples of ``/metrics`` (shared by tests/e2e)."""

from __future__ import annotations

import urllib.parse

import known_secrets
from twilio.request_validator import RequestValidator


def signed_status_callback(signed_url: str, call_sid: str, status: str
                           ) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a Twilio call status callback signed for ``signed_url``."""
    params = {"CallSid": call_sid, "CallStatus": status, "AccountSid": "AC" + "0" * 32}
    signature = RequestValidator(known_secrets.TWILIO_AUTH_TOKEN).compute_signature(
        signed_url, params)
    return (urllib.parse.urlencode(params).encode(),
            {"Content-Type": "application/x-www-form-urlencoded",
             "X-Twilio-Signature": signature})


def metric_sample(body: bytes, name: str, **labels: str) -> float:
    """One sample from a Prometheus text page (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0
