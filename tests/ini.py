"""Minimal valid ini text for tests: every required value set to a known test secret."""

from __future__ import annotations

from collections.abc import Mapping

import known_secrets

from gateway.tools.daemon_process import config_with

REQUIRED: dict[str, dict[str, str]] = {
    "twilio": {"auth_token": known_secrets.TWILIO_AUTH_TOKEN,
               "stream_token_secret": known_secrets.STREAM_TOKEN_SECRET},
    "vapi": {"api_key": known_secrets.VAPI_API_KEY,
             "webhook_secret": known_secrets.VAPI_WEBHOOK_SECRET},
    "assistant": {"id": "asst-test-0001"},
}


def minimal_ini(**sections: Mapping[str, str]) -> str:
    """The required values plus ``sections`` (section name → key → raw value)."""
    merged: dict[str, dict[str, str]] = {k: dict(v) for k, v in REQUIRED.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return config_with(None, merged)
