"""``vapi-gateway-assistant`` (``python -m gateway.tools.local_assistant``): run the
local assistant on its own until SIGTERM.

It prints its base URL (``http://127.0.0.1:PORT``, the gateway's ``[vapi]
api_url``) as the first line on stdout once it listens; logs go to stderr. The
API key may be given inline, as ``env:NAME``, ``file:/path`` or ``cred:NAME``
(default ``env:VAPI_API_KEY``); it is never printed. Exit status: 0 after
SIGTERM or SIGINT, 1 if it cannot listen, 2 for bad arguments.

Example::

    vapi-gateway-assistant --port 0 --api-key env:VAPI_API_KEY --script speak+interrupt \\
        --set interrupt_at_ms=800 --seed 7
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from gateway.config import resolve_secret
from gateway.logs import start_logging_to
from gateway.tools.local_assistant.settings import LocalAssistantSettings, settings_from_strings

__all__ = ["main"]


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vapi-gateway-assistant",
        description="A local stand-in for Vapi's websocket-transport calls (POST /call and "
                    "the call socket), for demos and end-to-end tests.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="loopback address to bind (127.0.0.1 or ::1)")
    parser.add_argument("--api-key", default="env:VAPI_API_KEY",
                        help="the Bearer key clients must send: a value, env:NAME, "
                             "file:/path or cred:NAME (default env:VAPI_API_KEY)")
    parser.add_argument("--script", help="default script, e.g. speak+interrupt "
                                         "(calls may choose their own)")
    parser.add_argument("--seed", type=int, help="seed of the burst timing")
    parser.add_argument("--silence-timeout", type=float, metavar="SECONDS",
                        help="end calls after this long without uplink audio")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other setting, e.g. --set echo_delay_ms=300 (repeatable)")
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info")
    return parser


def _settings(args: argparse.Namespace) -> LocalAssistantSettings:
    values: dict[str, str] = {}
    for item in args.set:
        name, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        values[name] = value
    if args.script is not None:
        values["script"] = args.script
    if args.seed is not None:
        values["seed"] = str(args.seed)
    if args.silence_timeout is not None:
        values["silence_timeout_s"] = str(args.silence_timeout)
    return settings_from_strings(values)


def _listen(interface: str, port: int) -> str:
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        raise ValueError(f"--interface {interface!r} is not an IP address") from None
    if not address.is_loopback:
        raise ValueError(f"--interface {interface} is not a loopback address")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port number")
    if address.version == 6:
        return f"tcp6:{port}:interface={str(address).replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={address}"


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM; see the module docstring."""
    parser = _arguments()
    args = parser.parse_args(argv)
    try:
        api_key, _ = resolve_secret(args.api_key, os.environ)
        if not api_key:
            raise ValueError("the API key is empty")
        settings = _settings(args)
        listen = _listen(args.interface, args.port)
    except ValueError as error:
        print(f"vapi-gateway-assistant: {error}", file=sys.stderr)
        return 2

    from twisted.internet import reactor

    from gateway.tools.local_assistant.server import LocalAssistant

    start_logging_to(sys.stderr, args.log_format, args.log_level)
    assistant = LocalAssistant(reactor, reactor, api_key=api_key, settings=settings,
                               listen=listen)
    exit_code = 0
    running: Any = reactor

    def listening(url: str) -> None:
        print(url, flush=True)

    def cannot_listen(failure: Any) -> None:
        nonlocal exit_code
        exit_code = 1
        print(f"vapi-gateway-assistant: {failure.getErrorMessage()}", file=sys.stderr,
              flush=True)
        running.stop()

    running.callWhenRunning(lambda: assistant.start().addCallbacks(listening, cannot_listen))
    running.addSystemEventTrigger("before", "shutdown", assistant.stop)
    running.run()
    return exit_code
