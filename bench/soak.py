"""Leak soak: thousands of short calls through the real daemon, its resources measured
before and after.

The real ``twistd -n vapi-gateway`` runs on loopback with the local assistant inside it
(``[vapi] api_url = local``; ``[local_assistant] max_concurrent_calls = 0``, a short
utterance said at once, and no ended calls kept, so the stand-in's own bookkeeping does
not count as the gateway's memory).  The call simulator runs in this process, on its own
reactor, and plays Twilio for every call: signed voice webhook, media stream, ``stop``,
status callback.  Phases:

1. **baseline**, right after ``ready``;
2. **warm-up**: ``--warmup`` calls, ``--concurrency`` at a time (pools, caches and
   allocator arenas reach their working size);
3. **sequential**: ``--sequential`` calls, one at a time;
4. **concurrent**: ``--concurrent`` calls, ``--concurrency`` at a time.

After each phase the simulator closes its HTTP connections and the script waits until
the daemon's registry is empty and its descriptor and delayed-call counts have settled
(each idle keep-alive connection to Vapi -- here the in-process local assistant, so
both sides -- holds one timeout), then samples: RSS
and peak RSS (``/proc/PID/status`` VmRSS, VmHWM), threads, open file descriptors
(``/proc/PID/fd``), ``/health`` ``active_calls`` (the registry), and ``/metrics``
(calls started and ended by cause, Vapi call-creation failures, reactor lag, and the
reactor's pending delayed calls, ``vapi_gateway_reactor_delayed_calls``: timers left
behind by ended calls would show as growth).  It also drains and exits 0 on SIGTERM at
the end, promptly, and every Vapi call it created must be ended by ``end-call`` (the
local assistant's log).

Targets (``verdicts`` in the output): no call failed and no protocol violation (a
call in which the caller hung up before hearing the assistant is counted apart: that
is latency, and it rises on a busy host -- the assistant must be heard in
``--min-heard`` % of calls); the fd count (within ``--max-fd-growth``), the reactor's
delayed calls (within ``--max-timer-growth``) and the registry back to the warm-up
baseline; RSS growth after warm-up under ``--max-rss-growth``
(5 %); every call ended in the metrics; no error log line, no traceback, nothing but
JSON on the daemon's stdout; every Vapi call ended by ``end-call``; SIGTERM exits 0.
Exit status 0 when all hold, 1 otherwise.  Per phase it also prints calls/s, first
audio p50/p99, the daemon's CPU per call and its reactor lag, this process's CPU (the
simulator; near 100 % it is the bottleneck) and the host's load average.

Run::

    .venv/bin/python bench/soak.py --json soak.json         # 5,000 calls (~8 min)
    .venv/bin/python bench/soak.py --warmup 80 --sequential 20 --concurrent 100 \\
        --concurrency 20 --max-rss-growth 10 --json soak.json   # the CI-sized run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from gateway.tools import packaged_clip
from gateway.tools.daemon_process import config_with, free_port, twistd_path
from gateway.tools.simulator.call import (
    CallScenario,
    MediaClock,
    SimulatedCall,
    network_connector,
)
from gateway.tools.simulator.report import CallReport, percentile
from gateway.tools.simulator.wav import CallerAudio
from gateway.tools.simulator.webhooks import GatewayTarget

DIALLED = "+15550300001"
SETTLE_TIMEOUT_S = 30.0
SETTLE_STABLE_S = 1.5
"""The fd and delayed-call counts must stay put this long before a sample is taken (more
than the 1 s that Autobahn's close timers of a just-closed WebSocket may still run)."""


@dataclass
class Sample:
    """The daemon's resources at one point."""

    label: str
    calls_so_far: int
    rss_kb: int
    peak_rss_kb: int
    threads: int
    fds: int
    cpu_s: float
    """The daemon's CPU time so far (user + system, /proc/PID/stat)."""
    fd_kinds: dict[str, int]
    """The descriptors by kind: socket, pipe, anon_inode, file."""
    active_calls: int
    calls_started: float
    calls_ended: dict[str, float]
    vapi_create_failures: float
    reactor_lag_probes: float
    reactor_lag_sum_s: float
    reactor_lag_probes_over_50ms: float
    reactor_delayed_calls: float
    """The reactor's pending delayed calls (timers) when sampled."""


@dataclass
class Phase:
    """One batch of calls."""

    name: str
    calls: int
    concurrency: int
    seconds: float = 0.0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    first_audio_p50_ms: float | None = None
    first_audio_p99_ms: float | None = None
    daemon_cpu_ms_per_call: float = 0.0
    daemon_cpu_percent: float = 0.0
    """The daemon's CPU time over the phase's wall time (100: one core busy)."""
    reactor_lag_mean_ms: float = 0.0
    reactor_lag_over_50ms_percent: float = 0.0
    """Of the daemon's 100 ms reactor-lag probes during the phase."""
    simulator_cpu_percent: float = 0.0
    """This process's CPU over the phase (100: one core busy -- the simulator is then
    the bottleneck, and the latency figures are partly its own)."""
    load_average: float = 0.0
    """The host's 1-minute load average at the end of the phase (other work counts)."""
    heard: int = 0
    """Calls in which the caller heard the assistant before hanging up."""

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=500, help="warm-up calls (500)")
    parser.add_argument("--sequential", type=int, default=250,
                        help="calls one at a time (250)")
    parser.add_argument("--concurrent", type=int, default=4250,
                        help="calls CONCURRENCY at a time (4250)")
    parser.add_argument("--concurrency", type=int, default=50, help="calls at once (50)")
    parser.add_argument("--duration", type=float, default=1.0,
                        help="seconds each call streams before the caller hangs up (1.0)")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, metavar="PERCENT",
                        help="RSS growth allowed after the warm-up (5)")
    parser.add_argument("--max-fd-growth", type=int, default=2,
                        help="descriptors allowed above the warm-up count (2: the daemon's "
                        "idle keep-alive connections to Vapi -- here the in-process local "
                        "assistant, so client and server side -- vary by one or two)")
    parser.add_argument("--max-timer-growth", type=int, default=2,
                        help="reactor delayed calls allowed above the warm-up count (2: "
                        "like the fds, an idle keep-alive connection holds a timeout)")
    parser.add_argument("--min-heard", type=float, default=90.0, metavar="PERCENT",
                        help="calls in which the assistant must be heard before the caller "
                        "hangs up (90; a latency figure: it drops on a busy host)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--workdir", help="where the daemon's config goes (default: a temp dir)")
    args = parser.parse_args(argv)
    if min(args.warmup, args.sequential, args.concurrent) < 0 or args.concurrency < 1:
        parser.error("call counts must not be negative; --concurrency at least 1")
    return args


