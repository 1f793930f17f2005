"""Call accounting: our `Status` to gRPC's status code (once, here), and the wrappers every handler runs in.

Handlers raise `RequestFailed`; the `tracked` wrappers turn it into the gRPC status, record the request
metrics by method and code, and keep the in-flight gauge right whatever happens. Translation calls
(`limited=True`) also take one of the `--max-concurrent-rpcs` slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import grpc

from service.scheduler.metrics import TRANSLATION_METHODS, ServerMetrics
from service.scheduler.status import RequestFailed, Status
from service.server.runtime import ENDED_CODE, Runtime, ended_by_deadline

log = logging.getLogger("translator.rpc")

GRPC_CODES: dict[Status, grpc.StatusCode] = {status: grpc.StatusCode[status.name] for status in Status}


Handler = TypeVar("Handler", bound=Callable[..., Any])


def _record(metrics: ServerMetrics, method: str, code: Status, start: float) -> None:
    metrics.inflight.dec()
    metrics.answered(method, code.name, time.perf_counter() - start)
    if code is Status.OK and method in TRANSLATION_METHODS:
        metrics.last_inference_ms = int(time.time() * 1000)


def _ended_code(context: grpc.aio.ServicerContext) -> Status:
    """The status of a call that gRPC ended before its handler answered: as its job was dropped, if it had
    one (the deadline may pass between that and now), else from the deadline."""
    decided = ENDED_CODE.get()
    if decided is not None:
        return decided
    return Status.DEADLINE_EXCEEDED if ended_by_deadline(context) else Status.CANCELLED


def _failed_code(context: grpc.aio.ServicerContext, failure: RequestFailed) -> Status:
    """The status the client gets for a failed call: gRPC's own once the deadline has passed."""
    return Status.DEADLINE_EXCEEDED if ended_by_deadline(context) else failure.code


async def _abort(context: grpc.aio.ServicerContext, failure: RequestFailed) -> None:
    """End the call with the failure's status, unless gRPC already ended it at its deadline: aborting such a
    call makes gRPC log an error ("ExecuteBatchError") for what is a client's timeout."""
    if ended_by_deadline(context):
        raise asyncio.CancelledError
    await context.abort(GRPC_CODES[failure.code], failure.message)


def _unexpected(method: str, error: Exception) -> RequestFailed:
    log.exception("unexpected error in %s", method)
    return RequestFailed(Status.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def _slot(runtime: Runtime, limited: bool) -> Any:
    return runtime.translation_slot() if limited else nullcontext()


def tracked(method: str, limited: bool = False) -> Callable[[Handler], Handler]:
    """For unary handlers `async def M(self, request, context)`, where `self.runtime` is the Runtime;
    `limited`: a translation call, which needs one of the --max-concurrent-rpcs slots."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            runtime: Runtime = self.runtime
            metrics = runtime.metrics
            metrics.inflight.inc()
            start = time.perf_counter()
            try:
                with _slot(runtime, limited):
                    response = await handler(self, request, context)
            except RequestFailed as failure:
                error = failure
            except asyncio.CancelledError:  # the client cancelled, or gRPC enforced the deadline
                _record(metrics, method, _ended_code(context), start)
                raise
            except Exception as other:
                error = _unexpected(method, other)
            else:
                # A client that cancels after this point still counts as OK: grpc.aio has no is_active().
                _record(metrics, method, Status.OK, start)
                return response
            _record(metrics, method, _failed_code(context, error), start)
            await _abort(context, error)

        return wrapper  # type: ignore[return-value]

    return decorate


def tracked_stream(method: str, limited: bool = False) -> Callable[[Handler], Handler]:
    """For server-streaming handlers (async generators) `async def M(self, request, context)`; `limited` as
    in `tracked`, the slot held until the stream ends."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            runtime: Runtime = self.runtime
            metrics = runtime.metrics
            metrics.inflight.inc()
            start = time.perf_counter()
            code = Status.OK
            try:
                with _slot(runtime, limited):
                    async with contextlib.aclosing(handler(self, request, context)) as messages:
                        async for message in messages:
                            yield message
            except (GeneratorExit, asyncio.CancelledError):  # the client went away, or the deadline passed
                code = _ended_code(context)
                raise
            except RequestFailed as failure:
                code = _failed_code(context, failure)
                await _abort(context, failure)
            except Exception as other:
                failure = _unexpected(method, other)
                code = _failed_code(context, failure)
                await _abort(context, failure)
            finally:
                _record(metrics, method, code, start)

        return wrapper  # type: ignore[return-value]

    return decorate
