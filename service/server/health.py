"""grpc.health.v1 for the server: Check, Watch and List, read from the server's one readiness state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.server.runtime import Readiness

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus.ValueType


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: Check, Watch and List (grpcio-health-checking's servicer lacks List: its stub raises
    NotImplementedError, UNIMPLEMENTED and an ERROR with a traceback in the log per call).

    Every service's status is read from `readiness()` (the runtime's one state): SERVING while READY,
    NOT_SERVING while loading or draining. Call `changed()` after the state changes, so that open watches
    send the new status. Unlike grpcio-health-checking's servicer, a Watch ends (OK) once draining has begun
    and NOT_SERVING has been sent: left open, a watching client (gRPC's client-side health checking) would
    hold the server for the whole grace period. No lock is held while a status is written, so a watcher that
    does not read cannot stall the others."""

    def __init__(self, readiness: Callable[[], Readiness], service_names: tuple[str, ...] = ()) -> None:
        self._readiness = readiness
        self._names = ("", *service_names)  # "": the whole server
        self._changed = asyncio.Condition()  # bound to the server's loop at first use

    async def changed(self) -> None:
        """Wake the open watches: the readiness has changed."""
        async with self._changed:
            self._changed.notify_all()

    def _current(self, service: str) -> ServingStatus:
        if service not in self._names:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self._readiness() is Readiness.READY:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    def _draining(self) -> bool:
        return self._readiness() is Readiness.DRAINING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in self._names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._current(request.service))

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        sent: int | None = None
        while True:
            async with self._changed:
                while (status := self._current(request.service)) == sent and not self._draining():
                    await self._changed.wait()
                ending = self._draining()
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if ending:
                return

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext) -> Any:
        statuses = {name: health_pb2.HealthCheckResponse(status=self._current(name)) for name in self._names}
        return health_pb2.HealthListResponse(statuses=statuses)
