"""What every RPC handler shares: the server's runtime state, call accounting and deadline/cancel wiring.

Handlers raise `RequestFailed`; the `tracked` wrappers turn it into the gRPC status, record the request
metrics by method and code, and keep the in-flight gauge right whatever happens.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from service.batcher import Batcher, Job
from service.config import ServerConfig
from service.engine import Engine
from service.errors import RequestFailed
from service.metrics import ServerMetrics
from service.requests import Limits

log = logging.getLogger("translator.rpc")

# time_remaining() of a call without deadline is infinite or absurdly far away.
_NO_DEADLINE_S = 1e8


@dataclass
class Runtime:
    """The served model and the machinery around it; `engine` and `batcher` are set once loading is done."""

    config: ServerConfig
    metrics: ServerMetrics
    limits: Limits | None = None
    engine: Engine | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False

    def serving(self) -> tuple[Engine, Batcher, Limits]:
        """The loaded model, or UNAVAILABLE while it loads or after shutdown began."""
        if self.draining:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if not self.ready or self.engine is None or self.batcher is None or self.limits is None:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.engine, self.batcher, self.limits

    def check_size(self, response: Message) -> None:
        """gRPC would fail an oversized answer with a bare error; say what to change instead."""
        size = response.ByteSize()
        if size > self.config.max_message_bytes:
            raise RequestFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer would be {size} bytes, more than max_message_bytes="
                f"{self.config.max_message_bytes}; ask for fewer texts, attention kinds, layers "
                "or heads",
            )


def deadline_of(context: grpc.ServicerContext, extra_timeout_s: float | None = None) -> float | None:
    """The call's deadline on the time.monotonic() clock (None: none), the tighter of gRPC's and extra's."""
    remaining = context.time_remaining()
    candidates = (
        [remaining]
        if remaining is not None and math.isfinite(remaining) and remaining < _NO_DEADLINE_S
        else []
    )
    if extra_timeout_s is not None:
        candidates.append(extra_timeout_s)
    return time.monotonic() + min(candidates) if candidates else None


def watch(job: Job, batcher: Batcher, context: grpc.ServicerContext) -> None:
    """Abandon the job when the call ends early (client cancel, or gRPC enforcing the deadline itself)."""

    def on_termination() -> None:
        if job.finished:
            return
        if job.deadline is not None and time.monotonic() >= job.deadline:
            batcher.expire(job)
        else:
            batcher.abandon(
                job, grpc.StatusCode.CANCELLED, "the client cancelled the call", reason="cancelled"
            )

    if not context.add_callback(on_termination):
        on_termination()  # the call already ended


Handler = TypeVar("Handler", bound=Callable[..., Any])


def _record(metrics: ServerMetrics, method: str, code: grpc.StatusCode, start: float) -> None:
    metrics.inflight.dec()
    metrics.requests.labels(method=method, code=code.name).inc()
    metrics.request_duration.labels(method=method, code=code.name).observe(time.perf_counter() - start)


def _unexpected(method: str, error: Exception) -> RequestFailed:
    log.exception("unexpected error in %s", method)
    return RequestFailed(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def tracked(method: str) -> Callable[[Handler], Handler]:
    """For unary handlers `def M(self, request, context)`, where `self.runtime` is the Runtime."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            metrics: ServerMetrics = self.runtime.metrics
            metrics.inflight.inc()
            start = time.perf_counter()
            try:
                response = handler(self, request, context)
            except RequestFailed as failure:
                error = failure
            except Exception as other:
                error = _unexpected(method, other)
            else:
                _record(
                    metrics,
                    method,
                    grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED,
                    start,
                )
                return response
            _record(metrics, method, error.code, start)
            context.abort(error.code, error.message)

        return wrapper  # type: ignore[return-value]

    return decorate


def tracked_stream(method: str) -> Callable[[Handler], Handler]:
    """For server-streaming handlers (generators) `def M(self, request, context)`."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            metrics: ServerMetrics = self.runtime.metrics
            metrics.inflight.inc()
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                yield from handler(self, request, context)
            except GeneratorExit:  # gRPC closes the generator when the client goes away
                code = grpc.StatusCode.CANCELLED
                raise
            except RequestFailed as failure:
                code = failure.code
                context.abort(failure.code, failure.message)
            except Exception as other:
                failure = _unexpected(method, other)
                code = failure.code
                context.abort(failure.code, failure.message)
            finally:
                _record(metrics, method, code, start)

        return wrapper  # type: ignore[return-value]

    return decorate
