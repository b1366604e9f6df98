"""Prometheus metrics: what operators watch to learn, before callers do, that something
is wrong.

Nothing here runs per audio frame.  Event metrics (calls started and ended, barge-in
reaction times, Vapi call creation, webhook requests, refusals, violations) are
counted when the event happens; per-frame figures (frames and bytes each way,
underruns, playout lead and buffer depth) are read from the live sessions when
Prometheus scrapes, plus the totals of calls that have ended, so counters stay
monotonic.  Labels have bounded values: causes, routes, kinds — never a CallSid.

:class:`ReactorLagProbe` is a LoopingCall that measures how late it fires: the single
best sign that a Twisted daemon is overloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource

NS_PER_MS = 1_000_000
PREFIX = "vapi_gateway"
_LABEL_SAFE = re.compile(r"[^a-z0-9_-]")
_MAX_LABEL_VALUES = 64

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
REACTION_BUCKETS_S = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.005, 0.02)
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS_S = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class LiveCall(Protocol):
    """What the scrape reads of a live call (``gateway.bridge.session.CallSession``)."""

    def traffic(self, now_ns: int) -> dict[str, float]: ...


class LiveCalls(Protocol):
    def sessions(self) -> list[Any]: ...

    def now_ns(self) -> int: ...


def bounded_label(value: str, seen: set[str]) -> str:
    """A label value from a bounded set: unknown values past the limit become "other"."""
    value = _LABEL_SAFE.sub("-", value.lower())[:40] or "unknown"
    if value in seen:
        return value
    if len(seen) >= _MAX_LABEL_VALUES:
        return "other"
    seen.add(value)
    return value


#: The per-call traffic figures, summed over live and ended calls at scrape time.
TRAFFIC = {
    "uplink_frames": ("frames_total", {"direction": "uplink"}, "audio frames forwarded"),
    "downlink_frames": ("frames_total", {"direction": "downlink"}, "audio frames forwarded"),
    "uplink_bytes": ("bytes_total", {"direction": "uplink"}, "audio bytes forwarded"),
    "downlink_bytes": ("bytes_total", {"direction": "downlink"}, "audio bytes forwarded"),
    "underruns": ("downlink_underruns_total", {}, "gaps Twilio's queue ran dry mid-speech"),
    "underrun_ms": ("downlink_underrun_ms_total", {}, "audible gap time, ms"),
    "overflow_drops": ("downlink_overflow_drops_total", {}, "assistant audio dropped, buffer full"),
    "overflow_dropped_frames": ("downlink_frames_dropped_total", {},
                                "assistant audio dropped from a full playout buffer, in "
                                "20 ms frames"),
    "unconfirmed_holds": ("downlink_holds_total", {"cause": "unconfirmed"},
                          "times sending to Twilio was held by back-pressure, by cause "
                          "(unconfirmed: max_unconfirmed_ms awaiting mark echoes; "
                          "transport: the socket's write buffer full)"),
    "paused_holds": ("downlink_holds_total", {"cause": "transport"},
                     "times sending to Twilio was held by back-pressure, by cause"),
    "held_ms": ("downlink_held_ms_total", {}, "time sending to Twilio was held by "
                "back-pressure, ms"),
    "uplink_dropped": ("uplink_dropped_frames_total", {}, "caller frames dropped (link down)"),
    "keepalive_frames": ("uplink_keepalive_frames_total", {}, "silence frames sent to Vapi"),
    "reconnects": ("vapi_link_reconnects_total", {}, "Vapi call-socket reconnect attempts"),
    "link_give_ups": ("vapi_link_give_ups_total", {}, "Vapi links given up after reconnects"),
    "vapi_violations": ("protocol_violations_total", {"leg": "vapi", "kind": "bad-frame"},
                        "bad input from a leg, by leg and kind"),
}


class GatewayMetrics:
    """Every metric of one daemon, in its own registry (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls_started = Counter(f"{PREFIX}_calls_started", "calls admitted", registry=r)
        self.calls_ended = Counter(f"{PREFIX}_calls_ended", "calls ended, by cause",
                                   ["cause"], registry=r)
        self.call_duration = Histogram(f"{PREFIX}_call_duration_seconds", "call durations",
                                       buckets=DURATION_BUCKETS_S, registry=r)
        self.barge_ins = Counter(f"{PREFIX}_barge_ins", "barge-ins (assistant cut off)",
                                 registry=r)
        self.barge_in_reaction = Histogram(
            f"{PREFIX}_barge_in_reaction_seconds", "barge-in signal handled -> clear written",
            buckets=REACTION_BUCKETS_S, registry=r)
        self.barge_in_queued = Histogram(
            f"{PREFIX}_barge_in_queued_seconds", "audio queued at Twilio when cut off",
            buckets=(0.02, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.5), registry=r)
        self.vapi_create_latency = Histogram(
            f"{PREFIX}_vapi_call_create_seconds", "Vapi call creation latency",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.vapi_create_failures = Counter(
            f"{PREFIX}_vapi_call_create_failures", "Vapi call creation failures, by kind",
            ["kind"], registry=r)
        self.vapi_late_calls_ended = Counter(
            f"{PREFIX}_vapi_late_calls_ended",
            "Vapi calls created by a POST /call that had timed out (the retry served the "
            "call), ended on arrival", registry=r)
        self.vapi_late_creates_abandoned = Counter(
            f"{PREFIX}_vapi_late_creates_abandoned",
            "timed-out POST /call requests cancelled unanswered at the late-answer limit: "
            "a Vapi call each may have created was never ended by the gateway", registry=r)
        self.webhook_requests = Counter(
            f"{PREFIX}_webhook_requests", "HTTP requests on the public port, by route and status",
            ["route", "status"], registry=r)
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "signature and authentication failures, by route",
            ["route"], registry=r)
        self.reactor_lag = Histogram(
            f"{PREFIX}_reactor_lag_seconds", "how late a 100 ms LoopingCall fires",
            buckets=LAG_BUCKETS_S, registry=r)
        self._causes: set[str] = set()
        self._kinds: set[str] = set()
        self._routes: set[str] = set()
        self.ended_traffic: dict[str, float] = dict.fromkeys(TRAFFIC, 0.0)
        self.twilio_violations: dict[str, int] = {}
        self._calls: LiveCalls | None = None
        self._refusals: Callable[[], dict[str, int]] | None = None

    # -- sources read at scrape time ------------------------------------------------------

    def watch(self, calls: LiveCalls, refusals: Callable[[], dict[str, int]]) -> None:
        """Read live calls and admission refusals on every scrape."""
        self._calls = calls
        self._refusals = refusals
        self.registry.register(_ScrapeTimeCollector(self))

    def watch_reactor(self, clock: IReactorTime) -> None:
        """Count the reactor's pending delayed calls (timers) on every scrape."""
        self.registry.register(_DelayedCallsCollector(clock))

    # -- events -------------------------------------------------------------------------------

    def call_started(self) -> None:
        self.calls_started.inc()

    def call_ended(self, cause: str, duration_s: float, traffic: dict[str, float]) -> None:
        self.calls_ended.labels(bounded_label(cause, self._causes)).inc()
        self.call_duration.observe(duration_s)
        for key, value in traffic.items():
            if key in self.ended_traffic:
                self.ended_traffic[key] += value

    def barge_in(self, reaction_s: float, queued_s: float) -> None:
        self.barge_ins.inc()
        self.barge_in_reaction.observe(reaction_s)
        self.barge_in_queued.observe(queued_s)

    def vapi_call_created(self, latency_s: float) -> None:
        self.vapi_create_latency.observe(latency_s)

    def vapi_call_failed(self, kind: str) -> None:
        self.vapi_create_failures.labels(bounded_label(kind, self._kinds)).inc()

    def vapi_late_call_ended(self) -> None:
        self.vapi_late_calls_ended.inc()

    def vapi_late_create_abandoned(self) -> None:
        self.vapi_late_creates_abandoned.inc()

    def webhook_request(self, route: str, status: int) -> None:
        self.webhook_requests.labels(route, str(status)).inc()

    def auth_failure(self, route: str) -> None:
        self.auth_failures.labels(bounded_label(route, self._routes)).inc()

    def twilio_violation(self, kind: str, count: int = 1) -> None:
        label = bounded_label(kind, self._kinds)
        self.twilio_violations[label] = self.twilio_violations.get(label, 0) + count

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _ScrapeTimeCollector(Collector):
    """Gauges and per-frame counters read from live calls when Prometheus scrapes."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        metrics = self._metrics
        calls = metrics._calls
        sessions = calls.sessions() if calls is not None else []
        now = calls.now_ns() if calls is not None else 0
        totals = dict(metrics.ended_traffic)
        leads: list[float] = []
        depths: list[float] = []
        unconfirmed: list[float] = []
        for session in sessions:
            traffic = session.traffic(now)
            for key in totals:
                totals[key] += traffic.get(key, 0.0)
            leads.append(traffic.get("lead_ms", 0.0))
            depths.append(traffic.get("buffered_ms", 0.0))
            unconfirmed.append(traffic.get("unconfirmed_ms", 0.0))
        active = GaugeMetricFamily(f"{PREFIX}_calls_active", "calls in progress")
        active.add_metric([], len(sessions))
        yield active
        families: dict[str, CounterMetricFamily] = {}
        for key, (name, labels, doc) in TRAFFIC.items():
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(
                    f"{PREFIX}_{name.removesuffix('_total')}", doc, labels=list(labels))
            family.add_metric(list(labels.values()), totals[key])
        violations = families["protocol_violations_total"]
        for kind, count in sorted(metrics.twilio_violations.items()):
            violations.add_metric(["twilio", kind], count)
        yield from families.values()
        for name, values, doc in (("playout_lead_ms", leads, "audio queued at Twilio, ms"),
                                  ("buffer_depth_ms", depths, "assistant audio held, ms"),
                                  ("unconfirmed_ms", unconfirmed,
                                   "audio sent to Twilio, not yet confirmed played, ms")):
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc + " (over active calls)",
                                      labels=["stat"])
            gauge.add_metric(["max"], max(values, default=0.0))
            gauge.add_metric(["mean"], sum(values) / len(values) if values else 0.0)
            yield gauge
        refused = CounterMetricFamily(f"{PREFIX}_admissions_refused",
                                      "calls refused, by reason", labels=["reason"])
        for reason, count in (metrics._refusals() if metrics._refusals else {}).items():
            refused.add_metric([reason], count)
        yield refused


class _DelayedCallsCollector(Collector):
    """The reactor's pending delayed calls, counted when Prometheus scrapes: a count
    that keeps growing while the calls do not is a timer left behind."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily(f"{PREFIX}_reactor_delayed_calls",
                                  "delayed calls (timers) pending in the reactor")
        gauge.add_metric([], len(self._clock.getDelayedCalls()))
        yield gauge


