"""OpenTelemetry traces of the server's calls: off unless `--otlp-endpoint` (or a test) turns them on.

A call's span continues the caller's W3C trace context: the `traceparent` / `tracestate` gRPC metadata, or
the same HTTP headers over REST. A translation call's span gets children made when the call ends, from the
times the scheduler and the engine recorded anyway: per text `queue` (arrival -> its batch starts), `encode`
(-> its batch's encoder finished) and `decode` (-> its row is done; the steps as an attribute), and one
`answer` (the job done -> the answer built). Nothing is timed twice and no step is slowed down.

Off (the default), the call wrappers test one module-level name and nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.scheduler.job import Job

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("translator.server")

SERVICE_NAME = "translator"
PROPAGATED = ("traceparent", "tracestate")
EXPORT_TIMEOUT_S = 2.0

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


@dataclass
class CallTimes:
    """What a translation call's trace is made of, filled in as the call runs (time.monotonic() clock)."""

    job: Job | None = None
    answered_at: float | None = None  # the job was done and the waiting call woke up
    built_at: float | None = None  # its answer was built


# The running call's times, set by its translation path (runtime.submit_job) when tracing is on.
CALL_TIMES: contextvars.ContextVar[CallTimes | None] = contextvars.ContextVar("call_times", default=None)


def enabled() -> bool:
    return _tracer is not None


def enable(
    endpoint: str | None = None, exporter: SpanExporter | None = None, sample_rate: float = 1.0
) -> None:
    """Trace calls: spans to OTLP/HTTP at `endpoint` (batched, in the background), or to `exporter` (tests:
    an in-memory one, each span as it ends). A caller's sampling decision is kept; a call without one is
    sampled at `sample_rate`."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}),
        sampler=ParentBased(TraceIdRatioBased(sample_rate)),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # A collector that is down must not hold the server: each export gives up after EXPORT_TIMEOUT_S.
        exporter_ = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
        processor = BatchSpanProcessor(exporter_, export_timeout_millis=int(EXPORT_TIMEOUT_S * 1000))
        provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("translator.server")


def disable() -> None:
    """Stop tracing; spans not yet exported are flushed first."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        # Bounded: a shutdown behind an unreachable collector is left to finish in the background.
        closing = threading.Thread(target=provider.shutdown, name="trace-export-shutdown", daemon=True)
        closing.start()
        closing.join(EXPORT_TIMEOUT_S + 1.0)


@contextlib.contextmanager
def call_span(method: str, context: Any) -> Iterator[Span | None]:
    """The span of one call (the current span inside), continuing the caller's trace context; None when
    tracing is off."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {key: value for key, value in (context.invocation_metadata() or ()) if key in PROPAGATED}
    parent = TraceContextTextMapPropagator().extract(carrier)
    protocol = getattr(context, "protocol", "grpc")
    with tracer.start_as_current_span(
        method, context=parent, kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False,
        attributes={"rpc.system": protocol, "rpc.method": method},
    ) as span:  # fmt: skip
        yield span


def end_call(code: str) -> None:
    """Give the current call's span its status and, for a translation call, its stages."""
    if _tracer is None:
        return
    times = CALL_TIMES.get()
    from opentelemetry.trace import Status, StatusCode, get_current_span

    span = get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.status_code", code)
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, code))
    if times is not None and times.job is not None:
        _stages(_tracer, times)


def _stages(tracer: Tracer, times: CallTimes) -> None:
    job = times.job
    assert job is not None
    # monotonic seconds -> the epoch nanoseconds OpenTelemetry wants
    offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(seconds: float) -> int:
        return int(seconds * 1e9) + offset_ns

    def child(name: str, start: float, end: float, attributes: dict[str, Any]) -> None:
        span = tracer.start_span(name, start_time=ns(start), attributes=attributes)
        span.end(end_time=ns(max(end, start)))

    for index, raw in enumerate(job.raw):
        if raw is None:  # dropped (deadline, cancel): its stages never ran
            continue
        started = job.arrival + raw.queue_ms / 1000
        done = started + raw.compute_ms / 1000
        attributes = {"translator.text": index}
        child("queue", job.arrival, started, attributes)
        encoded = raw.hypothesis.encoded_at
        if encoded is not None and started <= encoded <= done:
            child("encode", started, encoded, attributes)
            steps = len(raw.hypothesis.tokens) + int(raw.hypothesis.finished)
            child("decode", encoded, done, {**attributes, "translator.steps": steps})
        else:
            child("compute", started, done, attributes)
    if times.answered_at is not None and times.built_at is not None:
        child("answer", times.answered_at, times.built_at, {"translator.texts": len(job.raw)})


def metadata_of(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The trace-context entries of HTTP headers, named as gRPC metadata names them (lower case)."""
    return [(key.lower(), value) for key, value in headers if key.lower() in PROPAGATED]
