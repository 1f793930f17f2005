"""What wraps every method the server registers: refusing undecodable requests as INVALID_ARGUMENT (not
gRPC's INTERNAL), and server reflection in both of its versions."""

from __future__ import annotations

import contextlib
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service.scheduler.metrics import ServerMetrics

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_reflection(server: grpc.Server, service_names: Sequence[str]) -> None:
    """Server reflection as v1alpha (grpcio-reflection) and v1: the messages are identical on the wire, and
    newer tools (grpcurl, Postman) ask for v1 first."""
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handlers = {"ServerReflectionInfo": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, handlers),))
    server.add_registered_method_handlers(REFLECTION_V1, handlers)


class _Malformed:
    """What a request that is not a valid message of its method deserializes to (see `validated`)."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.received = time.perf_counter()


UNAUTHENTICATED_MESSAGE = "missing or unknown bearer token: send the metadata `authorization: Bearer <token>`"


def authorized(context: grpc.aio.ServicerContext, tokens: tuple[bytes, ...]) -> bool:
    """Whether the call carries `authorization: Bearer <one of tokens>`; every token is compared, each in
    constant time, so the time taken says nothing of how much of a token was right."""
    given = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), "")
    scheme, _, token = str(given).partition(" ")
    if scheme.lower() != "bearer":
        return False
    # HTTP headers decode with surrogate escapes: a header of other bytes compares as the bytes it was.
    offered = token.strip().encode("utf-8", "surrogateescape")
    matched = False
    for known in tokens:
        matched |= hmac.compare_digest(offered, known)
    return matched


def validated(
    path: str, handler: grpc.RpcMethodHandler, metrics: ServerMetrics | None, tokens: tuple[bytes, ...] = ()
) -> grpc.RpcMethodHandler:
    """`handler`, answering UNAUTHENTICATED to a call without one of `tokens` (when there are any) and
    INVALID_ARGUMENT to request bytes that are no valid message of the method.

    gRPC itself answers undecodable requests INTERNAL ("Exception deserializing request!") and logs a
    traceback at ERROR: a client error reported as a server fault. Here the deserializer cannot fail; the
    method rejects what it could not parse before the servicer sees it (and counts it under its method, like
    other bad requests).
    """
    parse = handler.request_deserializer
    method = path.rsplit("/", 1)[-1]

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Malformed(
                f"{path}: the request is not a valid protobuf message for this method ({error})"
            )

    async def refuse(
        context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, since: float
    ) -> None:
        if metrics is not None:  # counted like every answered call
            metrics.answered(method, code.name, time.perf_counter() - since)
        await context.abort(code, message)

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        if tokens and not authorized(context, tokens):
            started = time.perf_counter()
            await refuse(context, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, started)
        if isinstance(request, _Malformed):
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message, request.received)

    # Every servicer here is asynchronous: ours, grpcio-health's and grpcio-reflection's aio ones.
    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        bidi = handler.stream_stream  # server reflection

        async def stream_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async def checked() -> AsyncIterator[Any]:
                async for request in requests:
                    await reject(request, context)
                    yield request

            async with contextlib.aclosing(bidi(checked(), context)) as messages:
                async for message in messages:
                    yield message

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
    if handler.request_streaming:
        return handler  # no client-streaming method is served
    if handler.response_streaming:
        streaming = handler.unary_stream
        if inspect.isasyncgenfunction(streaming):  # TranslateStream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await reject(request, context)
                async with contextlib.aclosing(streaming(request, context)) as messages:
                    async for message in messages:
                        yield message

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)

        async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            await reject(request, context)  # grpcio-health's Watch writes with context.write
            await streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream_writer, deserialize, serialize)
    unary = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await reject(request, context)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)


class Registrar:
    """Stands in for the grpc.Server given to the generated `add_*_to_server` functions: every method they
    register goes through `validated`."""

    def __init__(
        self,
        server: grpc.Server,
        metrics: ServerMetrics | None,
        tokens: tuple[bytes, ...] = (),
        open_methods: frozenset[str] = frozenset(),
    ) -> None:
        self._server = server
        self._metrics = metrics
        self._tokens = tokens  # calls must carry one of them (none: no check)
        self._open = open_methods  # "/service/method" paths that need no token (health-like probes)
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)  # the same methods come again through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {
            name: validated(
                f"/{service}/{name}",
                handler,
                self._metrics,
                () if f"/{service}/{name}" in self._open else self._tokens,
            )
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
        self._generic = [h for h in self._generic if getattr(h, "service_name", lambda: None)() != service]

    def flush(self) -> None:
        """Generic handlers that were not also registered method by method pass through unchanged."""
        if self._generic:
            self._server.add_generic_rpc_handlers(tuple(self._generic))
            self._generic = []
