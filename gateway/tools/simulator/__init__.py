"""The call simulator: plays Twilio against a running gateway (``vapi-gateway-sim``).

It is what ``make demo`` and the end-to-end tests call with, what an operator uses to
rehearse a call before going live, and the load generator (``--calls N``).  It posts
the signed voice webhook, reads the TwiML, opens the media socket with a signed
upgrade, streams a caller clip on an absolute 20 ms clock, plays the gateway's audio
exactly as Twilio's playout would (queue, marks, ``clear``), records what the caller
heard, hangs up and posts the status callback, then reports time to first audio,
gaps in the assistant's speech, barge-in reaction and every protocol violation.

Modules, from the wire up:

- :mod:`.webhooks`: the gateway's URLs, ``X-Twilio-Signature``, Twilio's form fields;
- :mod:`.twiml_reader`: the voice webhook's TwiML answer;
- :mod:`.uplink`: the frames Twilio sends and the absolute send clock (sans-io);
- :mod:`.playout`: Twilio's playout queue and what the caller hears (sans-io);
- :mod:`.downlink`: the gateway's frames, checked as Twilio checks them (sans-io);
- :mod:`.call`: one call on the reactor (treq, Autobahn) and the shared media clock;
- :mod:`.report`: per-call reports, the run summary, text and JSON;
- :mod:`.wav`: caller clips in, recordings out;
- :mod:`.cli`: the ``vapi-gateway-sim`` command (:func:`main`).
"""

from gateway.tools.simulator.call import (
    CallScenario,
    MediaClock,
    SimulatedCall,
    SocketAddress,
    network_connector,
    run_calls,
)
from gateway.tools.simulator.cli import main
from gateway.tools.simulator.report import CallReport, RunSummary, render_text, summarize, to_json
from gateway.tools.simulator.wav import CallerAudio
from gateway.tools.simulator.webhooks import GatewayTarget

__all__ = [
    "CallReport",
    "CallScenario",
    "CallerAudio",
    "GatewayTarget",
    "MediaClock",
    "RunSummary",
    "SimulatedCall",
    "SocketAddress",
    "main",
    "network_connector",
    "render_text",
    "run_calls",
    "summarize",
    "to_json",
]
