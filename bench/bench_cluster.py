"""``make bench-cluster``: what clustering over Redis costs, on loopback.

Two measurements, each against a real ``redis-server``
(:class:`~gateway.tools.redis_process.RedisProcess`: a free loopback port, persistence
off, stopped at the end) and real ``twistd -n vapi-gateway`` daemons:

**Cross-instance end of call.**  Two daemons, A and B (``[cluster] backend =
redis://…``, the production defaults otherwise; each with its own local assistant).
``--calls`` calls (100 by default, ``--concurrency`` of them at once) run entirely on B;
one second into each, the simulator posts Twilio's terminal status callback to **A**
(``vapi-gateway-sim --url B --status-url A --status-callback-at 1``).  A does not hold
the call: it looks its owner up in Redis and publishes ``end-call`` on B's channel; B
ends both legs and closes the media socket.  Measured by the simulator on one clock:
from sending the POST to seeing B's close (``status_callback_to_close_ms``).  The same
run with the status callback posted to B itself (the owner: no Redis, no bus) is the
baseline, so the difference is what the cluster adds.  B's own figure for the bus hop
(``end-call from the control bus``'s ``bus_latency_ms``: A's publish to B's handling,
both on this host's clock) is reported too.

**CPU of registry upkeep.**  One daemon with ``--cpu-calls`` concurrent calls (50 by
default; the assistant is a separate process, as in ``make bench``, so the daemon's
CPU is the gateway's alone), measured over a steady ``--window`` (20 s) once every call
is up: the daemon's utime+stime from ``/proc/PID/stat``, and Redis's.  Variants:
``memory`` (no cluster), ``redis`` (``refresh_interval = 2``, the default: each live
call's record is rewritten every 2 s, plus the liveness key and a PING per
connection every second) and ``redis-0.1s`` (``refresh_interval = 0.1``: twenty times
the upkeep, to measure what the default's is too small to show above the noise).  Variants
alternate over ``--rounds`` rounds; figures are ms of CPU per call-second (CPU over
the window / window / calls), the round-to-round spread of ``memory`` is the noise
floor, and the upkeep per call-second is derived from the ``redis-0.1s`` slope.

Results: one table on stdout, and ``bench/results/cluster.json`` (``--out``).

Usage::

    .venv/bin/python bench/bench_cluster.py                     # about 4 minutes
    .venv/bin/python bench/bench_cluster.py --calls 20 --rounds 1 --window 10   # quick

Machine notes: the simulator, the assistant and Redis share the machine with the
gateway; on a 2-core machine the load generator is a large part of the load, and other
work on the machine moves the CPU figures (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.cluster.resp import ReplyReader, encode_command  # noqa: E402
from gateway.tools.daemon_process import DaemonProcess, config_with, free_port  # noqa: E402
from gateway.tools.redis_process import RedisProcess  # noqa: E402
from gateway.tools.simulator.report import percentile  # noqa: E402

PUBLIC: Final = "https://gateway.bench.test"
NUMBER: Final = "+15550400001"
LATENCY_SCRIPT: Final = "local:speak"
CPU_SCRIPT: Final = "local:speak:agent,caller,agent,caller,agent"
STATUS_AT_S: Final = 1.0
CLOCK_TICK: Final = os.sysconf("SC_CLK_TCK")
VARIANTS: Final[dict[str, dict[str, str] | None]] = {
    "memory": None,
    "redis": {"refresh_interval": "2", "call_ttl": "10"},
    "redis-0.1s": {"refresh_interval": "0.1", "call_ttl": "1"},
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def distribution(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    return {"count": len(values), "p50": round(percentile(values, 0.5), 2),
            "p99": round(percentile(values, 0.99), 2), "max": round(max(values), 2),
            "min": round(min(values), 2)}


def poll(check: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    """Re-check ``check`` until it is truthy (its value); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(step)
    return value


# -- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    auth_token: str
    stream_secret: str
    api_key: str