# --- the daemon ---------------------------------------------------------------------------


def _config(port: int, admin_port: int, concurrency: int) -> tuple[str, str]:
    """The soak's ini text, and its Twilio auth token (random secrets, made per run)."""
    auth_token = secrets.token_hex(16)
    text = config_with(None, {
        "gateway": {"listen": f"tcp:{port}:interface=127.0.0.1",
                    "public_url": f"http://127.0.0.1:{port}",
                    "max_concurrent_calls": str(max(100, concurrency * 2)),
                    "drain_timeout": "10", "drain_grace": "0"},
        "log": {"format": "json", "level": "info"},
        "admin": {"listen": f"tcp:{admin_port}:interface=127.0.0.1"},
        "twilio": {"auth_token": auth_token, "stream_token_secret": secrets.token_hex(32)},
        "vapi": {"api_url": "local", "api_key": secrets.token_hex(16),
                 "webhook_auth": "none"},
        "assistant": {"id": "local:speak"},
        "local_assistant": {"max_concurrent_calls": "0", "first_message_delay_ms": "0",
                            "utterances": "interrupt", "keep_ended_calls": "0",
                            "max_recorded_audio_bytes": "0"},
    })
    return text, auth_token


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _metrics(admin_port: int) -> dict[str, float]:
    """The daemon's /metrics as ``name{labels}`` -> value (comments dropped)."""
    values: dict[str, float] = {}
    for line in _get(f"http://127.0.0.1:{admin_port}/metrics").decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _proc_status(pid: int) -> dict[str, int]:
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            status[key] = int(value.split()[0])
    return status


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_kinds(pid: int) -> dict[str, int]:
    kinds: Counter[str] = Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return dict(sorted(kinds.items()))


