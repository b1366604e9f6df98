"""The local assistant, standalone, with the two load-test probes ``bench/load.py`` needs.

Runs exactly ``vapi-gateway-assistant`` (:func:`gateway.tools.local_assistant.cli.main`,
same arguments, same process model: its CPU is not the gateway's), plus:

- **echo timing**: a binary frame that starts with the simulator's tag
  (:data:`gateway.tools.simulator.bench.TAG_MAGIC`) gets the wall-clock time it arrived
  written into bytes 12..20, and when the ``echo`` script sends it back, the time it
  left into bytes 20..28 -- so the simulator can take the assistant's own holding time
  (its echo delay) out of the round trip;
- its call sockets on the gateway's WebSocket fast path
  (:class:`gateway.websocket_fastpath.FastFrames`: less CPU per frame for the load
  generator, and Nagle off, as a real server would have it);
- **barge-in timing**: when a call's script sends ``user-interrupted``, a line
  ``INTERRUPT <twilioCallSid> <wall-clock ns>`` goes to stderr.

Run:  .venv/bin/python bench/load_assistant.py --port 0 --api-key env:VAPI_API_KEY ...
"""

from __future__ import annotations

import sys
import time
from typing import Any

from gateway.tools.local_assistant import cli, server
from gateway.tools.local_assistant.scripted_call import SendAudio, SendEvent
from gateway.tools.simulator.bench import TAG_MAGIC
from gateway.websocket_fastpath import FastFrames

_original_message = server.LocalAssistant._socket_message
_original_execute = server.LocalAssistant._execute


def _socket_message(self: Any, protocol: Any, payload: bytes, is_binary: bool) -> None:
    if is_binary and payload[:4] == TAG_MAGIC and len(payload) >= 28:
        payload = payload[:12] + time.time_ns().to_bytes(8, "big") + payload[20:]
    _original_message(self, protocol, payload, is_binary)


def _execute(self: Any, live: Any, output: Any) -> None:
    if type(output) is SendAudio:
        payload = output.payload
        if payload[:4] == TAG_MAGIC and len(payload) >= 28:
            output = SendAudio(output.connection,
                               payload[:20] + time.time_ns().to_bytes(8, "big") + payload[28:])
    elif type(output) is SendEvent and output.event.get("type") == "user-interrupted":
        variables = live.request.overrides.get("variableValues") or {}
        call_sid = variables.get("twilioCallSid", "?")
        sys.stderr.write(f"INTERRUPT {call_sid} {time.time_ns()}\n")
        sys.stderr.flush()
    _original_execute(self, live, output)


class _FastAssistantSocket(FastFrames, server.AssistantSocketProtocol):  # type: ignore[misc]
    """The assistant's call socket on the gateway's WebSocket fast path (cheaper per
    frame, so the load generator leaves more of the machine to the gateway; also turns
    Nagle off, as a real server would: see :func:`gateway.websocket_fastpath.no_delay`)."""


def main() -> int:
    server.AssistantSocketFactory.protocol = _FastAssistantSocket
    server.LocalAssistant._socket_message = _socket_message  # type: ignore[method-assign]
    server.LocalAssistant._execute = _execute  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
