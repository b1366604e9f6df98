"""``make bench``: the gateway's capacity under load, on loopback, bounded in time.

For each run (``SCENARIO:CALLS`` or ``SCENARIO:CALLSxWORKERS``) it starts, as separate
processes so that only the gateway's own CPU is counted as the gateway's:

- the **local assistant** (``bench/load_assistant.py``: the standalone
  ``vapi-gateway-assistant`` with two timing probes), one per worker, with no
  concurrency limit, as the gateway's Vapi (``[vapi] api_url = http://127.0.0.1:PORT``);
- the **gateway**: ``twistd -n vapi-gateway``, one daemon per worker.  The daemon has no
  multi-worker mode yet, so N workers are N daemons on N ports, each with its own
  assistant, and the simulated calls are split evenly between them (a call's webhook
  and its stream always reach the same daemon, as a sticky load balancer would);
- the **simulator** (``vapi-gateway-sim --bench-probe``), at most
  :data:`CALLS_PER_SIMULATOR` calls per process, playing Twilio.

Scenarios (what the assistant does; the dialled number selects the script):

``echo``
    continuous audio both ways: the assistant returns the caller's audio 210 ms later
    (half a frame off the 20 ms grid, so that echoed frames do not arrive exactly on
    the simulated Twilio's slot boundaries);
``speak``
    bursty assistant speech: clips said in turn, in bursts 2-5x faster than real time
    with jitter, 1 s between utterances; the caller talks all the while;
``interrupt``
    as ``speak``, and 1.5 s into the first utterance the caller barges in
    (``user-interrupted`` and a user ``speech-update``);
``stall``
    as ``speak``, and 1 s into the first utterance the assistant's audio pauses for 3 s.

Each run ramps its calls up over a few seconds, lets them warm up, then measures over a
steady window (``--window``, 20 s by default): every second it samples the CPU time
(``/proc/PID/stat`` utime+stime) and RSS of every process, and the gateway's active
calls (``/health``); at the window's edges it reads the gateway's reactor-lag histogram
(``/metrics``).  After the calls end it reads the simulators' reports and probes.

Figures per run (one table, and the same as JSON):

- **gateway CPU** in ms per call-second (all workers' CPU over the window / the window /
  the active calls), and in cores;
- **RSS**: the peak (summed over workers) and the growth per active call over the idle
  daemon;
- **reactor lag** p50/p99 over the window (the gateway's 100 ms probe; its histogram's
  buckets are 1, 2, 5, 10, 20, 50 ms..., so values are interpolated within a bucket);
- **gaps** heard by the simulated callers and **protocol violations** they saw; failed
  calls;
- **barge-in** (``interrupt``): the time from the assistant sending ``user-interrupted``
  to the simulated Twilio receiving ``clear`` (end to end: the assistant's socket, the
  gateway, the Twilio socket), and the assistant audio the caller heard after the
  interruption (whole 20 ms slots, the one playing at that instant included); the
  gateway's own reaction time (signal handled -> clear written, from its call
  summaries) is in the JSON;
- **echo latency** (``echo``): what the gateway added there and back, measured where
  Twilio's queue begins (so the playout lead is not in it), less the assistant's own
  echo delay (the assistant stamps each tagged frame when it receives and returns it);
  it still includes loopback TCP and the load generator's own reading;
- the **load generator's CPU**: simulators and assistants, in % of one core, and the
  simulators' worst media-clock tick interval (20 ms when they keep up: larger, and the
  gaps they report may be their own lateness).

Usage::

    .venv/bin/python bench/load.py                      # the default plan (about 5 min)
    .venv/bin/python bench/load.py --runs speak:200 --window 20 --out /tmp/speak.json
    .venv/bin/python bench/load.py --runs echo:50 --profile   # + py-spy, if installed

Machine notes: the load generator shares the machine with the gateway; on a 2-core
machine it is a large part of the load.  Loopback only; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.tools.daemon_process import DaemonProcess, config_with, free_port  # noqa: E402

CALLS_PER_SIMULATOR: Final = 100
"""At most this many calls per simulator process (each costs Autobahn time per frame)."""
WARM_UP_S: Final = 5.0
DEFAULT_RUNS: Final = "speak:200,echo:200,echo:250,interrupt:200,stall:200,speak:500x2"
ECHO_DELAY_MS: Final = 210
SCRIPTS: Final = {
    "echo": f"local:echo:{ECHO_DELAY_MS}",
    "speak": "local:speak:agent,caller,agent,caller,agent",
    "interrupt": "local:speak:agent,caller,agent+interrupt:1500",
    "stall": "local:speak:agent,caller,agent+stall:1000:3000",
}
NUMBERS: Final = {name: f"+1555017000{i}" for i, name in enumerate(SCRIPTS, start=1)}
FRAME_NS: Final = 20_000_000
CLOCK_TICK: Final = os.sysconf("SC_CLK_TCK")
_LAG_BUCKET: Final = re.compile(
    r'^vapi_gateway_reactor_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.M)
_VIOLATIONS: Final = re.compile(
    r'^vapi_gateway_protocol_violations_total\{kind="([^"]+)",leg="([^"]+)"\} ([0-9.e+]+)$',
    re.M)


# -- processes ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Assistant:
    """bench/load_assistant.py as a child process; collects its INTERRUPT lines."""

    def __init__(self, api_key: str) -> None:
        env = dict(os.environ, BENCH_VAPI_KEY=api_key)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "load_assistant.py"), "--port", "0",
             "--api-key", "env:BENCH_VAPI_KEY", "--script", "speak",
             "--set", "max_concurrent_calls=0", "--set", "silence_timeout_s=120",
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.interrupts: dict[str, int] = {}
        self.errors: list[str] = []
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the local assistant did not start: {self.url!r}")
        threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            if line.startswith("INTERRUPT "):
                _, call_sid, at_ns = line.split()
                self.interrupts.setdefault(call_sid, int(at_ns))
            elif len(self.errors) < 20:
                self.errors.append(line.rstrip()[:300])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Worker:
    """One gateway daemon and its assistant."""

    def __init__(self, index: int, workdir: Path, gateway_src: str | None = None) -> None:
        self.api_key = secrets.token_hex(16)
        self.assistant = Assistant(self.api_key)
        self.port = free_port()
        self.admin_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = config_with(None, {
            "gateway": {"listen": f"tcp:{self.port}:interface=127.0.0.1",
                        "public_url": self.base, "max_concurrent_calls": "2000",
                        "drain_timeout": "10"},
            "log": {"format": "json", "level": "info"},
            "admin": {"listen": f"tcp:{self.admin_port}:interface=127.0.0.1"},
            "twilio": {"auth_token": secrets.token_hex(16),
                       "stream_token_secret": secrets.token_hex(32)},
            "vapi": {"api_url": self.assistant.url, "api_key": self.api_key,
                     "webhook_auth": "none"},
            "assistant": {"id": "local:speak"},
            "routing": {number: SCRIPTS[name] for name, number in NUMBERS.items()},
        })
        env = dict(os.environ)
        if gateway_src:  # another checkout of the gateway (e.g. a baseline), same venv
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (gateway_src,
                                                              env.get("PYTHONPATH"))))
        self.daemon = DaemonProcess(config, env=env, workdir=str(workdir / f"worker{index}"))
        self.daemon.start()
        self.daemon.wait_ready(60)
        assert self.daemon.process is not None
        self.pid = self.daemon.process.pid

    def get(self, path: str, admin: bool = False) -> str:
        port = self.admin_port if admin else self.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            text: str = answer.read().decode("utf-8")
            return text

    def active_calls(self) -> int | None:
        try:
            return int(json.loads(self.get("/health"))["active_calls"])
        except (OSError, ValueError, KeyError):
            return None

    def metrics(self) -> str:
        try:
            return self.get("/metrics", admin=True)
        except OSError:
            return ""

    def stop(self) -> int | None:
        code: int | None
        try:
            code = self.daemon.terminate(40)
        except Exception:
            code = None
        self.assistant.stop()
        return code


# -- sampling -----------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    cpu: dict[str, float]
    rss: dict[str, int]
    active: int | None


@dataclass
class Sampler:
    """Every second: CPU and RSS of each process group, and the gateways' active calls."""

    groups: dict[str, list[int]]
    workers: list[Worker]
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def take(self) -> Sample:
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for name, pids in self.groups.items():
            cpu[name] = sum(cpu_seconds(pid) or 0.0 for pid in pids)
            rss[name] = sum(rss_kib(pid) or 0 for pid in pids)
        counts = [worker.active_calls() for worker in self.workers]
        active = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
        sample = Sample(time.monotonic(), cpu, rss, active)
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self._stop.wait(1.0):
            self.take()

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


