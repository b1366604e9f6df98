"""``/health`` and ``/ready`` on their own: the body, and the worker number of a worker."""

from __future__ import annotations

import json

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.task import Clock

from gateway import __version__
from gateway.admission import Admission
from gateway.bridge.registry import InMemoryCallRegistry
from gateway.health import HealthRoutes


def get_json(app: Klein, path: str) -> tuple[int, object]:
    treq = StubTreq(app.resource())
    response = treq.get(f"http://127.0.0.1:8080{path}").result  # type: ignore[attr-defined]
    return response.code, json.loads(treq.content(response).result)  # type: ignore[attr-defined]


def routes(worker: int | None = None) -> tuple[Klein, Admission, Clock]:
    clock = Clock()
    admission = Admission(InMemoryCallRegistry(), 3)
    app = Klein()
    HealthRoutes(admission, clock, worker=worker).register(app, "/health", "/ready")
    return app, admission, clock


def test_health_of_a_single_daemon_has_no_worker() -> None:
    app, _, clock = routes()
    clock.advance(2.25)
    assert get_json(app, "/health") == (200, {
        "status": "ok", "version": __version__, "uptime_seconds": 2.25,
        "active_calls": 0, "max_concurrent_calls": 3})


def test_health_of_a_worker_says_which_worker_answered() -> None:
    app, admission, _ = routes(worker=2)
    code, body = get_json(app, "/health")
    assert code == 200 and body["worker"] == 2  # type: ignore[index]
    admission.draining = True
    assert get_json(app, "/health")[1] == {**body, "status": "draining"}  # type: ignore[dict-item]


def test_worker_zero_is_reported() -> None:
    app, _, _ = routes(worker=0)
    assert get_json(app, "/health")[1]["worker"] == 0  # type: ignore[index]


def test_ready_is_unchanged_for_a_worker() -> None:
    app, admission, _ = routes(worker=1)
    assert get_json(app, "/ready") == (200, {"ready": True})
    admission.draining = True
    assert get_json(app, "/ready") == (503, {"ready": False, "reason": "draining"})
