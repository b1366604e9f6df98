"""The daemon: composes the gateway's parts and owns its life from bind to drain.

:func:`build_gateway` is the composition root — the one place where settings, the
reactor, the call registry, the Klein routes and the WebSocket factories are joined.
:class:`GatewayService` is the top-level twistd service: it binds the public port
(exiting non-zero with a clear line if it cannot), tells systemd READY=1 once bound,
and on SIGTERM drains: it stops admitting calls (``/ready`` turns 503), lets active
calls finish for up to ``drain_timeout``, ends what remains, and only then closes the
listening port and lets the reactor stop.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from gateway import __version__
from gateway.admin import MAX_BODY_BYTES as ADMIN_MAX_BODY_BYTES
from gateway.admin import AdminApi
from gateway.admission import Admission
from gateway.bridge.outbound import OutboundCalls
from gateway.bridge.recording import RecordingWriter
from gateway.bridge.registry import CallRegistry, InMemoryCallRegistry
from gateway.bridge.switchboard import PlayoutClock, Switchboard
from gateway.cluster.member import ClusterMember, default_instance_id
from gateway.cluster.redis_client import RedisTarget, endpoint_connector
from gateway.cluster.registry import ClusterRegistry
from gateway.config import Settings
from gateway.health import HealthRoutes
from gateway.http_limits import LimitedSite, admin_http_limits, public_http_limits
from gateway.logs import get_logger
from gateway.metrics import ClusterMetrics, GatewayMetrics, MeteredResource, ReactorLagProbe
from gateway.systemd import Notifier, WatchdogService, watchdog_interval
from gateway.tools.local_assistant.server import LocalAssistant
from gateway.twilio.media import media_stream_factory
from gateway.twilio.rest import TwilioCredentials, TwilioRestClient
from gateway.twilio.routes import (
    TwilioRoutes,
    signature_validator_from,
    stream_tokens_from,
    twiml_answers_from,
)
from gateway.vapi.calls import AudioFormat, CallCreator, CreatedCall, VapiApiSettings
from gateway.vapi.link import LinkSettings
from gateway.vapi.link_driver import LinkDriver, tls_connector
from gateway.vapi.routes import VapiRoutes

log = get_logger("gateway.daemon")

#: After the drain timeout, how long ending the remaining calls may take.
END_GRACE_SECONDS = 5.0
NS_PER_SECOND = 1_000_000_000


class ListenFailed(SystemExit):
    """The public port could not be bound: twistd exits non-zero with this line."""


class Listener(Service):
    """Binds an endpoint in ``privilegedStartService`` (exit non-zero if it cannot); closes it
    when stopped."""

    def __init__(self, reactor: Any, description: str, site: Site,
                 name: str = "public") -> None:
        self._reactor = reactor
        self.name = name
        self._description = description
        self._site = site
        self.port: IListeningPort | None = None
        self.bound: Deferred[IListeningPort] = Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            endpoint = serverFromString(self._reactor, self._description)
        except Exception as exc:
            if self._description.startswith("systemd:"):
                self._fail(f"cannot listen on {self._description!r}: no such socket inherited "
                           "from systemd (socket activation: LISTEN_FDS/LISTEN_PID)")
            self._fail(f"cannot use endpoint {self._description!r}: {exc}")
        starting = True
        failed: list[Failure] = []

        def on_error(failure: Failure) -> None:
            if starting:  # bind failed synchronously (tcp, systemd): exit non-zero now
                failed.append(failure)
            else:
                log.critical("cannot start", reason=_listen_error(self._description, failure))
                self._reactor.stop()

        endpoint.listen(self._site).addCallbacks(self._on_bound, on_error)
        starting = False
        if failed:
            self._fail(_listen_error(self._description, failed[0]))

    def _on_bound(self, port: IListeningPort) -> None:
        self.port = port
        host = port.getHost()
        log.info("listening", listener=self.name, endpoint=self._description,
                 address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}")
        self.bound.callback(port)

    def _fail(self, message: str) -> NoReturn:
        log.critical("cannot start", reason=message)
        raise ListenFailed(f"vapi-gateway: {message}")

    def stopService(self) -> Deferred[None] | None:  # type: ignore[override]
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # type: ignore[no-any-return]
        return None


def _listen_error(description: str, failure: Failure) -> str:
    if failure.check(CannotListenError):
        reason = failure.value.socketError  # type: ignore[union-attr]
        text = getattr(reason, "strerror", None) or str(reason)
        return f"cannot listen on {description!r}: {text}"
    return f"cannot listen on {description!r}: {failure.getErrorMessage()}"


class GatewayService(MultiService):
    """The root service: ordered start (bind → READY=1) and ordered stop (drain → close)."""

    def __init__(self, settings: Settings, reactor: IReactorCore, admission: Admission,
                 listener: Listener, notifier: Notifier,
                 handle_sigterm: bool = False) -> None:
        super().__init__()
        self.handle_sigterm = handle_sigterm
        self.settings = settings
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.admission = admission
        self.listener = listener
        self.notifier = notifier
        self.drained: Deferred[None] | None = None
        #: after the calls: wait for Vapi calls still being ended (late POST /call
        #: answers, orphans' sockets), so none outlives the daemon
        self.settle_vapi: Callable[[], Deferred[None]] | None = None

    def status_line(self) -> str:
        state = "draining" if self.admission.draining else "serving"
        return f"{state}; {len(self.admission.registry)} active calls"

    def startService(self) -> None:
        super().startService()
        log.info("starting", version=__version__, config=self.settings.source)
        # READY=1 only once the port is bound AND the reactor runs (signal handlers are
        # installed then: a SIGTERM after READY must start the drain, not kill us)
        self.listener.bound.addCallback(lambda _: self.reactor.callWhenRunning(self._on_ready))

    def _on_ready(self) -> None:
        if self.handle_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm_signal)
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        log.info("ready", max_concurrent_calls=self.settings.gateway.max_concurrent_calls)

    def _on_sigterm_signal(self, signum: int, frame: object) -> None:
        # in signal context: hop to the reactor thread (safe from a handler)
        self.reactor.callFromThread(self._on_sigterm)  # type: ignore[attr-defined]

    def _on_sigterm(self) -> None:
        """SIGTERM is the normal way to stop: drain, then exit 0 (not "killed by signal")."""
        if self.drained is not None:
            log.info("SIGTERM while draining: already stopping")
            return
        log.info("received SIGTERM: draining")
        self.reactor.stop()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        self.drained = self._drain()
        return self.drained

    @inlineCallbacks
    def _drain(self) -> Any:
        registry: CallRegistry = self.admission.registry
        self.admission.draining = True
        timeout = self.settings.gateway.drain_timeout
        self.notifier.notify("STOPPING=1", f"STATUS={self.status_line()}")
        log.info("draining", active_calls=len(registry), drain_timeout=timeout)
        had_calls = len(registry) > 0
        if self.settings.cluster.enabled:
            # the other instances take new connections (on a shared socket, systemd keeps
            # it open for them); this one's calls still reach it through the cluster
            log.info("draining: leaving new connections to the other instances")
            yield self.listener.stopService()
        finished = yield _within(registry.when_empty(), timeout, self.clock)
        if finished and had_calls and self.settings.gateway.drain_grace:
            # the calls' status callbacks are still on their way
            yield deferLater(self.clock, self.settings.gateway.drain_grace, lambda: None)
        if not finished:
            log.warning("drain timeout: ending remaining calls", active_calls=len(registry))
            ended = yield _within(registry.end_all("drain-timeout"), END_GRACE_SECONDS,
                                  self.clock)
            if not ended:
                log.error("calls did not finish ending", active_calls=len(registry))
        if self.settle_vapi is not None:
            settled = yield _within(self.settle_vapi(), END_GRACE_SECONDS, self.clock)
            if not settled:
                log.warning("vapi calls still being ended at exit")
        yield super().stopService()  # closes the listening port
        self.notifier.close()
        log.info("stopped")


def _within(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[bool]:
    """Fire True when ``d`` fires, or False after ``seconds`` (``d`` is cancelled)."""
    result: Deferred[bool] = Deferred()
    timer = clock.callLater(seconds, d.cancel)

    def done(outcome: object) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(not isinstance(outcome, Failure))

    d.addBoth(done)
    return result


@dataclass
class Gateway:
    """The composed daemon: the root service and the parts tests reach into."""

    service: GatewayService
    app: Klein
    site: Site
    registry: CallRegistry
    admission: Admission
    switchboard: Switchboard
    metrics: GatewayMetrics
    admin_app: Klein


def build_gateway(settings: Settings, reactor: IReactorCore,
                  environ: Mapping[str, str] | None = None,
                  handle_sigterm: bool = False, http_client: Any = None,
                  link_connector: Any = None, worker: int | None = None) -> Gateway:
    """Join settings, reactor, registry, both legs, routes and services into a Gateway.

    ``http_client`` (treq-like, for Vapi's and Twilio's REST APIs) and
    ``link_connector`` (opens Vapi call sockets) default to the real network ones.
    worker: this process's number among the host's workers (systemd template instance), or None
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    metrics = GatewayMetrics()
    member = _cluster_member(settings, reactor, worker, metrics)
    registry: CallRegistry = ClusterRegistry(member) if member else InMemoryCallRegistry()
    admission = Admission(registry, settings.gateway.max_concurrent_calls, cluster=member)
    http = http_client if http_client is not None else _http_client(reactor)
    connector = link_connector if link_connector is not None else tls_connector(reactor)
    vapi = settings.vapi
    local: LocalAssistant | None = None
    api_url = vapi.api_url
    api_key = vapi.api_key.reveal() if vapi.api_key else secrets.token_urlsafe(24)
    if api_url == "local":
        local, api_url = _start_local_assistant(settings, reactor, api_key)
    twilio_rest = _twilio_rest(settings, http, clock)
    recordings = _recording_writer(settings, reactor)

    def end_late_vapi_call(created: CreatedCall) -> None:  # called only once running
        switchboard.end_orphan(created)

    vapi_calls = _vapi_calls(settings, api_url, api_key, http, clock, metrics,
                             end_late_vapi_call)
    switchboard = Switchboard(settings, registry, admission, clock, vapi_calls,
                              _link_factory(settings, api_key, clock, connector),
                              twilio_rest, metrics, recordings, cluster=member)
    if member is not None:
        member.local = switchboard
    metrics.watch(switchboard, lambda: {r.value: n for r, n in admission.refused.items()})
    metrics.watch_reactor(clock)

    app = Klein()
    HealthRoutes(admission, clock, worker=worker).register(
        app, settings.gateway.health_path, settings.gateway.ready_path)
    twilio = settings.twilio
    validator = signature_validator_from(settings)
    tokens = stream_tokens_from(settings)  # one instance: one replay cache
    twiml = twiml_answers_from(settings)
    outbound = OutboundCalls(switchboard, ttl_seconds=tokens.ttl_seconds)
    TwilioRoutes(settings, validator=validator, tokens=tokens, twiml=twiml,
                 admission=admission, calls=switchboard, clock=clock).register(app)
    media_stream_factory(settings, validator=validator, tokens=tokens, calls=switchboard,
                         clock=clock, outbound=outbound,
                         count_violations=metrics.twilio_violation,
                         count_auth_failure=metrics.auth_failure).register(app)
    VapiRoutes(settings, calls=switchboard, clock=clock).register(app)
    if not twilio.validate_signatures:
        log.warning("Twilio signature validation is OFF ([twilio] validate_signatures = "
                    "false): anyone can post to the webhooks; never run this in production")

    # bodies bounded before they are read, and a deadline to send each request
    site = LimitedSite(MeteredResource(app.resource(), metrics, route_labels(settings)),
                       public_http_limits(settings), reactor=clock)
    listener = Listener(reactor, settings.gateway.listen, site)
    notifier = Notifier(environ)
    root = GatewayService(settings, reactor, admission, listener, notifier, handle_sigterm)

    @inlineCallbacks
    def settle_vapi() -> Any:
        yield vapi_calls.when_settled()  # late answers are handed to end_orphan
        yield switchboard.when_orphans_ended()

    root.settle_vapi = settle_vapi
    if member is not None:  # joins before the port opens; leaves after the drain
        member.setServiceParent(root)
    PlayoutClock(switchboard, clock).setServiceParent(root)
    ReactorLagProbe(metrics, clock, settings.admin.reactor_lag_interval).setServiceParent(root)
    listener.setServiceParent(root)
    if local is not None:  # stops after the drain, like the other children
        local.setServiceParent(root)
    if recordings is not None:  # stops after the drain: every file complete, then exit
        recordings.setServiceParent(root)
    admin_app = Klein()
    admin_app.route(settings.admin.metrics_path, methods=["GET"])(
        lambda request: _metrics_body(request, metrics))
    if settings.admin.listen:
        admin_token = settings.admin.token
        AdminApi(settings, token=admin_token.reveal() if admin_token else None,
                 switchboard=switchboard, twilio_rest=twilio_rest, tokens=tokens, twiml=twiml,
                 clock=clock, outbound=outbound).register(admin_app)
        admin_site = LimitedSite(admin_app.resource(),
                                 admin_http_limits(settings, ADMIN_MAX_BODY_BYTES), reactor=clock)
        Listener(reactor, worker_endpoint(settings.admin.listen, worker), admin_site,
                 "admin").setServiceParent(root)
    interval = watchdog_interval(environ)
    if interval is not None and notifier.enabled:
        WatchdogService(notifier, interval, clock, root.status_line).setServiceParent(root)
    return Gateway(root, app, site, registry, admission, switchboard, metrics, admin_app)


