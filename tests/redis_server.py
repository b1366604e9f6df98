"""A throw-away Redis for tests: skipped where ``redis-server`` is missing, except in CI.

``.ci/run`` installs Debian's ``redis-server``; on a developer machine without it the
tests that need it are skipped with the command that installs it::

    def test_something() -> None:
        with started_redis() as redis:
            ...  # redis.url, redis.pause(), redis.restart(), ...
"""

from __future__ import annotations

import os

import pytest

from gateway.tools.redis_process import RedisProcess, redis_server_path


def require_redis_server() -> None:
    """Skip the calling test when ``redis-server`` is not installed (fail in CI)."""
    if redis_server_path() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server missing in CI (.ci/run installs redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


def started_redis() -> RedisProcess:
    """A running empty server (or skip); use it as a context manager to stop it."""
    require_redis_server()
    server = RedisProcess()
    server.start()
    return server
