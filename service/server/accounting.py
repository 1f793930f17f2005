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
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import grpc

from service.scheduler.metrics import TRANSLATION_METHODS, ServerMetrics
from service.scheduler.status import RequestFailed, Status
from service.server import tracing
from service.server.answer_writes import ClientGone, SlowReader, write
from service.server.runtime import ENDED_CODE, Runtime, ended_by_deadline

log = logging.getLogger("translator.rpc")

GRPC_CODES: dict[Status, grpc.StatusCode] = {status: grpc.StatusCode[status.name] for status in Status}


Handler = TypeVar("Handler", bound=Callable[..., Any])


def _record(metrics: ServerMetrics, method: str, code: Status, start: float) -> None:
    metrics.inflight.dec()
    try:
        tracing.end_call(code.name)
    except Exception:  # a trace is never worth a call
        log.exception("recording the trace of a %s call", method)
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
    try:
        await context.abort(GRPC_CODES[failure.code], failure.message)
    except grpc.aio.AbortError:  # the status is sent: how grpc.aio ends an aborted handler
        raise
    except Exception:  # the status could not be sent: the client went away meanwhile (a slow reader's end)
        log.info("the client went away before its %s status was sent", failure.code.name)
        raise asyncio.CancelledError from None


def _unexpected(method: str, error: Exception) -> RequestFailed:
    log.exception("unexpected error in %s", method)
    return RequestFailed(Status.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def _slot(runtime: Runtime, limited: bool) -> Any:
    return runtime.translation_slot() if limited else nullcontext()


def _in_span(method: str, handler: Handler, call: Callable[..., Any]) -> Handler:
    """`call` as the handler's wrapper, inside the call's trace span when tracing is on."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if tracing.enabled():
            with tracing.call_span(method, context):
                return await call(self, request, context)
        return await call(self, request, context)

    return wrapper  # type: ignore[return-value]


def tracked(method: str, limited: bool = False) -> Callable[[Handler], Handler]:
    """For unary handlers `async def M(self, request, context)`, where `self.runtime` is the Runtime;
    `limited`: a translation call, which needs one of the --max-concurrent-rpcs slots."""

    def decorate(handler: Handler) -> Handler:
        async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
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

        return _in_span(method, handler, call)

    return decorate


def tracked_stream(method: str, limited: bool = False) -> Callable[[Handler], Handler]:
    """For server-streaming handlers (async generators) `async def M(self, request, context)`; `limited` as
    in `tracked`, the slot held until the stream ends.

    The wrapper writes the messages itself (service.server.answer_writes): a client that stops reading loses
    its call after --write-timeout-s instead of keeping its slot, and one that goes away mid-answer is logged
    once, without a traceback."""

    def decorate(handler: Handler) -> Handler:
        async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
            runtime: Runtime = self.runtime
            metrics = runtime.metrics
            metrics.inflight.inc()
            start = time.perf_counter()
            code, written = Status.OK, 0
            # What to answer once the call's objects are let go: an exception kept here would keep, through
            # its traceback, the frame that holds the answer message while the abort waits for the client.
            failed: RequestFailed | None = None
            try:
                with _slot(runtime, limited):
                    async with contextlib.aclosing(handler(self, request, context)) as messages:
                        async for message in messages:
                            await write(
                                context, message, runtime.answers, runtime.config.write_timeout_s, written
                            )
                            written += 1
            except SlowReader as stalled:
                code, failed = Status.DEADLINE_EXCEEDED, RequestFailed(Status.DEADLINE_EXCEEDED, str(stalled))
                metrics.unread_answers.labels(method=method, reason="slow_reader").inc()
                log.warning("%s: %s", method, stalled)
            except (ClientGone, asyncio.CancelledError):  # the client went away, or the deadline passed
                code = _ended_code(context)
                if written and code is Status.CANCELLED:
                    metrics.unread_answers.labels(method=method, reason="client_gone").inc()
                    log.info("%s: the client went away after %d messages", method, written)
                # gRPC ended the call: it then sends no status (a status sent on an ended call fails).
                raise asyncio.CancelledError from None
            except RequestFailed as failure:
                code, failed = _failed_code(context, failure), RequestFailed(failure.code, failure.message)
            except Exception as other:
                failure = _unexpected(method, other)
                code, failed = _failed_code(context, failure), RequestFailed(failure.code, failure.message)
            finally:
                _record(metrics, method, code, start)
            if failed is not None:
                message = None  # noqa: F841 (the last message written, or being written: not kept waiting)
                # Slot, job and answer are freed by now. For a slow reader the status waits in gRPC until the
                # client reads on (it gets it after the messages gRPC holds) or goes away.
                await _abort(context, failed)

        return _in_span(method, handler, call)

    return decorate