def worker_endpoint(description: str, worker: int | None) -> str:
    """The admin listener of worker N on a host: a ``tcp:`` port moves up by N (each
    worker has its own metrics and admin API); other kinds are used as they are."""
    kind, _, rest = description.partition(":")
    if worker is None or kind not in ("tcp", "tcp6") or not rest:
        return description
    port, sep, options = rest.partition(":")
    if port.startswith("port="):
        return f"{kind}:port={int(port[5:]) + worker}{sep}{options}"
    if port.isdigit() and int(port) != 0:
        return f"{kind}:{int(port) + worker}{sep}{options}"
    return description


def _cluster_member(settings: Settings, reactor: Any, worker: int | None,
                    metrics: GatewayMetrics) -> ClusterMember | None:
    """``[cluster] backend = redis://…``: this instance's membership (None: memory)."""
    cluster = settings.cluster
    if not cluster.enabled:
        return None
    cluster_metrics = ClusterMetrics(metrics.registry)
    instance_id = cluster.instance_id or default_instance_id(worker)
    target = RedisTarget.from_settings(cluster)
    try:
        connect = endpoint_connector(reactor, target, cluster.connect_timeout)
    except OSError as exc:  # the CA file
        raise ListenFailed(f"vapi-gateway: [cluster] tls_ca_file: {exc.strerror}") from None
    log.info("cluster member", instance=instance_id, redis=str(target), worker=worker)
    return ClusterMember(cluster, reactor, connect, instance_id=instance_id, worker=worker,
                         ended_ttl_s=settings.twilio.stream_token_ttl,
                         events=cluster_metrics.event, redis_state=cluster_metrics.redis_state)