class Gateway:
    """One daemon (local assistant inside, or an external one at ``api_url``)."""

    def __init__(self, name: str, workdir: Path, keys: Secrets, *, api_url: str = "local",
                 script: str, cluster: dict[str, str] | None) -> None:
        self.name = name
        self.port = free_port()
        self.admin_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        sections: dict[str, dict[str, str]] = {
            "gateway": {"listen": f"tcp:{self.port}:interface=127.0.0.1", "public_url": PUBLIC,
                        "max_concurrent_calls": "1000", "drain_timeout": "10",
                        "drain_grace": "0"},
            "log": {"format": "json", "level": "info"},
            "admin": {"listen": f"tcp:{self.admin_port}:interface=127.0.0.1"},
            "twilio": {"auth_token": keys.auth_token, "stream_token_secret": keys.stream_secret},
            "vapi": {"api_url": api_url, "api_key": keys.api_key, "webhook_auth": "none"},
            "assistant": {"id": script},
            "routing": {NUMBER: script},
        }
        if cluster is not None:
            sections["cluster"] = {"instance_id": name, **cluster}
        self.daemon = DaemonProcess(config_with(None, sections),
                                    workdir=str(workdir / name))
        self.daemon.start()

    @property
    def pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid

    def active_calls(self) -> int:
        url = f"{self.base}/health"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(json.loads(answer.read())["active_calls"])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.events() if e.get("event") == name]

    def stop(self) -> int:
        return self.daemon.terminate(40)


