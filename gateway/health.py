"""``GET /health`` (liveness, with status, version, uptime and active calls) and
``GET /ready`` (503 while draining or at capacity, 200 otherwise).

A worker among several on one host (``--worker N``) adds ``"worker": N`` to ``/health``,
so a probe through the shared port says which worker answered it.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from gateway import __version__
from gateway.admission import Admission


def json_body(request: IRequest, status: int, body: object) -> bytes:
    """Set ``status`` and a JSON content type on ``request``; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class HealthRoutes:
    """The liveness and readiness routes of the public listener."""

    def __init__(self, admission: Admission, clock: IReactorTime,
                 worker: int | None = None) -> None:
        self._admission = admission
        self._clock = clock
        self._worker = worker
        self._started = clock.seconds()

    def register(self, app: Klein, health_path: str, ready_path: str) -> None:
        app.route(health_path, methods=["GET"])(self.health)
        app.route(ready_path, methods=["GET"])(self.ready)

    def health(self, request: IRequest) -> bytes:
        status = "draining" if self._admission.draining else "ok"
        body: dict[str, object] = {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(self._clock.seconds() - self._started, 3),
            "active_calls": len(self._admission.registry),
            "max_concurrent_calls": self._admission.max_concurrent_calls,
        }
        if self._worker is not None:
            body["worker"] = self._worker
        return json_body(request, 200, body)

    def ready(self, request: IRequest) -> bytes:
        refusal = self._admission.refusal()
        if refusal is None:
            return json_body(request, 200, {"ready": True})
        return json_body(request, 503, {"ready": False, "reason": refusal.value})
