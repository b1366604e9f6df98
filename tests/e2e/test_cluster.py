"""The cluster end to end: two real ``twistd -n vapi-gateway`` daemons sharing a real
``redis-server`` (``[cluster] backend = redis://…``), driven by the call simulator.

One Redis (:class:`~gateway.tools.redis_process.RedisProcess`: a free loopback port,
persistence off) serves the whole module and is stopped after it; each test uses keys of
its own (``[cluster] key_prefix``).  Each daemon embeds its own local assistant
(``[vapi] api_url = local``); a Vapi call handed over from A to B keeps its socket URL,
which points at A's assistant, and B joins it over loopback.  Both daemons have the same
``public_url`` and Auth Token, so a request signed for one verifies on the other; the
simulator sends the webhook, the media socket (``--stream-url``) and the status callback
(``--status-url``) to whichever instance a scenario names.

Each test checks, like ``test_faults.py``:

- **what the caller heard** (the simulator's report): the assistant's speech played with
  no gap and no protocol violation;
- **what was left behind** (:func:`left_behind`): no traceback and no unexplained error
  in either daemon's log, every Vapi call the daemons created ended (``local assistant
  call ended`` with an ``end-call``), no ``call:``/``vapi:`` record left in Redis and an
  empty ``cluster_calls`` in ``GET /calls``, each surviving daemon idle and exiting 0 on
  SIGTERM.

Tests synchronise on log lines, process exits and the simulator finishing; conditions
that nothing logs (a record expiring in Redis) are polled with a deadline.  Never
sleeps.  ``refresh_interval = 0.5`` and ``call_ttl = 2`` keep the whole file well
under a minute.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import known_secrets
import pytest
from daemon_requests import metric_sample, signed_status_callback
from ini import minimal_ini
from redis_server import require_redis_server

from gateway.cluster.resp import ReplyReader, encode_command
from gateway.tools.daemon_process import DaemonProcess, free_port, listening_socket
from gateway.tools.redis_process import RedisProcess

pytestmark = pytest.mark.e2e

PUBLIC = "https://gateway.example.test"
"""Every instance's ``public_url``: what Twilio (the simulator) signs over."""
SPEAK = "+15550300001"
"""Routed to the local assistant's ``speak``: one 10.9 s utterance, no pause in it."""
SLOW_CREATE = "+15550300002"
"""``speak``, but POST /call answers after ``create_delay_ms`` (the call exists at once)."""
REFRESH_S = 0.5
CALL_TTL_S = 2.0
PROMPT_EXIT_S = 5.0
T = TypeVar("T")

#: A status callback or admin hang-up on A ends B's call within this long (the bus).
CROSS_INSTANCE_END_BOUND_MS = 1000.0
#: The member's warning when Redis goes, and its line when Redis returns.
REDIS_DOWN = ("redis unavailable: calls in progress continue; new calls are handled by "
              "this instance alone until it returns")
REDIS_BACK = "redis available: re-syncing the registry"


# -- Redis, directly ------------------------------------------------------------------------