# -- statistics ---------------------------------------------------------------------------


def nearest_rank(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def histogram_percentile(counts: dict[float, float], fraction: float) -> float | None:
    """A percentile of a 0.1 ms-bucket histogram ({bucket start ms: count})."""
    total = sum(counts.values())
    if not total:
        return None
    wanted = fraction * total
    seen = 0.0
    for start in sorted(counts):
        seen += counts[start]
        if seen >= wanted:
            return start
    return max(counts)


def lag_buckets(metrics: str) -> dict[float, float]:
    """The reactor-lag histogram's cumulative buckets {upper bound s: count}."""
    return {float(le): float(count) for le, count in _LAG_BUCKET.findall(metrics)}


def lag_percentile(before: dict[float, float], after: dict[float, float],
                   fraction: float) -> float | None:
    """A percentile (ms) of the lag observed between two scrapes, interpolated within
    the histogram's buckets (the +Inf bucket reports its lower bound)."""
    bounds = sorted(after)
    delta = [after[b] - before.get(b, 0.0) for b in bounds]
    total = delta[-1] if delta else 0.0
    if total <= 0:
        return None
    wanted = fraction * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, delta, strict=True):
        if cumulative >= wanted:
            if math.isinf(bound):
                return lower * 1000
            share = (wanted - below) / (cumulative - below) if cumulative > below else 1.0
            return (lower + (bound - lower) * share) * 1000
        lower, below = bound, cumulative
    return lower * 1000


