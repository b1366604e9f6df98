"""The cluster registry: this process's calls, mirrored into Redis for every instance.

It *is* the in-memory registry (admission, readiness, the admin API and the drain read
the local calls exactly as they do with ``[cluster] backend = memory``) and, on every
change, tells :class:`~gateway.cluster.member.ClusterMember`, which writes the record to
Redis without ever making the caller wait.
"""

from __future__ import annotations

from typing import cast

from gateway.bridge.registry import InMemoryCallRegistry, LiveCall
from gateway.cluster.member import ClusterMember, RecordedCall


class ClusterRegistry(InMemoryCallRegistry):
    """Local calls, each also recorded in the cluster (see the module docstring)."""

    def __init__(self, member: ClusterMember) -> None:
        super().__init__()
        self.member = member

    def add(self, call: LiveCall) -> None:
        super().add(call)
        self.member.call_added(cast(RecordedCall, call))

    def update(self, call: LiveCall) -> None:
        if self.get(call.call_sid) is call:
            self.member.call_changed(cast(RecordedCall, call))

    def remove(self, call: LiveCall) -> None:
        held = self.get(call.call_sid) is call
        super().remove(call)
        if held:
            self.member.call_removed(cast(RecordedCall, call))