class MeteredResource(Resource):
    """Wraps the public port's root resource: counts every request by route and status.

    Routes are the configured paths (a bounded set); anything else counts as ``other``.
    A 401 or 403 also counts as an authentication failure on that route.  (Counted when
    the response finishes, so WebSocket upgrades count once their socket is done.)
    """

    isLeaf = True

    def __init__(self, inner: Any, metrics: GatewayMetrics, routes: dict[str, str]) -> None:
        super().__init__()
        self._inner = inner
        self._metrics = metrics
        self._routes = {path.encode(): label for path, label in routes.items()}

    def render(self, request: Any) -> Any:
        request.notifyFinish().addBoth(lambda _: self._count(request))
        return self._inner.render(request)

    def _count(self, request: Any) -> None:
        path = request.path if isinstance(request.path, bytes) else b""
        route = self._routes.get(path.rstrip(b"/") or b"/", "other")
        status = int(request.code)
        self._metrics.webhook_request(route, status)
        if status in (401, 403):
            self._metrics.auth_failure(route)


class ReactorLagProbe(Service):
    """A LoopingCall at ``interval`` recording how late each firing is."""

    def __init__(self, metrics: GatewayMetrics, clock: IReactorTime, interval: float) -> None:
        self._metrics = metrics
        self._clock = clock
        self._interval = interval
        self._expected = 0.0
        self._loop = LoopingCall(self._fire)
        self._loop.clock = clock
        self.last_lag_s = 0.0

    def _fire(self) -> None:
        now = self._clock.seconds()
        if self._expected:
            self.last_lag_s = max(0.0, now - self._expected)
            self._metrics.reactor_lag.observe(self.last_lag_s)
        # where LoopingCall schedules the next firing: the next point of its grid
        start = self._loop.starttime or now
        self._expected = now + self._interval - ((now - start) % self._interval)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop.running:
            self._loop.stop()