def violations(metrics: str) -> dict[str, float]:
    return {f"{leg}:{kind}": float(n) for kind, leg, n in _VIOLATIONS.findall(metrics)}


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# -- one run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    scenario: str
    calls: int
    workers: int = 1

    @property
    def label(self) -> str:
        return f"{self.scenario}:{self.calls}" + (f"x{self.workers}" if self.workers > 1 else "")

    @classmethod
    def parse(cls, text: str) -> Run:
        match = re.fullmatch(r"(\w+):(\d+)(?:x(\d+))?", text.strip())
        if match is None or match.group(1) not in SCRIPTS:
            raise ValueError(f"bad run {text!r}: use SCENARIO:CALLS[xWORKERS], "
                             f"SCENARIO one of {', '.join(SCRIPTS)}")
        return cls(match.group(1), int(match.group(2)), int(match.group(3) or 1))


def run_once(run: Run, window_s: float, workdir: Path, profile: bool,
             gateway_src: str | None = None) -> dict[str, Any]:
    """Start everything, measure, stop everything; the run's figures."""
    workers: list[Worker] = []
    sims: list[tuple[subprocess.Popen[str], Path]] = []
    sampler: Sampler | None = None
    try:
        for index in range(run.workers):
            workers.append(Worker(index, workdir, gateway_src))
        time.sleep(1.0)
        idle_rss = sum(rss_kib(worker.pid) or 0 for worker in workers)
        per_worker = [run.calls // run.workers + (1 if i < run.calls % run.workers else 0)
                      for i in range(run.workers)]
        ramp_s = max(2.0, min(6.0, run.calls / 80))
        duration_s = ramp_s + WARM_UP_S + window_s + 1.5
        for worker, calls in zip(workers, per_worker, strict=True):
            count = max(1, math.ceil(calls / CALLS_PER_SIMULATOR))
            for part in range(count):
                n = calls // count + (1 if part < calls % count else 0)
                probe = workdir / f"probe-{worker.port}-{part}.json"
                command = [
                    sys.executable, "-m", "gateway.tools.simulator",
                    "--config", worker.daemon.config_path, "--url", worker.base,
                    "--to", NUMBERS[run.scenario], "--calls", str(n),
                    "--stagger", f"{ramp_s / n:.4f}", "--duration", f"{duration_s:.1f}",
                    "--json", "--bench-probe", str(probe)]
                sims.append((subprocess.Popen(command, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, cwd=ROOT),
                             probe))
        groups = {"gateway": [w.pid for w in workers],
                  "simulator": [p.pid for p, _ in sims],
                  "assistant": [w.assistant.process.pid for w in workers]}
        sampler = Sampler(groups, workers)
        started = time.monotonic()
        sampler.take()
        sampler.start()
        window_start = started + ramp_s + WARM_UP_S
        window_end = started + duration_s - 1.0
        time.sleep(max(0.0, window_start - time.monotonic()))
        lag_before = [lag_buckets(w.metrics()) for w in workers]
        spies = _start_profile(workers, window_end - time.monotonic() - 0.5, workdir) \
            if profile else []
        first = sampler.take()
        time.sleep(max(0.0, window_end - time.monotonic()))
        last = sampler.take()
        lag_after = [lag_buckets(w.metrics()) for w in workers]
        metrics_text = [w.metrics() for w in workers]
        for spy in spies:
            spy.wait(30)
        reports = []
        for sim, probe_path in sims:
            out, err = sim.communicate(timeout=duration_s + 90)
            try:
                reports.append((json.loads(out), _load(probe_path)))
            except ValueError:
                reports.append(({"error": err[-2000:]}, {}))
        sampler.stop()
        codes = [w.stop() for w in workers]
        interrupts: dict[str, int] = {}
        for worker in workers:
            interrupts.update(worker.assistant.interrupts)
        in_gateway_us = [us for w in workers for e in w.daemon.events()
                         if e.get("event") == "call ended"
                         for us in e.get("barge_in_reaction_us") or []]
        return _figures(run, window_s, idle_rss, first, last, sampler.samples,
                        lag_before, lag_after, metrics_text, reports, interrupts,
                        in_gateway_us, codes, workdir if profile else None)
    finally:
        if sampler is not None:
            sampler.stop()
        for sim, _ in sims:
            if sim.poll() is None:
                sim.kill()
                sim.wait()
        for worker in workers:
            worker.daemon.kill()
            worker.assistant.stop()


