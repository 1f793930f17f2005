"""grpc.health.v1 for the server: Check, Watch and List, following the server's readiness."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: Check, Watch and List (grpcio-health-checking's servicer lacks List: its stub raises
    NotImplementedError, UNIMPLEMENTED and an ERROR with a traceback in the log per call).

    Unlike that servicer, a Watch ends (OK) once shutdown has begun and NOT_SERVING has been sent: left open,
    one watching client (gRPC's client-side health checking) held the server for the whole grace period. The
    client then reconnects and is refused, as every new call is while draining. No lock is held while a
    status is written, so a watcher that does not read cannot stall `set` for the others."""

    def __init__(self, service_names: tuple[str, ...] = ()) -> None:
        self._service_names = service_names  # besides "" (the whole server), what List reports
        self._statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {
            "": health_pb2.HealthCheckResponse.SERVING
        }
        self._changed = asyncio.Condition()  # bound to the server's loop at first use
        self._shutting_down = False

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        """Set a service's status; ignored once shutdown has begun (it stays NOT_SERVING)."""
        async with self._changed:
            if not self._shutting_down:
                self._statuses[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; the open watches send it and end."""
        async with self._changed:
            self._shutting_down = True
            for service in self._statuses:
                self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        sent: int | None = None
        while True:
            async with self._changed:
                while (status := self._current(request.service)) == sent and not self._shutting_down:
                    await self._changed.wait()
                ending = self._shutting_down
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if ending:
                return

    def _current(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext) -> Any:
        names = ("", *self._service_names)
        statuses = {name: health_pb2.HealthCheckResponse(status=self._current(name)) for name in names}
        return health_pb2.HealthListResponse(statuses=statuses)
