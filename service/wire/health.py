"""``grpc.health.v1.Health`` for Kubernetes probes: readiness "", liveness, and one per model.

Statuses translate the server's :class:`~service.engine.lifecycle.Lifecycle`: "" is SERVING
while the server is ready, a served name while that model is ready, and those turn NOT_SERVING
for good when the drain begins. ``liveness`` is SERVING while the server is live: through the
drain (a draining pod must not be restarted in the middle of it), NOT_SERVING while a model call
is wedged (the livenessProbe asks it, so Kubernetes restarts the pod). A model named
``liveness`` keeps its readiness in ModelReady; its health name answers liveness. A name is
known once it was first served (or, for a model's ``_dense`` name, once the model was); others
are NOT_FOUND. Check and Watch come from grpcio-health-checking.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from service.engine.lifecycle import Lifecycle, Phase

__all__ = ["LIVENESS", "OVERALL", "Health"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""
LIVENESS = "liveness"


class Health:
    """Keeps the health servicer's statuses in step with the lifecycle (its listener)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.servicer = health.aio.HealthServicer()
        self._lifecycle = lifecycle
        self._known: set[str] = {OVERALL}  # every name given a readiness status so far

    async def update(self, names: Sequence[str]) -> None:
        """Set liveness, and the statuses of ``names`` and of "", from the lifecycle's answers."""
        await self.servicer.set(LIVENESS, _status(self._lifecycle.live()))
        if self._lifecycle.phase >= Phase.DRAINING:
            # NOT_SERVING for every name known, and names first heard of now stay unknown.
            for name in self._known:
                await self.servicer.set(name, NOT_SERVING)
            return
        for name in names:
            if name != LIVENESS:
                self._known.add(name)
                await self.servicer.set(name, _status(self._lifecycle.model_ready(name)))
        await self.servicer.set(OVERALL, _status(self._lifecycle.ready()))


def _status(ready: bool) -> object:
    return SERVING if ready else NOT_SERVING