def _load(path: Path) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return loaded
    except (OSError, ValueError):
        return {}


PERF_EVENTS: Final = ("task-clock", "context-switches", "syscalls:sys_enter_sendto",
                      "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_epoll_wait",
                      "syscalls:sys_enter_epoll_ctl")


def _start_profile(workers: list[Worker], seconds: float, workdir: Path
                   ) -> list[subprocess.Popen[bytes]]:
    """py-spy (sampled Python stacks) and perf stat (syscalls), where installed."""
    started: list[subprocess.Popen[bytes]] = []
    if seconds < 2:
        return started
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    perf = shutil.which("perf")
    for w in workers:
        if Path(spy).exists():
            started.append(subprocess.Popen(
                [spy, "record", "-p", str(w.pid), "-d", str(int(seconds)), "-r", "250",
                 "-f", "raw", "--nonblocking", "-o", str(workdir / f"profile-{w.port}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if perf:
            started.append(subprocess.Popen(
                [perf, "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "-p", str(w.pid),
                 "-o", str(workdir / f"perf-{w.port}.csv"), "--", "sleep", f"{seconds:.1f}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if not started:
        print("  (neither py-spy nor perf: no profile)", flush=True)
    return started


def _perf_counts(workdir: Path, seconds: float) -> dict[str, float]:
    """perf stat's counts, per second, summed over workers."""
    counts: dict[str, float] = {}
    for path in workdir.glob("perf-*.csv"):
        for line in path.read_text(encoding="utf-8").splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0] and fields[0][0].isdigit():
                name = fields[2].removeprefix("syscalls:sys_enter_")
                counts[name] = counts.get(name, 0.0) + float(fields[0]) / seconds
    return {name: round(value, 1) for name, value in counts.items()}


def _merge(histograms: list[dict[str, int]], bucket_ms: float) -> dict[float, float]:
    merged: dict[float, float] = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            start = int(bucket) * bucket_ms
            merged[start] = merged.get(start, 0) + count
    return merged


def _figures(run: Run, window_s: float, idle_rss: int, first: Sample, last: Sample,
             samples: list[Sample], lag_before: list[dict[float, float]],
             lag_after: list[dict[float, float]], metrics_text: list[str],
             reports: list[tuple[dict[str, Any], dict[str, Any]]],
             interrupts: dict[str, int], in_gateway_us: list[float],
             exit_codes: list[int | None], profile_dir: Path | None) -> dict[str, Any]:
    elapsed = last.at - first.at
    in_window = [s for s in samples if first.at <= s.at <= last.at]
    actives = [s.active for s in in_window if s.active is not None]
    # /health may not answer within its timeout when the gateway is overloaded
    calls = sum(actives) / len(actives) if actives else float(run.calls)

    def cores(group: str) -> float:
        return (last.cpu[group] - first.cpu[group]) / elapsed if elapsed > 0 else 0.0

    gateway_cores = cores("gateway")
    window_rss = [s.rss["gateway"] for s in in_window] or [0]
    peak_rss = max(s.rss["gateway"] for s in samples) if samples else 0
    lag_p50 = [lag_percentile(b, a, 0.5) for b, a in zip(lag_before, lag_after, strict=True)]
    lag_p99 = [lag_percentile(b, a, 0.99) for b, a in zip(lag_before, lag_after, strict=True)]
    summaries = [r["summary"] for r, _ in reports if "summary" in r]
    call_reports = [c for r, _ in reports for c in r.get("calls", [])]
    probes = [p for _, p in reports if p]
    bucket_ms = probes[0]["bucket_ms"] if probes else 0.1
    round_trip = _merge([p.get("round_trip", {}) for p in probes], bucket_ms)
    uplink = _merge([p.get("uplink", {}) for p in probes], bucket_ms)
    downlink = _merge([p.get("downlink", {}) for p in probes], bucket_ms)
    held = _merge([p.get("held", {}) for p in probes], bucket_ms)
    reactions, after = _barge_ins(interrupts, [c for p in probes for c in p.get("clears", [])])
    gateway_violations: dict[str, float] = {}
    for text in metrics_text:
        for key, value in violations(text).items():
            gateway_violations[key] = gateway_violations.get(key, 0.0) + value
    figures: dict[str, Any] = {
        "run": run.label,
        "scenario": run.scenario,
        "script": SCRIPTS[run.scenario],
        "workers": run.workers,
        "calls_planned": run.calls,
        "calls": round(calls, 1),
        "calls_source": f"/health, {len(actives)} samples" if actives else "planned",
        "window_s": round(elapsed, 2),
        "gateway_cpu_ms_per_call_s": rounded(gateway_cores * 1000 / calls, 3) if calls else None,
        "gateway_cores": round(gateway_cores, 3),
        "gateway_peak_rss_mib": round(peak_rss / 1024, 1),
        "gateway_idle_rss_mib": round(idle_rss / 1024, 1),
        "gateway_rss_per_call_kib": rounded((sum(window_rss) / len(window_rss) - idle_rss)
                                            / calls, 1) if calls else None,
        "reactor_lag_p50_ms": rounded(max((v for v in lag_p50 if v is not None), default=None),
                                      2),
        "reactor_lag_p99_ms": rounded(max((v for v in lag_p99 if v is not None), default=None),
                                      2),
        "reactor_lag_per_worker_ms": [[rounded(a, 2), rounded(b, 2)]
                                      for a, b in zip(lag_p50, lag_p99, strict=True)],
        "gaps": sum(s["gaps"] for s in summaries),
        "gap_ms": sum(s["gap_ms"] for s in summaries),
        "calls_with_gaps": sum(1 for c in call_reports if c["speech"]["gaps"]),
        "violations": sum(s["violations"] for s in summaries),
        "violations_by_kind": _sum_dicts([s["violations_by_kind"] for s in summaries]),
        "twilio_leg_violations_seen_by_gateway": gateway_violations,
        "calls_completed": sum(s["completed"] for s in summaries),
        "calls_failed": sum(s["failed"] + s["refused"] for s in summaries),
        "failures": sorted({c["detail"][:120] for c in call_reports if not c["ok"]})[:5],
        "simulator_errors": [r["error"][-300:] for r, _ in reports if "error" in r],
        "barge_in_count": len(reactions),
        "barge_in_reaction_p50_ms": rounded(nearest_rank(reactions, 0.5), 2),
        "barge_in_reaction_p99_ms": rounded(nearest_rank(reactions, 0.99), 2),
        "barge_in_in_gateway_p50_us": rounded(nearest_rank(in_gateway_us, 0.5)),
        "barge_in_in_gateway_p99_us": rounded(nearest_rank(in_gateway_us, 0.99)),
        "audio_after_interrupt_p50_ms": rounded(nearest_rank(after, 0.5), 0),
        "audio_after_interrupt_p99_ms": rounded(nearest_rank(after, 0.99), 0),
        "echo_frames_timed": int(sum(round_trip.values())),
        "echo_added_p50_ms": rounded(histogram_percentile(round_trip, 0.5), 2),
        "echo_added_p99_ms": rounded(histogram_percentile(round_trip, 0.99), 2),
        "echo_uplink_p50_p99_ms": [rounded(histogram_percentile(uplink, 0.5), 2),
                                   rounded(histogram_percentile(uplink, 0.99), 2)],
        "echo_downlink_p50_p99_ms": [rounded(histogram_percentile(downlink, 0.5), 2),
                                     rounded(histogram_percentile(downlink, 0.99), 2)],
        "echo_assistant_late_p50_p99_ms": [
            rounded(_minus(histogram_percentile(held, 0.5), ECHO_DELAY_MS), 2),
            rounded(_minus(histogram_percentile(held, 0.99), ECHO_DELAY_MS), 2)],
        "simulator_cpu_pct": round(cores("simulator") * 100, 1),
        "simulator_processes": len(reports),
        "simulator_max_tick_ms": max((s["max_tick_interval_ms"] or 0 for s in summaries),
                                     default=None),
        "simulator_frames_skipped": sum(s["frames_skipped"] for s in summaries),
        "assistant_cpu_pct": round(cores("assistant") * 100, 1),
        "gateway_exit_codes": exit_codes,
    }
    if profile_dir is not None:
        figures["profiles"] = [str(p) for p in sorted(profile_dir.glob("profile-*.txt"))]
        figures["perf_per_second"] = _perf_counts(profile_dir, elapsed - 0.5)
    return figures


def _minus(value: float | None, amount: float) -> float | None:
    return None if value is None else value - amount


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return total


def _barge_ins(interrupts: dict[str, int], clears: list[dict[str, Any]]
               ) -> tuple[list[float], list[float]]:
    """(reaction ms, audio heard after the interruption ms) per interrupted call."""
    by_call: dict[str, list[dict[str, Any]]] = {}
    for clear in clears:
        by_call.setdefault(clear["call_sid"], []).append(clear)
    reactions: list[float] = []
    after: list[float] = []
    for call_sid, at_ns in interrupts.items():
        later = [c for c in by_call.get(call_sid, []) if c["at_ns"] >= at_ns]
        if not later:
            continue
        clear = min(later, key=lambda c: c["at_ns"])
        reactions.append((clear["at_ns"] - at_ns) / 1e6)
        slot = (at_ns - clear["t0_ns"]) // FRAME_NS
        after.append(20.0 * sum(1 for s in clear["audio_slots"] if s >= slot))
    return reactions, after


# -- the table ----------------------------------------------------------------------------

COLUMNS: Final = (
    ("run", "run", "{}"),
    ("calls", "calls", "{:.0f}"),
    ("CPU ms/call-s", "gateway_cpu_ms_per_call_s", "{:.2f}"),
    ("cores", "gateway_cores", "{:.2f}"),
    ("peak RSS MiB", "gateway_peak_rss_mib", "{:.0f}"),
    ("KiB/call", "gateway_rss_per_call_kib", "{:.0f}"),
    ("lag p50/p99 ms", ("reactor_lag_p50_ms", "reactor_lag_p99_ms"), "{:.1f}"),
    ("gaps", "gaps", "{}"),
    ("barge p50/p99 ms", ("barge_in_reaction_p50_ms", "barge_in_reaction_p99_ms"), "{:.1f}"),
    ("heard after p50/p99", ("audio_after_interrupt_p50_ms", "audio_after_interrupt_p99_ms"),
     "{:.0f}"),
    ("echo added p50/p99 ms", ("echo_added_p50_ms", "echo_added_p99_ms"), "{:.1f}"),
    ("viol", "violations", "{}"),
    ("failed", "calls_failed", "{}"),
    ("sim CPU %", "simulator_cpu_pct", "{:.0f}"),
    ("asst CPU %", "assistant_cpu_pct", "{:.0f}"),
    ("sim tick max", "simulator_max_tick_ms", "{:.0f}"),
)


def _cell(row: dict[str, Any], key: str | tuple[str, ...], fmt: str) -> str:
    if isinstance(key, tuple):
        return "/".join(_cell(row, k, fmt) for k in key)
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    header = [title for title, _, _ in COLUMNS]
    cells = [[_cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help=f"comma-separated SCENARIO:CALLS[xWORKERS] (default {DEFAULT_RUNS})")
    parser.add_argument("--window", type=float, default=20.0, metavar="SECONDS",
                        help="steady-state measuring window of each run (default 20)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "capacity.json"),
                        help="the JSON file (default bench/results/capacity.json)")
    parser.add_argument("--profile", action="store_true",
                        help="record a py-spy profile of the gateway in each window")
    parser.add_argument("--gateway-src", metavar="DIR",
                        help="run the daemons from this source tree instead (PYTHONPATH; "
                        "e.g. a `git archive` of a baseline), with this venv")
    args = parser.parse_args(argv)
    # clean up the children on SIGTERM/SIGINT too (a background shell ignores SIGINT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        runs = [Run.parse(text) for text in args.runs.split(",") if text.strip()]
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vapi-gateway-bench-"))
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    print(f"make bench: {len(runs)} runs, {args.window:g} s windows; CPU {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.2f}; work files in {workdir}", flush=True)
    for run in runs:
        print(f"- {run.label} ...", end=" ", flush=True)
        rows.append(run_once(run, args.window, workdir / run.label.replace(":", "-"),
                             args.profile, args.gateway_src))
        row = rows[-1]
        print(f"{row['calls']:.0f} calls, {row['gateway_cpu_ms_per_call_s']} ms/call-s, "
              f"{row['gaps']} gaps, {row['violations']} violations", flush=True)
        document = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "gateway_src": args.gateway_src or str(ROOT),
                    "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg(), "runs": rows}
        out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print()
    print(table(rows))
    print(f"\n{out} ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
