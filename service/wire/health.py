"""``grpc.health.v1.Health`` for Kubernetes probes: the overall service "" and one per model.

Statuses translate the server's :class:`~service.engine.lifecycle.Lifecycle`: "" is SERVING
while the server is ready, a served name while that model is ready, and everything turns
NOT_SERVING for good when the drain begins. A name is known once it was first served (or, for a
model's ``_dense`` name, once the model was); others are NOT_FOUND. Check and Watch come from
grpcio-health-checking.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from service.engine.lifecycle import Lifecycle, Phase

__all__ = ["Health"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""


class Health:
    """Keeps the health servicer's statuses in step with the lifecycle (its listener)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.servicer = health.aio.HealthServicer()
        self._lifecycle = lifecycle

    async def update(self, names: Sequence[str]) -> None:
        """Set the statuses of ``names`` and of "" from the lifecycle's answers."""
        if self._lifecycle.phase >= Phase.DRAINING:
            # NOT_SERVING everywhere, and the servicer ignores every later status.
            await self.servicer.enter_graceful_shutdown()
            return
        for name in names:
            await self.servicer.set(name, _status(self._lifecycle.model_ready(name)))
        await self.servicer.set(OVERALL, _status(self._lifecycle.ready()))


def _status(ready: bool) -> object:
    return SERVING if ready else NOT_SERVING