class Assistant:
    """``bench/load_assistant.py`` (the standalone local assistant) as a child."""

    def __init__(self, api_key: str) -> None:
        env = dict(os.environ, BENCH_VAPI_KEY=api_key)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "load_assistant.py"), "--port", "0",
             "--api-key", "env:BENCH_VAPI_KEY", "--script", "speak",
             "--set", "max_concurrent_calls=0", "--set", "silence_timeout_s=120",
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the local assistant did not start: {self.url!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def simulate(config: str, url: str, calls: int, stagger_s: float, duration_s: float,
             *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.tools.simulator", "--config", config, "--url", url,
         "--to", NUMBER, "--calls", str(calls), "--stagger", f"{stagger_s:.4f}",
         "--duration", f"{duration_s:g}", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def reports_of(process: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    out, err = process.communicate(timeout=timeout)
    try:
        calls: list[dict[str, Any]] = json.loads(out)["calls"]
    except (ValueError, KeyError):
        raise RuntimeError(f"the simulator failed: {err[-2000:]}") from None
    return calls


def redis_keys(redis: RedisProcess, pattern: str) -> list[str]:
    """``KEYS pattern`` on a connection of our own."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as conn:
        conn.sendall(encode_command(["KEYS", pattern]))
        reader = ReplyReader()
        while not (replies := reader.feed(conn.recv(65536))):
            pass
    return sorted(key.decode() for key in replies[0])


# -- cross-instance end of call ---------------------------------------------------------------


def latency(redis: RedisProcess, workdir: Path, calls: int, concurrency: int) -> dict[str, Any]:
    keys = Secrets(secrets.token_hex(16), secrets.token_hex(32), secrets.token_hex(16))
    prefix = f"bench{secrets.token_hex(3)}:"
    cluster = {"backend": redis.url, "key_prefix": prefix}
    a = Gateway("a", workdir, keys, script=LATENCY_SCRIPT, cluster=cluster)
    b = Gateway("b", workdir, keys, script=LATENCY_SCRIPT, cluster=cluster)
    try:
        for gateway in (a, b):
            gateway.daemon.wait_ready(60)
            gateway.daemon.wait_for("redis available: re-syncing the registry", 20)
        stagger = STATUS_AT_S / concurrency
        figures: dict[str, Any] = {}
        for label, status_to in (("cross_instance", a), ("same_instance", b)):
            started = time.monotonic()
            sim = simulate(a.daemon.config_path, b.base, calls, stagger, 10,
                           "--status-url", status_to.base,
                           "--status-callback-at", f"{STATUS_AT_S:g}")
            reports = reports_of(sim, calls * stagger + 120)
            to_close = [r["end"]["status_callback_to_close_ms"] for r in reports
                        if r["end"]["status_callback_to_close_ms"] is not None]
            figures[label] = {
                "status_to": status_to.name, "calls": len(reports),
                "ok": sum(bool(r["ok"]) for r in reports),
                "closed_by_status_callback": len(to_close),
                "status_callback_to_close_ms": distribution(to_close),
                "wall_s": round(time.monotonic() - started, 1)}
        bus = [e["bus_latency_ms"] for e in b.events("end-call from the control bus")
               if e.get("bus_latency_ms") is not None]
        figures["bus_latency_ms"] = distribution(bus)
        ended = b.events("call ended")
        figures["b_call_ends"] = {cause: sum(e["cause"] == cause for e in ended)
                                  for cause in sorted({e["cause"] for e in ended})}
        poll(lambda: b.active_calls() == 0, 30, "B idle")
        poll(lambda: redis_keys(redis, f"{prefix}call:*") == [], 15, "the registry empty")
        vapi_created = len(b.events("local assistant call created"))
        vapi_ended = len(b.events("local assistant call ended"))
        figures["vapi_calls"] = {"created": vapi_created, "ended": vapi_ended}
        figures["exit_codes"] = [a.stop(), b.stop()]
        # what the cluster left in Redis (its ended:<CallSid> markers live on by design)
        figures["left_in_redis"] = {kind: redis_keys(redis, f"{prefix}{kind}:*")
                                    for kind in ("call", "vapi", "instance")}
        return figures
    finally:
        for gateway in (a, b):
            gateway.daemon.kill()


# -- the CPU of registry upkeep ---------------------------------------------------------------


def cpu_run(redis: RedisProcess, workdir: Path, variant: str, calls: int,
            window_s: float) -> dict[str, Any]:
    keys = Secrets(secrets.token_hex(16), secrets.token_hex(32), secrets.token_hex(16))
    assistant = Assistant(keys.api_key)
    settings = VARIANTS[variant]
    cluster = None if settings is None else {
        "backend": redis.url, "key_prefix": f"cpu{secrets.token_hex(3)}:", **settings}
    gateway = Gateway(f"cpu-{variant}", workdir, keys, api_url=assistant.url,
                      script=CPU_SCRIPT, cluster=cluster)
    sim: subprocess.Popen[str] | None = None
    try:
        gateway.daemon.wait_ready(60)
        ramp_s = max(2.0, calls / 25)
        duration_s = ramp_s + 3 + window_s + 12
        sim = simulate(gateway.daemon.config_path, gateway.base, calls, ramp_s / calls,
                       duration_s)
        poll(lambda: gateway.active_calls() == calls, ramp_s + 20, "every call up")
        poll(lambda: sum(e.get("new") == "open" for e in gateway.events("vapi link state"))
             >= calls, 20, "every Vapi socket open")
        if gateway.events("call ended"):
            raise RuntimeError(f"{variant}: a call ended before the window")
        assert redis.pid is not None
        pids = {"gateway": gateway.pid, "redis": redis.pid,
                "simulator": sim.pid, "assistant": assistant.process.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        threading.Event().wait(window_s)  # the measurement window itself
        elapsed = time.monotonic() - t0
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        active = gateway.active_calls()
        reports = reports_of(sim, duration_s + 60)
        code = gateway.stop()
        call_seconds = elapsed * min(calls, active)
        used = {name: after[name] - before[name] for name in pids}
        return {
            "variant": variant, "calls": calls, "active_at_end": active,
            "window_s": round(elapsed, 2),
            "gateway_cpu_ms_per_call_s": round(used["gateway"] * 1000 / call_seconds, 4),
            "gateway_cores": round(used["gateway"] / elapsed, 4),
            "redis_cpu_ms_per_call_s": round(used["redis"] * 1000 / call_seconds, 4),
            "redis_cores": round(used["redis"] / elapsed, 4),
            "simulator_cores": round(used["simulator"] / elapsed, 3),
            "assistant_cores": round(used["assistant"] / elapsed, 3),
            "ok": sum(bool(r["ok"]) for r in reports), "gaps": sum(
                r["speech"]["gaps"] for r in reports),
            "exit_code": code,
        }
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait()
        gateway.daemon.kill()
        assistant.stop()


def cpu(redis: RedisProcess, workdir: Path, calls: int, window_s: float,
        rounds: int) -> dict[str, Any]:
    runs = [cpu_run(redis, workdir, variant, calls, window_s)
            for _ in range(rounds) for variant in VARIANTS]
    by_variant: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        gw = [r["gateway_cpu_ms_per_call_s"] for r in mine]
        rd = [r["redis_cpu_ms_per_call_s"] for r in mine]
        by_variant[variant] = {
            "gateway_cpu_ms_per_call_s": round(sum(gw) / len(gw), 4),
            "gateway_spread": round(max(gw) - min(gw), 4),
            "redis_cpu_ms_per_call_s": round(sum(rd) / len(rd), 4)}
    memory = by_variant["memory"]["gateway_cpu_ms_per_call_s"]
    refresh = {v: float(s["refresh_interval"]) for v, s in VARIANTS.items() if s}
    for variant, interval in refresh.items():
        figures = by_variant[variant]
        figures["added_gateway_ms_per_call_s"] = round(
            figures["gateway_cpu_ms_per_call_s"] - memory, 4)
        figures["refresh_interval_s"] = interval
    fast = min(refresh, key=lambda v: refresh[v])
    # upkeep scales with refreshes per second: the fast variant's excess, per refresh of
    # one call's record, then at the default interval
    per_refresh_ms = (by_variant[fast]["added_gateway_ms_per_call_s"] * refresh[fast])
    per_refresh_redis_ms = ((by_variant[fast]["redis_cpu_ms_per_call_s"]
                             - by_variant["memory"]["redis_cpu_ms_per_call_s"])
                            * refresh[fast])
    default = VARIANTS["redis"]
    assert default is not None
    interval = float(default["refresh_interval"])
    derived = {
        "from_variant": fast,
        "gateway_ms_per_record_refresh": round(per_refresh_ms, 4),
        "redis_ms_per_record_refresh": round(per_refresh_redis_ms, 4),
        "gateway_ms_per_call_s_at_default_refresh": round(per_refresh_ms / interval, 4),
        "redis_ms_per_call_s_at_default_refresh": round(per_refresh_redis_ms / interval, 4),
        "noise_floor_ms_per_call_s": by_variant["memory"]["gateway_spread"],
    }
    return {"runs": runs, "by_variant": by_variant, "derived": derived}


# -- the table --------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    lines = []
    lat = result.get("latency")
    if lat:
        lines.append("end of call by status callback (POST sent -> media socket closed):")
        for label in ("cross_instance", "same_instance"):
            f = lat[label]
            d = f["status_callback_to_close_ms"]
            lines.append(f"  {label:15} to {f['status_to']}: {d.get('count')} calls  p50 "
                         f"{d.get('p50')} ms  p99 {d.get('p99')} ms  max {d.get('max')} ms  "
                         f"(ok {f['ok']}/{f['calls']})")
        bus = lat["bus_latency_ms"]
        lines.append(f"  bus hop (A publish -> B handles): p50 {bus.get('p50')} ms  "
                     f"p99 {bus.get('p99')} ms  max {bus.get('max')} ms")
    cpu_figures = result.get("cpu")
    if cpu_figures:
        lines.append("CPU per call-second (ms), steady window:")
        for variant, f in cpu_figures["by_variant"].items():
            added = f.get("added_gateway_ms_per_call_s")
            lines.append(f"  {variant:11} gateway {f['gateway_cpu_ms_per_call_s']:.4f} "
                         f"(spread {f['gateway_spread']:.4f})"
                         + (f"  added {added:+.4f}" if added is not None else "")
                         + f"  redis {f['redis_cpu_ms_per_call_s']:.4f}")
        d = cpu_figures["derived"]
        lines.append(f"  registry upkeep at the default refresh (from {d['from_variant']}): "
                     f"gateway {d['gateway_ms_per_call_s_at_default_refresh']:.4f} + redis "
                     f"{d['redis_ms_per_call_s_at_default_refresh']:.4f} ms per call-second "
                     f"(noise floor {d['noise_floor_ms_per_call_s']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls timed (default 100)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="of them at once, about (default 4)")
    parser.add_argument("--cpu-calls", type=int, default=50,
                        help="concurrent calls of the CPU runs (default 50)")
    parser.add_argument("--window", type=float, default=20.0,
                        help="seconds of each CPU run's measurement (default 20)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of the CPU variants (default 2)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
        "cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
        "arguments": {k: v for k, v in vars(args).items() if k != "out"}}
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    with RedisProcess() as redis:
        result["redis"] = {"version_line": next(
            (line for line in redis.lines if "version" in line.lower()), "")[:200]}
        if not args.skip_latency:
            result["latency"] = latency(redis, workdir, args.calls, args.concurrency)
        if not args.skip_cpu:
            result["cpu"] = cpu(redis, workdir, args.cpu_calls, args.window, args.rounds)
    result["load_average_at_end"] = list(os.getloadavg())
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