def redis_command(redis: RedisProcess, *args: str) -> Any:
    """One command on a fresh connection (the test's own view of Redis)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as conn:
        conn.sendall(encode_command(args))
        reader = ReplyReader()
        while True:
            data = conn.recv(65536)
            assert data, "redis closed the connection"
            replies = reader.feed(data)
            if replies:
                return replies[0]


def until(check: Callable[[], T | None], timeout: float, what: str,
          step: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout``.

    For conditions no process announces (a key expiring in Redis, an admin listing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)  # the poll's period: the condition is re-checked, never assumed


# -- one instance -----------------------------------------------------------------------------


class Instance:
    """One daemon of the cluster (its public port, admin port and log)."""

    def __init__(self, name: str, redis: RedisProcess, prefix: str, workdir: Path, *,
                 shared: socket.socket | None = None, worker: int | None = None,
                 **sections: dict[str, str]) -> None:
        self.name = name
        if shared is None:
            self.port = free_port()
            listen = f"tcp:{self.port}:interface=127.0.0.1"
        else:
            self.port = int(shared.getsockname()[1])
            listen = "systemd:domain=INET:index=0"
        # worker N's admin port is the configured one plus N (gateway.daemon.worker_endpoint);
        # the real one is read from the daemon's "listening" line once it is up
        self.admin_port = free_port() - (worker or 0)
        self.base = f"http://127.0.0.1:{self.port}"
        merged: dict[str, dict[str, str]] = {
            "gateway": {"listen": listen, "public_url": PUBLIC, "drain_timeout": "5",
                        "drain_grace": "0"},
            "log": {"format": "json", "level": "info"},
            "admin": {"listen": f"tcp:{self.admin_port}:interface=127.0.0.1",
                      "token": known_secrets.ADMIN_TOKEN},
            "vapi": {"api_url": "local", "api_key": known_secrets.VAPI_API_KEY,
                     "reconnect_delay": "0.2", "request_timeout": "1",
                     "request_retries": "1"},
            "routing": {SPEAK: "local:speak", SLOW_CREATE: "local:fail-create:late*1+speak"},
            "local_assistant": {"first_message_delay_ms": "100", "utterance_gap_ms": "200"},
            "cluster": {"backend": redis.url, "instance_id": name, "key_prefix": prefix,
                        "refresh_interval": str(REFRESH_S), "call_ttl": str(CALL_TTL_S),
                        "command_timeout": "0.25", "connect_timeout": "1",
                        "takeover_timeout": "1"},
        }
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
        workdir.mkdir(parents=True, exist_ok=True)
        self.daemon = DaemonProcess(
            minimal_ini(**merged), workdir=str(workdir), listen_socket=shared,
            extra_args=("--worker", str(worker)) if worker is not None else ())
        self.killed = False

    def __repr__(self) -> str:
        return f"<Instance {self.name} {self.base}>"

    # -- the log ------------------------------------------------------------------------

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.daemon.events() if e.get("event") == name
                and all(e.get(key) == value for key, value in fields.items())]

    def wait_event(self, name: str, timeout: float = 20.0, count: int = 1,
                   **fields: Any) -> dict[str, Any]:
        """Block until the daemon has logged ``name`` (with ``fields``) ``count`` times;
        the last such line."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(name, **fields)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: {len(found)} of {count} {name!r} lines "
                                   f"with {fields}")
            with contextlib.suppress(TimeoutError):
                self.daemon.wait_for(name, min(remaining, 1.0))
        return found[-1]

    # -- HTTP -----------------------------------------------------------------------------

    def _request(self, url: str, method: str = "GET", token: bool = True,
                 data: bytes | None = None, headers: dict[str, str] | None = None
                 ) -> tuple[int, bytes]:
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        if token:
            request.add_header("Authorization", f"Bearer {known_secrets.ADMIN_TOKEN}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return error.code, bytes(error.read())

    def admin(self, path: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
        status, body = self._request(f"http://127.0.0.1:{self.admin_port}{path}", method)
        return status, json.loads(body)

    def calls(self) -> dict[str, Any]:
        """``GET /calls`` (the local calls, and ``cluster_calls`` from Redis)."""
        status, body = self.admin("/calls")
        assert status == 200, body
        return body

    def cluster_sids(self) -> dict[str, str] | None:
        """CallSid -> owner of every call in the cluster registry (None: unavailable)."""
        body = self.calls()
        if body.get("cluster") != "available":
            return None
        return {c["call_sid"]: c["owner"] for c in body["cluster_calls"]}

    def idle(self) -> bool:
        return self.active_calls() == 0

    def active_calls(self) -> int:
        status, body = self._request(self.base + "/health", token=False)
        assert status == 200, body
        return int(json.loads(body)["active_calls"])

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        status, body = self._request(f"http://127.0.0.1:{self.admin_port}/metrics")
        assert status == 200
        return metric_sample(body, name, **labels)

    def post_call_status(self, call_sid: str, status: str) -> int:
        """A signed Twilio call status callback, posted to this instance."""
        body, headers = signed_status_callback(PUBLIC + "/twilio/status", call_sid, status)
        code, _ = self._request(self.base + "/twilio/status", "POST", token=False,
                                data=body, headers=headers)
        return code


# -- the cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The module's Redis and this test's instances (keys under their own prefix)."""

    redis: RedisProcess
    prefix: str
    workdir: Path
    instances: list[Instance] = field(default_factory=list)

    def start(self, *names: str, shared: socket.socket | None = None,
              **sections: dict[str, str]) -> list[Instance]:
        """Start instances (in parallel) and wait until each is ready and in Redis."""
        started = [Instance(name, self.redis, self.prefix, self.workdir / name,
                            shared=shared, worker=index if shared is not None else None,
                            **sections) for index, name in enumerate(names)]
        self.instances.extend(started)
        for instance in started:
            instance.daemon.start()
        for instance in started:
            instance.daemon.wait_ready()
            admin = instance.wait_event("listening", listener="admin")
            instance.admin_port = int(admin["address"].rsplit(":", 1)[1])
            instance.wait_event("redis connected", connection="bus")
            instance.wait_event(REDIS_BACK)  # the first connection writes the liveness key
        return started

    def simulate(self, webhook: Instance, *args: str, stream: Instance | None = None,
                 status: Instance | None = None, to: str = SPEAK) -> list[str]:
        """The simulator's command: the webhook to ``webhook``, the media socket to
        ``stream`` and the status callback to ``status`` (default: the webhook's)."""
        command = [sys.executable, "-m", "gateway.tools.simulator", "--config",
                   webhook.daemon.config_path, "--url", webhook.base, "--to", to, "--json"]
        if stream is not None:
            command += ["--stream-url", stream.base]
        if status is not None:
            command += ["--status-url", status.base]
        return [*command, *args]

    def call(self, webhook: Instance, *args: str, stream: Instance | None = None,
             status: Instance | None = None, to: str = SPEAK,
             timeout: float = 60) -> dict[str, Any]:
        """One simulated call, to completion: its report."""
        out = subprocess.run(self.simulate(webhook, *args, stream=stream, status=status,
                                           to=to),
                             capture_output=True, text=True, timeout=timeout)
        return report_of(out.stdout, out.stderr, out.returncode)

    def start_call(self, webhook: Instance, *args: str, stream: Instance | None = None,
                   status: Instance | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.simulate(webhook, *args, stream=stream, status=status),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def keys(self, kind: str) -> list[str]:
        """This test's keys of one kind in Redis (``call``, ``vapi``, ``ended``, …)."""
        found = redis_command(self.redis, "KEYS", f"{self.prefix}{kind}:*")
        return sorted(key.decode() for key in found)


def report_of(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """The single call of a simulator run, with no protocol violation."""
    assert stdout, stderr
    document = json.loads(stdout)
    (call,) = document["calls"]
    call["exit_code"] = returncode
    assert call["violations"]["total"] == 0, call["violations"]
    return call  # type: ignore[no-any-return]


def finished(process: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    return report_of(out, err, process.returncode)


def heard_cleanly(call: dict[str, Any], min_played_ms: int) -> None:
    """The assistant was heard, with no gap: ``speak`` is one unbroken 10.9 s utterance."""
    speech = call["speech"]
    assert speech["played_ms"] >= min_played_ms, speech
    assert (speech["gaps"], speech["gap_ms"]) == (0, 0), speech["gap_samples"]
    assert call["frames"]["skipped"] == 0


_prefixes = iter(range(1_000_000))


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    require_redis_server()
    with RedisProcess() as server:
        yield server


@pytest.fixture
def cluster(redis: RedisProcess, tmp_path: Path, log_capture_path: Path) -> Iterator[Cluster]:
    if redis.paused:
        redis.resume()
    if not redis.running:
        redis.start()
    pool = Cluster(redis, f"e2e{next(_prefixes)}:", tmp_path)
    try:
        yield pool
    finally:
        with log_capture_path.open("a", encoding="utf-8") as capture:
            for instance in pool.instances:
                instance.daemon.kill()
                capture.write("\n".join(instance.daemon.lines) + "\n")


# -- what is left behind --------------------------------------------------------------------


@dataclass
class LeftBehind:
    vapi_created: list[str]
    vapi_ended: list[dict[str, Any]]
    exit_s: dict[str, float]


def left_behind(cluster: Cluster, *, allowed_errors: frozenset[str] = frozenset()
                ) -> LeftBehind:
    """Check what the test left behind (see the module docstring); stops every daemon
    still running.  A killed instance's own Vapi calls died with its local assistant."""
    alive = [i for i in cluster.instances if not i.killed]
    for instance in alive:
        until(instance.idle, 10, f"{instance.name} idle")
        assert instance.metric("vapi_gateway_calls_active") == 0
    if alive:
        until(lambda: alive[0].cluster_sids() == {}, CALL_TTL_S + 3,
              "an empty cluster registry in GET /calls")
    until(lambda: cluster.keys("call") == [] and cluster.keys("vapi") == [], CALL_TTL_S + 3,
          "no call: or vapi: record left in redis")
    exits: dict[str, float] = {}
    for instance in alive:
        sent = time.monotonic()
        code = instance.daemon.terminate(30)
        exits[instance.name] = round(time.monotonic() - sent, 2)
        assert code == 0, f"{instance.name} exited {code}"
        assert exits[instance.name] < PROMPT_EXIT_S, exits
        lines = [line for line in instance.daemon.lines if line.strip()]
        events = instance.daemon.events()
        assert len(events) == len(lines), f"{instance.name}: a line that is not JSON"
        assert not [line for line in lines if "Traceback" in line], instance.name
        errors = {str(e.get("event")) for e in events
                  if e.get("level") in ("error", "critical")}
        assert errors <= allowed_errors, (instance.name, errors)
        assert instance.events("stopped")
    created = [e["vapi_call_id"] for i in alive
               for e in i.events("local assistant call created")]
    ended = [e for i in alive for e in i.events("local assistant call ended")]
    assert sorted(e["vapi_call_id"] for e in ended) == sorted(created), (
        "a Vapi call the gateway created was not ended")
    for vapi in ended:
        assert vapi["ended_reason"] != "local-assistant-stopped", vapi
        assert vapi["end_call_received"], vapi
    assert cluster.keys("instance") == [], "a liveness key outlived its daemon"
    return LeftBehind(created, ended, exits)


def show(scenario: str, call: dict[str, Any] | None, **extra: Any) -> None:
    """One line per scenario (run with -s for the table)."""
    heard = None if call is None else {
        "outcome": call["outcome"], "ended_by": call["end"]["ended_by"],
        "played_ms": call["speech"]["played_ms"], "gaps": call["speech"]["gaps"]}
    print("CLUSTER " + json.dumps({"scenario": scenario, "heard": heard, **extra},
                                  default=str))


# -- a call whose webhook and stream reach different instances --------------------------------


def test_webhook_on_a_stream_on_b_hands_the_vapi_call_over(cluster: Cluster) -> None:
    a, b = cluster.start("a", "b")
    call = cluster.call(a, "--duration", "3", stream=b)
    assert call["ok"], call["detail"]
    assert call["end"]["ended_by"] == "caller"
    heard_cleanly(call, 2000)
    settled = b.wait_event("takeover settled")
    assert (settled["outcome"], settled["handed_over"]) == ("handed-over", True), settled
    handed = a.wait_event("call ended", call_sid=call["call_sid"])
    assert handed["cause"] == "handed-over"
    on_b = b.wait_event("call ended", call_sid=call["call_sid"])
    assert on_b["cause"] == "twilio-stop"
    assert b.metric("vapi_gateway_cluster_takeovers_total", outcome="handed-over") == 1
    left = left_behind(cluster)
    assert len(left.vapi_created) == 1, "a second Vapi call was created for one phone call"
    (vapi,) = left.vapi_ended
    assert vapi["vapi_call_id"] == on_b["vapi_call_id"]
    # A names the Vapi call it handed over
    assert handed["vapi_call_id"] == vapi["vapi_call_id"]
    show("webhook on A, stream on B", call, vapi_calls=len(left.vapi_created))


def test_a_takeover_while_the_vapi_call_is_being_created_waits_for_it(
        cluster: Cluster) -> None:
    """A's POST /call is answered after 0.5 s, so B's takeover always arrives while A is
    still creating the Vapi call: A waits for it, then hands it over unopened."""
    (a,) = cluster.start("a", local_assistant={"create_delay_ms": "500"})
    (b,) = cluster.start("b")
    call = cluster.call(a, "--duration", "3", stream=b, to=SLOW_CREATE)
    assert call["ok"], call["detail"]
    heard_cleanly(call, 1500)
    settled = b.wait_event("takeover settled")
    assert (settled["outcome"], settled["handed_over"]) == ("handed-over", True), settled
    handed = a.wait_event("call ended", call_sid=call["call_sid"])
    assert handed["cause"] == "handed-over"
    assert handed["duration_s"] >= 0.5  # it waited for the Vapi call
    left = left_behind(cluster)
    (vapi,) = left.vapi_ended
    assert len(left.vapi_created) == 1
    show("takeover while A creates the Vapi call", call,
         first_audio_ms=call["timing"]["first_audio_ms"])
    assert handed.get("vapi_call_id") == vapi["vapi_call_id"], "A's summary lacks it"


# -- requests that reach an instance other than the call's ----------------------------------


def test_a_status_callback_on_a_ends_the_call_on_b(cluster: Cluster) -> None:
    """The call runs entirely on B; Twilio's terminal status callback reaches A while
    the stream is still up.  A forwards it over the bus and B ends both legs."""
    a, b = cluster.start("a", "b")
    call = cluster.call(b, "--duration", "10", "--status-callback-at", "1.5", status=a)
    assert call["ok"], call["detail"]
    end = call["end"]
    assert (end["ended_by"], end["close_code"]) == ("gateway", 1000), end
    assert end["close_reason"] == "call ended: twilio-status"
    assert end["status_callbacks"] == [204]
    to_close = end["status_callback_to_close_ms"]
    assert to_close is not None and to_close < CROSS_INSTANCE_END_BOUND_MS, to_close
    heard_cleanly(call, 1000)
    sid = call["call_sid"]
    (status,) = a.events("call status", call_sid=sid)
    assert status["ended_call"] is False  # not held on A: forwarded
    bus = b.wait_event("end-call from the control bus", call_sid=sid)
    assert (bus["cause"], bus["held"]) == ("twilio-status", True)
    assert bus["bus_latency_ms"] is not None and bus["bus_latency_ms"] < 500, bus
    summary = b.wait_event("call ended", call_sid=sid)
    assert summary["cause"] == "twilio-status"
    assert a.metric("vapi_gateway_cluster_bus_messages_total", direction="sent",
                    type="endcall") == 1
    left = left_behind(cluster)
    assert len(left.vapi_created) == 1
    show("status callback on A ends B's call", call, status_to_close_ms=to_close,
         bus_latency_ms=bus["bus_latency_ms"],
         frames=(call["frames"]["sent_media"], summary["frames_up"],
                 summary["uplink_dropped"]))


def test_admin_on_a_lists_and_hangs_up_a_call_on_b(cluster: Cluster) -> None:
    a, b = cluster.start("a", "b")
    running = cluster.start_call(b, "--duration", "15")
    started = b.wait_event("media stream started")
    sid = started["call_sid"]
    until(lambda: b.admin(f"/calls/{sid}")[1].get("frames_down", 0) > 10, 5,
          "the assistant speaking on B")
    def listed() -> dict[str, Any] | None:
        body = a.calls()
        return body if sid in {c["call_sid"] for c in body.get("cluster_calls", [])} else None

    listing = until(listed, 5, "B's call listed by A")
    assert listing["calls"] == [] and listing["instance"] == "a"
    (record,) = listing["cluster_calls"]
    assert (record["owner"], record["stream_sid"], record["called"]) == (
        "b", started["stream_sid"], SPEAK)
    assert record["vapi_call_id"]
    assert {i["instance_id"] for i in listing["instances"]} == {"a", "b"}
    status, answer = a.admin(f"/calls/{sid}", "DELETE")
    assert (status, answer["owner"], answer["ended"]) == (202, "b", False), answer
    call = finished(running)
    assert call["ok"], call["detail"]
    assert (call["end"]["ended_by"], call["end"]["close_code"]) == ("gateway", 1000)
    assert call["end"]["close_reason"] == "call ended: admin-hangup"
    heard_cleanly(call, 100)
    bus = b.wait_event("end-call from the control bus", call_sid=sid)
    assert (bus["cause"], bus["held"]) == ("admin-hangup", True)
    assert b.wait_event("call ended", call_sid=sid)["cause"] == "admin-hangup"
    until(lambda: a.cluster_sids() == {}, 5, "B's record deleted")
    status, _ = a.admin(f"/calls/{sid}", "DELETE")
    assert status == 404  # nobody holds it any more
    left = left_behind(cluster)
    assert len(left.vapi_created) == 1
    show("admin on A hangs up B's call", call, bus_latency_ms=bus["bus_latency_ms"])


# -- an instance dies -------------------------------------------------------------------------


def test_a_killed_instances_calls_expire_from_the_registry(cluster: Cluster) -> None:
    a, b = cluster.start("a", "b")
    running = cluster.start_call(b, "--duration", "20", "--status-callback", "never")
    sid = b.wait_event("media stream started")["call_sid"]
    until(lambda: b.admin(f"/calls/{sid}")[1].get("frames_down", 0) > 10, 5,
          "the assistant speaking on B")
    until(lambda: (a.cluster_sids() or {}).get(sid) == "b", 5, "B's call listed by A")
    b.daemon.kill()  # SIGKILL: no drain, no deletion, no goodbye on the bus
    b.killed = True
    killed_at = time.monotonic()
    until(lambda: (listed := a.cluster_sids()) is not None and sid not in listed,
          CALL_TTL_S + 2, "the dead instance's call expired")
    expired_after = time.monotonic() - killed_at
    # the record outlives its owner's last refresh by call_ttl, no more
    assert expired_after <= CALL_TTL_S + REFRESH_S + 0.5, expired_after
    until(lambda: "b" not in {i["instance_id"] for i in a.calls()["instances"]}, 3,
          "B's liveness key expired")
    call = finished(running)
    assert call["end"]["ended_by"] == "network" and call["speech"]["played_ms"] > 0
    # a late status callback for the dead instance's call finds no owner: nothing happens
    assert a.post_call_status(sid, "completed") == 204
    assert a.wait_event("call status", call_sid=sid)["ended_call"] is False
    left_behind(cluster)
    show("instance killed", call, record_expired_after_s=round(expired_after, 2))


# -- Redis stops, and comes back --------------------------------------------------------------


@pytest.mark.parametrize("fault", ["sigstop", "kill"])
def test_redis_lost_mid_call_leaves_the_audio_alone(cluster: Cluster, fault: str) -> None:
    """Redis is stopped (SIGSTOP, then SIGCONT) or killed (then restarted empty on the
    same port) while a call is up.  The call's audio is untouched; the daemon says Redis
    went and came back (log, ``cluster_redis_up``); a new call during the outage works on
    this instance alone (a fallback counted by the metric); once Redis is back the
    registry holds the live call again (re-sync)."""
    (a,) = cluster.start("a", cluster={"max_cluster_calls": "10"})
    duration_s = 7
    running = cluster.start_call(a, "--duration", str(duration_s))
    sid = a.wait_event("media stream started")["call_sid"]
    until(lambda: sid in (a.cluster_sids() or {}), 5, "the call in the registry")
    assert a.metric("vapi_gateway_cluster_redis_up") == 1
    if fault == "sigstop":
        cluster.redis.pause()
    else:
        cluster.redis.kill()
    down = time.monotonic()
    a.wait_event(REDIS_DOWN, timeout=5)
    detected_s = time.monotonic() - down
    assert a.metric("vapi_gateway_cluster_redis_up") == 0
    assert a.calls()["cluster"] == "unavailable"
    fallbacks = a.metric("vapi_gateway_cluster_fallbacks_total", operation="admission")
    new_call = cluster.call(a, "--duration", "1.5")  # placed while Redis is down
    assert new_call["ok"], new_call["detail"]
    heard_cleanly(new_call, 1000)
    assert a.metric("vapi_gateway_cluster_fallbacks_total",
                    operation="admission") == fallbacks + 1
    outage_s = time.monotonic() - down
    if fault == "sigstop":
        cluster.redis.resume()
    else:
        cluster.redis.start()  # empty, on the same port
    back = time.monotonic()
    a.wait_event(REDIS_BACK, count=2, timeout=10)  # the first was at start-up
    resynced_s = time.monotonic() - back
    assert a.metric("vapi_gateway_cluster_redis_up") == 1
    until(lambda: a.cluster_sids() == {sid: "a"}, 5,
          "the live call (only) back in the registry")
    call = finished(running)
    assert call["ok"], call["detail"]
    assert call["end"]["ended_by"] == "caller"
    heard_cleanly(call, (duration_s - 1) * 1000)
    summary = a.wait_event("call ended", call_sid=sid)
    assert summary["cause"] == "twilio-stop"
    assert (summary["underruns"], summary["gap_fill_frames"]) == (0, 0), summary
    # every caller frame went up to Vapi but those that came before its socket opened
    # (held, replayed: counted as uplink_dropped) -- as in a call with Redis up
    assert summary["uplink_dropped"] <= 1 and summary["frames_up"] >= (
        call["frames"]["sent_media"] - 1), summary
    left_behind(cluster)
    show(f"redis {fault} mid-call", call, detected_s=round(detected_s, 2),
         frames=(call["frames"]["sent_media"], summary["frames_up"],
                 summary["uplink_dropped"]),
         outage_s=round(outage_s, 2), resynced_after_s=round(resynced_s, 2),
         new_call=new_call["outcome"])


# -- two workers behind one port ------------------------------------------------------------------


def test_two_workers_on_one_port_webhook_and_stream_on_different_workers(
        cluster: Cluster) -> None:
    """Two workers share one listening socket (systemd socket activation, as in
    ``test_workers.py``) and Redis.  Which worker accepts is chosen with SIGSTOP: the
    webhook can only reach worker 0 (worker 1 stopped); then worker 0 is stopped and
    worker 1 resumed, so the stream -- opened 0.5 s after the TwiML, or queued on the
    shared socket until a worker accepts -- can only reach worker 1.  Worker 0 is
    stopped only once it logged its Vapi call: that took a loopback round trip to its
    assistant, so its TwiML answer (and its record in Redis) had left the process; a
    worker stopped on "call admitted" may still hold the answer in its write buffer.

    ``command_timeout = 2``: a worker stopped for half a second with a Redis command in
    flight would otherwise drop its connection when it runs again -- after SIGCONT
    ``epoll_wait`` returns EINTR and the expired deadline runs before the reply waiting
    in the socket is read -- and the takeover's answer with it (see
    ``tests/cluster/test_cluster_handover_reply.py`` for what that costs)."""
    with listening_socket() as shared:
        zero, one = cluster.start("w0", "w1", shared=shared, cluster={
            "command_timeout": "2", "takeover_timeout": "2"})
        one.daemon.pause()
        running = cluster.start_call(zero, "--duration", "3", "--stream-delay", "0.5")
        sid = zero.wait_event("call admitted")["call_sid"]
        zero.wait_event("vapi call created", call_sid=sid)
        zero.daemon.pause()
        one.daemon.resume()
        assert one.wait_event("media stream started", call_sid=sid)
        zero.daemon.resume()  # it must answer the takeover
        call = finished(running)
    assert call["ok"], call["detail"]
    heard_cleanly(call, 1500)  # 3 s, less the takeover while worker 0 was stopped
    assert zero.events("media stream started") == []
    settled = one.wait_event("takeover settled", call_sid=sid)
    assert settled["outcome"] == "handed-over", settled
    assert zero.wait_event("call ended", call_sid=sid)["cause"] == "handed-over"
    left = left_behind(cluster)
    assert len(left.vapi_created) == 1
    show("two workers, one port: webhook on w0, stream on w1", call)
