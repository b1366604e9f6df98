"""``vapi-gateway-sim``: play Twilio against a running gateway and report what a caller
would have experienced.

Examples::

    vapi-gateway-sim --config etc/vapi-gateway.ini --url http://127.0.0.1:8080
    vapi-gateway-sim --public-url https://gw.example.com --auth-token env:TWILIO_AUTH_TOKEN \\
        --url http://127.0.0.1:8080 --audio caller.wav --record heard.wav \\
        --interrupt-at 6 --json
    vapi-gateway-sim --config gw.ini --calls 200 --stagger 0.05 --duration 30

Faults on Twilio's side (for fault-injection tests): ``--no-stream``,
``--stream-delay``, ``--status-callback before-stream|twice|never``,
``--status-callback-at`` (mid-stream, timing the socket's close from it), ``--mute-at``,
``--stop-without-close``, ``--stall-reading-at``/``--stall-reading-for`` (a slow
consumer), and ``--call-sid`` (with ``--calls 2 --stagger S``: a second stream for
the same call).

The gateway is described by its own ini file (``[gateway] public_url``, ``[twilio]``
``auth_token``, ``account_sid``, ``voice_path``, ``status_path``; secrets given as
``env:``/``file:``/``cred:`` are resolved as the daemon resolves them) or by flags,
which win over the file.  ``--url`` is where requests really go (default: the public
URL); ``--stream-url`` sends the media socket, and ``--status-url`` the call status
callback, to another base URL (e.g. another instance of a cluster); every URL is
signed as the public one.

Exit status: 0 when every call completed with no protocol violation, 1 otherwise,
2 for bad arguments or an unreadable config or clip.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec

from gateway.config import ConfigError, load_settings, resolve_secret
from gateway.tools import CLIPS_DIR, packaged_clip
from gateway.tools.simulator.bench import BenchProbe
from gateway.tools.simulator.call import (
    STATUS_CALLBACK_MODES,
    CallScenario,
    MediaClock,
    network_connector,
    run_calls,
)
from gateway.tools.simulator.playout import DEFAULT_UTTERANCE_GAP_MS
from gateway.tools.simulator.report import render_text, summarize, to_json
from gateway.tools.simulator.wav import CallerAudio, WavError
from gateway.tools.simulator.webhooks import DEFAULT_ACCOUNT_SID, GatewayTarget

__all__ = ["CLIPS_DIR", "RunPlan", "main", "parse_arguments", "plan_run"]

_BRIEF_ABOVE_CALLS: Final = 5
_HTTP_CONNECTIONS_PER_HOST: Final = 50


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, checked before the reactor starts."""

    target: GatewayTarget
    scenario: CallScenario
    calls: int = 1
    stagger_s: float = 0.0
    json: bool = False
    bench_probe: str | None = None
    """Write the load-test probes (:mod:`.bench`) to this file."""