def route_labels(settings: Settings) -> dict[str, str]:
    """Metric labels of the public routes (a bounded set)."""
    twilio, gateway = settings.twilio, settings.gateway
    return {twilio.voice_path: "twilio-voice", twilio.status_path: "twilio-status",
            twilio.stream_status_path: "twilio-stream-status", twilio.media_path: "twilio-media",
            settings.vapi.events_path: "vapi-events", gateway.health_path: "health",
            gateway.ready_path: "ready"}


def _metrics_body(request: Any, metrics: GatewayMetrics) -> bytes:
    request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
    return metrics.render()


def _http_client(reactor: Any) -> Any:
    """treq over a persistent connection pool (Vapi and Twilio REST)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    return HTTPClient(Agent(reactor, pool=pool))


def _start_local_assistant(settings: Settings, reactor: Any, api_key: str
                           ) -> tuple[LocalAssistant, str]:
    """``[vapi] api_url = local``: the Vapi stand-in, bound now so its URL is known."""
    local = LocalAssistant(reactor, reactor, api_key=api_key,
                           settings=settings.local_assistant,
                           listen=settings.local_assistant_listen)
    started = local.start()
    if local.base_url is None:
        problems: list[str] = []
        started.addErrback(lambda f: problems.append(f.getErrorMessage()))
        raise ListenFailed(f"vapi-gateway: the local assistant cannot listen on "
                           f"{settings.local_assistant_listen!r}: {'; '.join(problems)}")
    log.warning("using the LOCAL assistant (api_url = local): calls never reach Vapi",
                url=local.base_url)
    return local, local.base_url


def _recording_writer(settings: Settings, reactor: Any) -> RecordingWriter | None:
    """[recording] enabled: the writer, after checking its folder is usable now."""
    recording = settings.recording
    if not recording.enabled:
        return None
    folder = Path(recording.directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ListenFailed(f"vapi-gateway: [recording] directory {folder}: {exc.strerror}"
                           ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ListenFailed(f"vapi-gateway: [recording] directory {folder}: not writable")
    return RecordingWriter(folder, flush_interval_s=recording.flush_interval,
                           caller_late_ms=recording.caller_late_ms,
                           max_backlog_s=recording.max_backlog_seconds,
                           fsync_on_close=recording.fsync_on_close,
                           threads=recording.writer_threads, reactor=reactor)


def _vapi_calls(settings: Settings, api_url: str, api_key: str, http: Any,
                clock: IReactorTime, metrics: GatewayMetrics,
                end_orphan: Callable[[CreatedCall], None]) -> CallCreator:
    """The Vapi call creator.  A call created by a POST /call that had timed out (the
    retry served the phone call) is counted and ended with ``end_orphan``."""
    vapi = settings.vapi

    def end_late_call(created: CreatedCall) -> None:
        metrics.vapi_late_call_ended()
        end_orphan(created)

    return CallCreator(VapiApiSettings(
        api_key=api_key, api_url=api_url,
        request_timeout_ns=int(vapi.request_timeout * NS_PER_SECOND),
        retries=vapi.request_retries), http, clock,
        on_late_call=end_late_call,
        on_late_request_abandoned=metrics.vapi_late_create_abandoned)


def _link_factory(settings: Settings, api_key: str, clock: IReactorTime, connector: Any
                  ) -> Callable[[Any, CreatedCall], LinkDriver]:
    vapi = settings.vapi
    audio = AudioFormat(vapi.audio_format, vapi.sample_rate)  # type: ignore[arg-type]
    link_settings = LinkSettings(
        heartbeat_interval_ns=int(vapi.heartbeat_interval * NS_PER_SECOND),
        pong_timeout_ns=int(vapi.pong_timeout * NS_PER_SECOND),
        reconnect_attempts=vapi.reconnect_attempts,
        reconnect_initial_delay_ns=int(vapi.reconnect_delay * NS_PER_SECOND),
        on_vapi_loss=vapi.on_vapi_loss)  # type: ignore[arg-type]

    def open_link(owner: Any, created: CreatedCall) -> LinkDriver:
        context = {"vapi_call_id": created.call_id}
        call_sid = getattr(owner, "call_sid", None)
        if call_sid:
            context["call_sid"] = call_sid
        return LinkDriver(url=created.socket_url, api_key=api_key, audio=audio, owner=owner,
                          clock=clock, connector=connector, settings=link_settings,
                          max_message_bytes=vapi.max_message_size, log_context=context)

    return open_link


def _twilio_rest(settings: Settings, http: Any, clock: IReactorTime
                 ) -> TwilioRestClient | None:
    twilio = settings.twilio
    if not twilio.account_sid or twilio.auth_token is None:
        return None
    if twilio.api_key_sid and twilio.api_key_secret is not None:
        credentials = TwilioCredentials.from_api_key(
            twilio.account_sid, twilio.api_key_sid, twilio.api_key_secret.reveal())
    else:
        credentials = TwilioCredentials.from_auth_token(
            twilio.account_sid, twilio.auth_token.reveal())
    return TwilioRestClient(http, clock, credentials, api_base_url=twilio.rest_api_url,
                            timeout=twilio.rest_timeout, max_attempts=twilio.rest_retries + 1)
