"""Beyond one process: the call registry and control bus shared through Redis.

- :mod:`gateway.cluster.resp` — the Redis wire protocol, sans-io (bytes in, replies out);
- :mod:`gateway.cluster.redis_client` — supervised Redis connections on the reactor
  (reconnect, heartbeat, per-command timeouts on the injected clock);
- :mod:`gateway.cluster.records` — what the cluster stores about a call and the keys;
- :mod:`gateway.cluster.registry` — the cluster registry: local calls mirrored into Redis;
- :mod:`gateway.cluster.bus` — the control bus: one pub/sub channel per instance.
"""