def _seconds_to_ms(value: float | None) -> int | None:
    return None if value is None else round(value * 1000)


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` for the full list)."""
    parser = argparse.ArgumentParser(
        prog="vapi-gateway-sim",
        description="Play Twilio against a running vapi-gateway: a signed voice webhook, "
        "the media stream with a caller clip, Twilio's playout, the status callback; "
        "then report what the caller experienced.",
    )
    gateway = parser.add_argument_group("the gateway")
    gateway.add_argument("--url", default="", help="where requests go (default: the public "
                         "URL), e.g. http://127.0.0.1:8080")
    gateway.add_argument("--stream-url", default="", help="where the media socket goes "
                         "(default: --url), e.g. http://127.0.0.1:8081: the TwiML's wss:// "
                         "URL is rewritten onto it")
    gateway.add_argument("--status-url", default="", help="where the call status callback "
                         "is posted (default: --url)")
    gateway.add_argument("--config", help="the gateway's ini file: public_url, auth_token, "
                         "account_sid and the [twilio] paths")
    gateway.add_argument("--public-url", help="the gateway's public URL (what Twilio signs)")
    gateway.add_argument("--auth-token", help="Twilio Auth Token; env:NAME or file:PATH "
                         "keep it off the command line")
    gateway.add_argument("--account-sid", help="AccountSid to send (default: the ini's, "
                         f"else {DEFAULT_ACCOUNT_SID})")
    gateway.add_argument("--voice-path", help="voice webhook path (default /twilio/voice)")
    gateway.add_argument("--status-path", help="status callback path (default /twilio/status)")
    call = parser.add_argument_group("the call")
    call.add_argument("--from", dest="caller", default="+15550001111", help="caller number")
    call.add_argument("--to", dest="called", default="+15550002222", help="dialled number")
    call.add_argument("--audio", help="what the caller says: a mono WAV, 8 kHz mu-law or "
                      "16-bit PCM (default: the packaged caller clip); 'none' for silence")
    call.add_argument("--audio-at", type=float, default=0.0, metavar="SECONDS",
                      help="when the caller starts speaking (default 0)")
    call.add_argument("--duration", type=float, default=20.0, metavar="SECONDS",
                      help="the caller hangs up this long after the stream starts, unless "
                      "the gateway ends the call first (default 20)")
    call.add_argument("--hangup-after", type=float, metavar="SECONDS",
                      help="hang up earlier than --duration (stop, then the status callback)")
    call.add_argument("--drop", action="store_true",
                      help="end with an abrupt TCP close instead of stop")
    call.add_argument("--interrupt-at", type=float, metavar="SECONDS",
                      help="the caller cuts in at this time; barge-in is measured from it")
    call.add_argument("--interrupt-audio", help="what the caller says when cutting in "
                      "(default: the packaged interrupt clip)")
    call.add_argument("--record", help="write what the caller heard to this WAV file")
    call.add_argument("--record-format", choices=("mulaw", "pcm16"), default="mulaw",
                      help="8 kHz mu-law (default) or 16-bit PCM")
    call.add_argument("--utterance-gap-ms", type=int, default=DEFAULT_UTTERANCE_GAP_MS,
                      help="silence of at least this long separates two utterances; "
                      "shorter silence inside speech is a gap "
                      f"(default {DEFAULT_UTTERANCE_GAP_MS})")
    faults = parser.add_argument_group("faults on Twilio's side")
    faults.add_argument("--call-sid", help="use this CallSid (default: random); with --calls "
                        "N every call is a stream of the same phone call")
    faults.add_argument("--no-stream", action="store_true",
                        help="answer the voice webhook, never open the media stream")
    faults.add_argument("--stream-delay", type=float, default=0.0, metavar="SECONDS",
                        help="open the media stream this long after the TwiML (default 0)")
    faults.add_argument("--status-callback", choices=STATUS_CALLBACK_MODES, default="after",
                        help="post the terminal status callback after the call (default), "
                        "before the stream opens, twice, or never")
    faults.add_argument("--status-callback-at", type=float, metavar="SECONDS",
                        help="post the status callback this long after the stream starts, "
                        "while it is still up, instead of after the call (the report times "
                        "the socket's close from it)")
    faults.add_argument("--mute-at", type=float, metavar="SECONDS",
                        help="stop sending media at this time; the socket stays open")
    faults.add_argument("--stop-without-close", action="store_true",
                        help="after stop, leave the gateway's close frame unanswered and "
                        "never close the connection")
    faults.add_argument("--stall-reading-at", type=float, metavar="SECONDS",
                        help="a slow consumer: stop reading the socket at this time")
    faults.add_argument("--stall-reading-for", type=float, metavar="SECONDS",
                        help="... for this long (default: until the caller hangs up)")
    run = parser.add_argument_group("the run")
    run.add_argument("--calls", type=int, default=1, help="concurrent calls (default 1)")
    run.add_argument("--stagger", type=float, default=0.0, metavar="SECONDS",
                     help="delay between the starts of consecutive calls (default 0)")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--bench-probe", metavar="FILE",
                     help="load tests: tag the caller's frames, time their echoes, keep "
                     "every clear, and write those probes to FILE as JSON (see make bench)")
    return parser.parse_args(argv)


def _clip(path: str | None, default_name: str, *, required: bool) -> CallerAudio | None:
    if path is not None:
        return None if path.lower() == "none" else CallerAudio.from_wav(path)
    packaged = packaged_clip(default_name)
    if packaged.is_file():
        return CallerAudio.from_wav(packaged)
    if required:
        raise WavError(f"no clip given and no packaged clip at {packaged}")
    return None


def _target(args: argparse.Namespace, env: Mapping[str, str]) -> GatewayTarget:
    """The gateway as its ini file describes it (if given), with the flags over it."""
    configured = (GatewayTarget.from_settings(load_settings(args.config, env))
                  if args.config else None)
    auth_token = resolve_secret(args.auth_token, env)[0] if args.auth_token else ""
    public_url = args.public_url or (configured.public_url if configured else "") or args.url
    if not public_url:
        raise ValueError("give --config, --public-url or --url")
    auth_token = auth_token or (configured.auth_token if configured else "")
    if not auth_token:
        raise ValueError("no Auth Token: give --config or --auth-token")
    flags = {"voice_path": args.voice_path, "status_path": args.status_path,
             "account_sid": args.account_sid, "stream_url": args.stream_url,
             "status_callback_url": args.status_url}
    given = {name: value for name, value in flags.items() if value}
    if configured is None:
        return GatewayTarget(public_url=public_url, auth_token=auth_token, url=args.url, **given)
    return replace(configured, public_url=public_url, auth_token=auth_token, url=args.url,
                   **given)


def plan_run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RunPlan:
    """Check the arguments, read the config and the clips: :class:`ValueError`,
    :class:`~gateway.config.ConfigError` or :class:`WavError` when something is wrong."""
    target = _target(args, os.environ if environ is None else environ)
    if args.calls < 1:
        raise ValueError("--calls must be at least 1")
    if args.stagger < 0:
        raise ValueError("--stagger must not be negative")
    interrupting = args.interrupt_at is not None
    if args.interrupt_audio and not interrupting:
        raise ValueError("--interrupt-audio needs --interrupt-at")
    scenario = CallScenario(
        caller=args.caller,
        called=args.called,
        audio=_clip(args.audio, "caller", required=False),
        audio_at_ms=round(args.audio_at * 1000),
        duration_ms=round(args.duration * 1000),
        hangup_after_ms=_seconds_to_ms(args.hangup_after),
        interrupt_audio=_clip(args.interrupt_audio, "interrupt", required=False)
        if interrupting else None,
        interrupt_at_ms=_seconds_to_ms(args.interrupt_at),
        drop=args.drop,
        record_path=args.record,
        record_format=args.record_format,
        utterance_gap_ms=args.utterance_gap_ms,
        call_sid=args.call_sid,
        open_stream=not args.no_stream,
        stream_delay_ms=round(args.stream_delay * 1000),
        status_callback=args.status_callback,
        status_callback_at_ms=_seconds_to_ms(args.status_callback_at),
        mute_at_ms=_seconds_to_ms(args.mute_at),
        stop_without_close=args.stop_without_close,
        stall_reading_at_ms=_seconds_to_ms(args.stall_reading_at),
        stall_reading_ms=_seconds_to_ms(args.stall_reading_for),
    )
    return RunPlan(target, scenario, args.calls, args.stagger, args.json, args.bench_probe)


async def _run(reactor: Any, plan: RunPlan) -> None:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = _HTTP_CONNECTIONS_PER_HOST
    media_clock = MediaClock(reactor)
    if plan.bench_probe:
        media_clock.probe = BenchProbe()
    reports = await run_calls(
        plan.scenario, plan.target, clock=reactor, http=HTTPClient(Agent(reactor, pool=pool)),
        connect_socket=network_connector(reactor), calls=plan.calls, stagger_s=plan.stagger_s,
        media_clock=media_clock)
    await pool.closeCachedConnections()
    summary = summarize(reports, media_clock.max_tick_interval_ms)
    if plan.bench_probe and media_clock.probe is not None:
        with open(plan.bench_probe, "wb") as probe_file:
            probe_file.write(msgspec.json.encode(media_clock.probe.as_dict()))
    if plan.json:
        sys.stdout.write(to_json(reports, summary).decode("utf-8") + "\n")
    else:
        sys.stdout.write(render_text(reports, summary,
                                     brief=len(reports) > _BRIEF_ABOVE_CALLS) + "\n")
    sys.stdout.flush()
    if not all(report.ok for report in reports):
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, check, run the calls on the reactor, exit."""
    args = parse_arguments(argv)
    try:
        plan = plan_run(args)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 2
    except (ValueError, WavError) as error:
        print(f"vapi-gateway-sim: {error}", file=sys.stderr)
        return 2
    from twisted.internet.task import react

    react(_run, (plan,))


if __name__ == "__main__":
    sys.exit(main())