def _sample(label: str, calls_so_far: int, pid: int, port: int, admin_port: int) -> Sample:
    status = _proc_status(pid)
    health = json.loads(_get(f"http://127.0.0.1:{port}/health"))
    metrics = _metrics(admin_port)
    prefix = 'vapi_gateway_calls_ended_total{cause="'
    ended = {name[len(prefix):-2]: value for name, value in metrics.items()
             if name.startswith(prefix)}
    failures = sum(value for name, value in metrics.items()
                   if name.startswith("vapi_gateway_vapi_call_create_failures_total"))
    lag_count = metrics.get("vapi_gateway_reactor_lag_seconds_count", 0.0)
    lag_fast = metrics.get('vapi_gateway_reactor_lag_seconds_bucket{le="0.05"}', lag_count)
    return Sample(
        label=label, calls_so_far=calls_so_far, rss_kb=status["VmRSS"],
        peak_rss_kb=status["VmHWM"], threads=status["Threads"], fds=_fds(pid),
        cpu_s=round(_cpu_seconds(pid), 2),
        fd_kinds=_fd_kinds(pid),
        active_calls=int(health["active_calls"]),
        calls_started=metrics.get("vapi_gateway_calls_started_total", 0.0),
        calls_ended=ended, vapi_create_failures=failures,
        reactor_lag_probes=lag_count,
        reactor_lag_sum_s=metrics.get("vapi_gateway_reactor_lag_seconds_sum", 0.0),
        reactor_lag_probes_over_50ms=lag_count - lag_fast,
        reactor_delayed_calls=metrics.get("vapi_gateway_reactor_delayed_calls", -1.0))


# --- the calls ------------------------------------------------------------------------------


class Caller:
    """The simulated Twilio side of every call of the run."""

    def __init__(self, reactor: Any, target: GatewayTarget, duration_s: float,
                 concurrency: int) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self._reactor = reactor
        self._target = target
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        self._http = HTTPClient(Agent(reactor, pool=self._pool))
        self._connect = network_connector(reactor)
        self._media_clock = MediaClock(reactor)
        self._scenario = CallScenario(
            called=DIALLED, audio=CallerAudio.from_wav(packaged_clip("caller")),
            duration_ms=round(duration_s * 1000))

    def call(self) -> Deferred[CallReport]:
        return SimulatedCall(self._scenario, self._target, clock=self._reactor,
                             http=self._http, connect_socket=self._connect,
                             media_clock=self._media_clock).run()

    async def phase(self, phase: Phase) -> None:
        """Run the phase's calls, ``phase.concurrency`` at a time; fill in its figures."""
        started = time.monotonic()
        limit = DeferredSemaphore(phase.concurrency)
        reports: list[CallReport] = await gatherResults(
            [limit.run(self.call) for _ in range(phase.calls)])
        phase.seconds = round(time.monotonic() - started, 2)
        phase.ok = sum(1 for report in reports if report.ok)
        phase.heard = sum(1 for report in reports if report.timing.first_audio_ms is not None)
        phase.failures = dict(Counter(f"{r.outcome}: {r.detail}" for r in reports
                                      if not r.ok).most_common(5))
        first = [r.timing.first_audio_ms for r in reports if r.timing.first_audio_ms is not None]
        if first:
            phase.first_audio_p50_ms = percentile(first, 0.5)
            phase.first_audio_p99_ms = percentile(first, 0.99)

    async def hang_up_http(self) -> None:
        """Close the simulator's idle HTTP connections (they are fds in the daemon too)."""
        await self._pool.closeCachedConnections()


