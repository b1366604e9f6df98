"""Benchmark: the whole sans-io path of an ``assistant-request`` webhook.

Authenticate (each credential kind) + parse the body + choose the assistant +
build and encode the answer, on a realistic ~1.5 KB body. Vapi allows 7.5 s end
to end; this measures how little of it the gateway's own work takes.

Run: ``python bench/bench_vapi_assistant_request.py [--iterations N] [--repeats R]``
Prints the best and median microseconds per request over R repeats of N.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.vapi.assistants import (
    AssistantById,
    InlineAssistant,
    RoutingTable,
    assistant_request_answer,
    choose_assistant,
)
from gateway.vapi.webhook_auth import (
    BearerAuth,
    HmacAuth,
    SharedSecretAuth,
    WebhookAuth,
    authenticate,
)
from gateway.vapi.webhook_messages import AssistantRequest, parse_server_message

SECRET = b"bench-webhook-secret-0123456789"
NOW_S = 1_790_000_000
NOW_NS = NOW_S * 1_000_000_000

BODY = msgspec.json.encode({"message": {
    "type": "assistant-request",
    "timestamp": NOW_S * 1000,
    "call": {
        "id": "5f0c6f53-8a0e-4f6a-9f7e-3c2a1b0d9e8f",
        "orgId": "0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e",
        "createdAt": "2026-11-21T13:00:00.000Z",
        "updatedAt": "2026-11-21T13:00:00.000Z",
        "type": "inboundPhoneCall",
        "status": "ringing",
        "phoneCallProvider": "twilio",
        "phoneCallProviderId": "CA" + "0123456789abcdef" * 2,
        "phoneCallTransport": "pstn",
        "phoneNumberId": "9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4",
        "customer": {"number": "+15550100199", "name": "Caller"},
        "phoneNumber": {"number": "+15550100100", "provider": "twilio",
                        "name": "Front desk", "id": "9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4"},
        "monitor": {"listenUrl": "wss://example.invalid/listen",
                    "controlUrl": "https://example.invalid/control"},
        "costs": [], "messages": [],
        "metadata": {f"key{i}": "x" * 40 for i in range(12)},
    },
    "phoneNumber": {"number": "+15550100100"},
    "customer": {"number": "+15550100199"},
}})
STAMP = str(NOW_S).encode()
SIGNATURE = hmac.new(SECRET, STAMP + b"." + BODY, hashlib.sha256).hexdigest().encode()

AUTHS: dict[str, tuple[WebhookAuth, dict[str, list[bytes]]]] = {
    "hmac-sha256": (HmacAuth(SECRET), {"x-signature": [SIGNATURE], "x-timestamp": [STAMP]}),
    "shared-secret": (SharedSecretAuth(SECRET), {"x-vapi-secret": [SECRET]}),
    "bearer": (BearerAuth(SECRET), {"authorization": [b"Bearer " + SECRET]}),
}

TABLE = RoutingTable(
    routes={f"+1555010{n:04d}": AssistantById(f"asst-{n}") for n in range(200)}
    | {"+15550100100": InlineAssistant({"firstMessage": "Hello", "model": {
        "provider": "openai", "model": "gpt-4o",
        "messages": [{"role": "system", "content": "You book appointments." * 20}]}})},
    default=AssistantById("asst-default"),
)
ENCODER = msgspec.json.Encoder()


def whole_path(auth: WebhookAuth, headers: dict[str, list[bytes]]) -> bytes:
    """What the route will do: authenticate, parse, choose, answer (as bytes)."""
    result = authenticate(auth, headers, BODY, NOW_NS)
    if not result.ok:
        raise SystemExit(f"benchmark setup is wrong: {result.reason}")
    message = parse_server_message(BODY)
    assert isinstance(message, AssistantRequest)
    choice = choose_assistant(TABLE, message.dialled_number)
    return ENCODER.encode(assistant_request_answer(choice, "Sorry, not in service."))


def measure(step: Callable[[], object], iterations: int, repeats: int) -> tuple[float, float]:
    """(best, median) microseconds per call."""
    per_call: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(iterations):
            step()
        per_call.append((time.perf_counter_ns() - started) / iterations / 1000)
    return min(per_call), statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    print(f"body {len(BODY)} bytes; {args.repeats} x {args.iterations} iterations; "
          f"python {sys.version.split()[0]}")
    print(f"{'step':42} {'best µs':>9} {'median µs':>10}")
    hmac_auth, hmac_headers = AUTHS["hmac-sha256"]
    steps: list[tuple[str, Callable[[], object]]] = [
        *[(f"whole path, {name}", lambda a=auth, h=headers: whole_path(a, h))
          for name, (auth, headers) in AUTHS.items()],
        ("  authenticate only (hmac-sha256)",
         lambda: authenticate(hmac_auth, hmac_headers, BODY, NOW_NS)),
        ("  parse_server_message only", lambda: parse_server_message(BODY)),
        ("  choose + answer + encode only",
         lambda: ENCODER.encode(assistant_request_answer(
             choose_assistant(TABLE, "+15550100100"), "x"))),
    ]
    for name, step in steps:
        best, median = measure(step, args.iterations, args.repeats)
        print(f"{name:42} {best:9.2f} {median:10.2f}")


if __name__ == "__main__":
    main()
