"""``grpc.health.v1.Health`` for Kubernetes probes: the overall service "" and one per model.

A model's name is SERVING once it is loaded and warm; "" is SERVING once every model is, and
everything turns NOT_SERVING for good when the server starts draining. Check and Watch come from
grpcio-health-checking.
"""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

__all__ = ["Health"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""


class Health:
    """Keeps the health servicer's statuses in step with the repository."""

    def __init__(self, everything_ready: Callable[[], bool]) -> None:
        self.servicer = health.aio.HealthServicer()
        self._everything_ready = everything_ready
        self._started = False

    async def starting(self) -> None:
        """Before models load: the overall service is NOT_SERVING."""
        await self.servicer.set(OVERALL, NOT_SERVING)

    async def model(self, name: str, serving: bool) -> None:
        """A served name became (un)available; the overall status follows."""
        await self.servicer.set(name, SERVING if serving else NOT_SERVING)
        if self._started:
            await self._overall()

    async def started(self) -> None:
        """The startup load finished."""
        self._started = True
        await self._overall()

    async def _overall(self) -> None:
        await self.servicer.set(OVERALL, SERVING if self._everything_ready() else NOT_SERVING)

    async def draining(self) -> None:
        """Shutdown began: NOT_SERVING everywhere, from now on."""
        await self.servicer.enter_graceful_shutdown()