class ClusterMetrics:
    """The cluster's metrics (``[cluster] backend = redis://…``), in the daemon's registry.

    ``events(kind, label)`` is the :class:`~gateway.cluster.member.ClusterMember`'s one
    hook: kinds are bus traffic, takeovers, fallbacks to local-only handling and Redis
    errors; labels are message types, outcomes and operations (bounded sets).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.redis_up = Gauge(f"{PREFIX}_cluster_redis_up",
                              "1 while Redis answers this instance, else 0", registry=r)
        self.fallbacks = Counter(
            f"{PREFIX}_cluster_fallbacks",
            "requests handled by this instance alone because Redis could not answer, by "
            "operation", ["operation"], registry=r)
        self.redis_errors = Counter(f"{PREFIX}_cluster_redis_errors",
                                    "Redis reads and writes that failed, by operation",
                                    ["operation"], registry=r)
        self.bus_messages = Counter(f"{PREFIX}_cluster_bus_messages",
                                    "control-bus messages, by direction and type",
                                    ["direction", "type"], registry=r)
        self.takeovers = Counter(f"{PREFIX}_cluster_takeovers",
                                 "streams that reached an instance other than their "
                                 "webhook's, by outcome", ["outcome"], registry=r)
        self._labels: set[str] = set()

    def redis_state(self, up: bool) -> None:
        self.redis_up.set(1 if up else 0)

    def event(self, kind: str, label: str) -> None:
        value = bounded_label(label, self._labels)
        if kind == "fallback":
            self.fallbacks.labels(value).inc()
        elif kind == "redis-error":
            self.redis_errors.labels(value).inc()
        elif kind in ("bus-sent", "bus-received", "bus-bad"):
            self.bus_messages.labels(kind.removeprefix("bus-"), value).inc()
        elif kind == "takeover":
            self.takeovers.labels(value).inc()