class Daemon:
    """``twistd -n vapi-gateway`` with its JSON log going to a file (a pipe read by a
    thread of this busy process could fill and block the daemon's writes)."""

    def __init__(self, workdir: str, config_text: str, port: int) -> None:
        self.config_path = Path(workdir) / "gateway.ini"
        self.config_path.write_text(config_text, encoding="utf-8")
        self.log_path = Path(workdir) / "daemon.log"
        self.port = port
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [twistd_path(), "-n", "--pidfile=", "vapi-gateway", "--config",
             str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log_path.read_text()}")
            try:
                _get(f"http://127.0.0.1:{self.port}/health")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        raise TimeoutError(f"the daemon was not ready within {timeout} s")

    def stop(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM; the exit code and how long it took."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, round(time.monotonic() - sent, 2)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for line in self.lines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                events.append(value)
        return events


async def _settled(reactor: Any, pid: int, port: int, admin_port: int) -> None:
    """Wait until the registry is empty and the daemon's fd count and pending delayed
    calls have stopped moving."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last, since = (-1, -1.0), time.monotonic()
    while time.monotonic() < deadline:
        health = json.loads(_get(f"http://127.0.0.1:{port}/health"))
        now = (_fds(pid), _metrics(admin_port).get("vapi_gateway_reactor_delayed_calls", -1.0))
        if now != last or health["active_calls"]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE_STABLE_S:
            return
        await task.deferLater(reactor, 0.1, lambda: None)


# --- the run --------------------------------------------------------------------------------


def _log_findings(daemon: Daemon) -> dict[str, Any]:
    events = daemon.events()
    lines = daemon.lines()
    created = sum(1 for e in events if e.get("event") == "local assistant call created")
    ended = [e for e in events if e.get("event") == "local assistant call ended"]
    return {
        "log_lines": len(lines),
        "not_json_lines": len([line for line in lines if line.strip()]) - len(events),
        "tracebacks": sum(1 for line in lines if "Traceback" in line),
        "errors": dict(Counter(str(e.get("event")) for e in events
                               if e.get("level") in ("error", "critical"))),
        "vapi_calls_created": created,
        "vapi_calls_ended": len(ended),
        "vapi_ended_reasons": dict(Counter(str(e.get("ended_reason")) for e in ended)),
        "vapi_ended_without_end_call": sum(1 for e in ended if not e.get("end_call_received")),
    }


async def soak(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    port, admin_port = free_port(), free_port()
    text, auth_token = _config(port, admin_port, args.concurrency)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vapi-gateway-soak-")
    os.makedirs(workdir, exist_ok=True)
    daemon = Daemon(workdir, text, port)
    daemon.wait_ready()
    pid = daemon.process.pid
    base = f"http://127.0.0.1:{port}"
    caller = Caller(reactor, GatewayTarget(public_url=base, auth_token=auth_token, url=base),
                    args.duration, args.concurrency)
    phases = [Phase("warm-up", args.warmup, args.concurrency),
              Phase("sequential", args.sequential, 1),
              Phase("concurrent", args.concurrent, args.concurrency)]
    samples = [_sample("baseline", 0, pid, port, admin_port)]
    done = 0
    try:
        for phase in phases:
            print(f"soak: {phase.name}: {phase.calls} calls, {phase.concurrency} at a time",
                  file=sys.stderr, flush=True)
            cpu_before, own_before = _cpu_seconds(pid), _own_cpu_seconds()
            before = _sample("", 0, pid, port, admin_port)
            await caller.phase(phase)
            cpu = _cpu_seconds(pid) - cpu_before
            _phase_figures(phase, cpu, before, _sample("", 0, pid, port, admin_port))
            if phase.seconds:
                phase.simulator_cpu_percent = round(
                    100 * (_own_cpu_seconds() - own_before) / phase.seconds, 1)
            phase.load_average = round(os.getloadavg()[0], 2)
            done += phase.calls
            await caller.hang_up_http()
            await _settled(reactor, pid, port, admin_port)
            samples.append(_sample(f"after {phase.name}", done, pid, port, admin_port))
        exit_code, exit_s = daemon.stop()
    finally:
        daemon.kill()
    results = _results(args, phases, samples, exit_code, exit_s, _log_findings(daemon))
    results["daemon_log"] = str(daemon.log_path)
    return results


def _phase_figures(phase: Phase, cpu_s: float, before: Sample, after: Sample) -> None:
    """The daemon's CPU and reactor lag over one phase."""
    if phase.calls and phase.seconds:
        phase.daemon_cpu_ms_per_call = round(1000 * cpu_s / phase.calls, 2)
        phase.daemon_cpu_percent = round(100 * cpu_s / phase.seconds, 1)
    probes = after.reactor_lag_probes - before.reactor_lag_probes
    if probes:
        lag = after.reactor_lag_sum_s - before.reactor_lag_sum_s
        slow = after.reactor_lag_probes_over_50ms - before.reactor_lag_probes_over_50ms
        phase.reactor_lag_mean_ms = round(1000 * lag / probes, 2)
        phase.reactor_lag_over_50ms_percent = round(100 * slow / probes, 2)


def _results(args: argparse.Namespace, phases: list[Phase], samples: list[Sample],
             exit_code: int, exit_s: float, logs: dict[str, Any]) -> dict[str, Any]:
    warm = samples[1] if args.warmup else samples[0]
    final = samples[-1]
    calls = sum(phase.calls for phase in phases)
    rss_growth = 100.0 * (final.rss_kb - warm.rss_kb) / warm.rss_kb
    heard = sum(phase.heard for phase in phases)
    failed_otherwise = sum(
        count for phase in phases for failure, count in phase.failures.items()
        if "the assistant never spoke" not in failure)
    verdicts = {
        "no call failed (but for hearing the assistant late), no violation":
            failed_otherwise == 0,
        f"the assistant heard in at least {args.min_heard:g} % of calls":
            100.0 * heard / max(1, calls) >= args.min_heard,
        "registry empty": final.active_calls == 0,
        "fds back to the warm-up count": final.fds - warm.fds <= args.max_fd_growth,
        "reactor delayed calls back to the warm-up count":
            final.reactor_delayed_calls - warm.reactor_delayed_calls <= args.max_timer_growth,
        f"RSS growth after warm-up under {args.max_rss_growth:g} %":
            rss_growth < args.max_rss_growth,
        "every call the daemon started has ended (metrics)":
            final.calls_started == sum(final.calls_ended.values()),
        "no traceback or error line": not logs["tracebacks"] and not logs["errors"]
        and not logs["not_json_lines"],
        "every Vapi call ended by end-call": logs["vapi_calls_created"]
        == logs["vapi_calls_ended"] and not logs["vapi_ended_without_end_call"],
        "SIGTERM: exit 0": exit_code == 0,
    }
    return {
        "settings": {key: getattr(args, key) for key in
                     ("warmup", "sequential", "concurrent", "concurrency", "duration")},
        "phases": [dict(asdict(phase), calls_per_second=round(phase.calls_per_second, 1))
                   for phase in phases],
        "samples": [asdict(sample) for sample in samples],
        "heard_percent": round(100.0 * heard / max(1, calls), 2),
        "rss_growth_after_warmup_percent": round(rss_growth, 2),
        "fd_growth_after_warmup": final.fds - warm.fds,
        "delayed_call_growth_after_warmup":
            final.reactor_delayed_calls - warm.reactor_delayed_calls,
        "sigterm": {"exit_code": exit_code, "seconds": exit_s},
        "logs": logs,
        "verdicts": verdicts,
        "ok": all(verdicts.values()),
    }


def render(results: dict[str, Any]) -> str:
    """The results as a readable table."""
    lines = ["", "phase          calls  at once  seconds  calls/s  ok     heard  first audio "
                 "p50/p99  daemon CPU ms/call  CPU %  lag mean ms  lag>50ms %  sim CPU %  load"]
    for phase in results["phases"]:
        first = (f"{phase['first_audio_p50_ms']:.0f}/{phase['first_audio_p99_ms']:.0f} ms"
                 if phase["first_audio_p50_ms"] is not None else "-")
        lines.append(f"{phase['name']:<14} {phase['calls']:>5}  {phase['concurrency']:>7}  "
                     f"{phase['seconds']:>7.1f}  {phase['calls_per_second']:>7.1f}  "
                     f"{phase['ok']:>5}  {phase['heard']:>5}  {first:<19}  "
                     f"{phase['daemon_cpu_ms_per_call']:>18.1f}  "
                     f"{phase['daemon_cpu_percent']:>5.0f}  {phase['reactor_lag_mean_ms']:>11.1f}  "
                     f"{phase['reactor_lag_over_50ms_percent']:>10.1f}  "
                     f"{phase['simulator_cpu_percent']:>9.0f}  {phase['load_average']:>4.1f}")
        for failure, count in phase["failures"].items():
            lines.append(f"               {count} x {failure}")
    lines += ["", "sample              calls  RSS MB  peak MB  threads  fds  registry  timers  "
                  "CPU s  fds by kind"]
    for s in results["samples"]:
        kinds = " ".join(f"{kind} {count}" for kind, count in s["fd_kinds"].items())
        lines.append(f"{s['label']:<19} {s['calls_so_far']:>5}  {s['rss_kb'] / 1024:>6.1f}  "
                     f"{s['peak_rss_kb'] / 1024:>7.1f}  {s['threads']:>7}  {s['fds']:>3}  "
                     f"{s['active_calls']:>8}  {s['reactor_delayed_calls']:>6.0f}  "
                     f"{s['cpu_s']:>5.1f}  {kinds}")
    final = results["samples"][-1]
    logs = results["logs"]
    lines += [
        "",
        f"RSS growth after warm-up: {results['rss_growth_after_warmup_percent']:+.2f} %; "
        f"fds after warm-up: {results['fd_growth_after_warmup']:+d}; reactor delayed calls "
        f"after warm-up: {results['delayed_call_growth_after_warmup']:+.0f} (baseline "
        f"{results['samples'][0]['reactor_delayed_calls']:.0f}, final "
        f"{final['reactor_delayed_calls']:.0f})",
        f"calls ended by cause: {final['calls_ended']}; Vapi create failures: "
        f"{final['vapi_create_failures']:.0f}",
        f"Vapi calls: {logs['vapi_calls_created']} created, {logs['vapi_calls_ended']} ended "
        f"{logs['vapi_ended_reasons']}; errors {logs['errors'] or 'none'}; tracebacks "
        f"{logs['tracebacks']}; {logs['log_lines']} log lines ({results['daemon_log']})",
        f"SIGTERM: exit {results['sigterm']['exit_code']} after "
        f"{results['sigterm']['seconds']} s",
        "",
    ]
    for verdict, held in results["verdicts"].items():
        lines.append(f"  [{'ok' if held else 'FAIL'}] {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    outcome: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        outcome.update(await soak(reactor, args))

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    print(render(outcome))
    if args.json:
        Path(args.json).write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")
    return 0 if outcome.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
