"""The server's state and the one path of a translation call: the served model, readiness, the call's
slot, its job in the scheduler, its deadline and cancellation. No gRPC status code is decided here: failures
are the scheduler's `RequestFailed`, turned into gRPC statuses by service.server.accounting.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from service.core.options import TranslateOptions
from service.core.vocabulary import EncodedText
from service.engine.engine import Engine
from service.scheduler.batcher import Batcher
from service.scheduler.job import STREAM_END, Job, TextResult
from service.scheduler.metrics import ServerMetrics
from service.scheduler.status import RequestFailed, Status
from service.server.answer_writes import UnreadAnswers
from service.server.config import ServerConfig
from service.server.requests import Limits, longer_than_training
from service.server.tracing import CALL_TIMES, CallTimes, enabled

log = logging.getLogger("translator.rpc")

Answer = TypeVar("Answer")

# time_remaining() of a call without deadline is infinite or absurdly far away.
_NO_DEADLINE_S = 1e8


class Readiness(Enum):
    """The server's one state, read by health, KServe's readiness calls and every translation call."""

    LOADING = "loading"  # ports bound, model loading or warming up: translation calls get UNAVAILABLE
    READY = "ready"
    DRAINING = "draining"  # shutting down: in-flight calls finish, new ones get UNAVAILABLE


@dataclass
class Runtime:
    """The served model and the machinery around it; `engine` and `batcher` are set once loading is done."""

    config: ServerConfig
    metrics: ServerMetrics
    limits: Limits | None = None
    engine: Engine | None = None
    batcher: Batcher | None = None
    readiness: Readiness = Readiness.LOADING
    answers: UnreadAnswers = field(init=False, repr=False)  # stream messages their clients have not taken
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)
    _transition: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.config.max_concurrent_rpcs)
        self.answers = UnreadAnswers(self.config.max_unread_bytes)
        self.metrics.unread_bytes.set_function(lambda: self.answers.held_bytes)

    def become_ready(self) -> bool:
        """LOADING -> READY; False (and no change) once draining has begun: a server never comes back."""
        with self._transition:
            if self.readiness is not Readiness.LOADING:
                return False
            self.readiness = Readiness.READY
            return True

    def begin_draining(self) -> None:
        with self._transition:
            self.readiness = Readiness.DRAINING

    @contextmanager
    def translation_slot(self) -> Iterator[None]:
        """One of the --max-concurrent-rpcs translation calls, or RESOURCE_EXHAUSTED at once.

        The slots bound the work queued for the batcher and leave some of gRPC's --grpc-max-calls for health
        checks, metadata and these refusals.
        """
        if not self._slots.acquire(blocking=False):
            limit = self.config.max_concurrent_rpcs
            raise RequestFailed(
                Status.RESOURCE_EXHAUSTED,
                f"too many calls: max_concurrent_rpcs={limit} translation calls are in flight; retry later",
            )
        try:
            yield
        finally:
            self._slots.release()

    @property
    def ready(self) -> bool:
        return self.readiness is Readiness.READY

    def serving(self) -> tuple[Engine, Batcher, Limits]:
        """The loaded model, or UNAVAILABLE while it loads or after shutdown began."""
        if self.readiness is Readiness.DRAINING:
            raise RequestFailed(Status.UNAVAILABLE, "the server is shutting down")
        if not self.ready or self.engine is None or self.batcher is None or self.limits is None:
            raise RequestFailed(Status.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.engine, self.batcher, self.limits

    def check_size(self, response: Message) -> None:
        """gRPC would fail an oversized answer with a bare error; say what to change instead."""
        self.check_bytes(response.ByteSize())

    def check_bytes(self, size: int, at_least: bool = False) -> None:
        """An answer of `size` bytes (`at_least`: a lower bound, known before any work) must fit
        max_message_bytes."""
        if size > self.config.max_message_bytes:
            bound = "at least " if at_least else ""
            raise RequestFailed(
                Status.RESOURCE_EXHAUSTED,
                f"the answer would be {bound}{size} bytes, more than max_message_bytes="
                f"{self.config.max_message_bytes}; ask for fewer texts, attention kinds, layers "
                "or heads",
            )


def deadline_of(context: grpc.aio.ServicerContext, extra_timeout_s: float | None = None) -> float | None:
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


Shape = TypeVar("Shape")


@dataclass(frozen=True)
class Work(Generic[Shape]):
    """What a translation call asks of the batcher, once its request passed the checks, and the shape of the
    answer its API builds from the results (translator.v1: the attention maps; KServe: the outputs)."""

    sources: list[EncodedText]
    options: TranslateOptions
    answer: Shape
    timeout_s: float | None = None  # a deadline of the request's own, besides gRPC's (KServe's `timeout`)


class LoopEvents:
    """A streaming job's token events, handed from the batcher's threads to the RPC's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()

    def put(self, item: int | None) -> None:
        _call_soon(self._loop, self._queue.put_nowait, item)

    async def get(self) -> int | None:
        return await self._queue.get()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    """`callback(*args)` on the loop's thread, from any thread; nothing once the loop is closed (the server
    stopped: nobody waits any more)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# How the running call's job ended when gRPC ended the call first (set by `Submitted` as it drops the job):
# the status recorded for the call is the one its dropped sentences are counted under, decided once.
ENDED_CODE: contextvars.ContextVar[Status | None] = contextvars.ContextVar("ended_code", default=None)


def ended_by_deadline(context: grpc.aio.ServicerContext) -> bool:
    """Whether gRPC ended the call at its deadline (rather than the client cancelling it)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


@dataclass(frozen=True)
class Submitted:
    """A translation call's job, queued in the batcher. Use it as a context manager around the waiting:
    however the call ends (client cancel, gRPC's deadline, an error), its job does not outlive it."""

    engine: Engine
    batcher: Batcher
    job: Job
    work: Work[Any]
    context: grpc.aio.ServicerContext
    times: CallTimes | None = None  # filled in for the call's trace (tracing on only)

    def __enter__(self) -> Submitted:
        return self

    def __exit__(self, *exc_info: object) -> None:
        job = self.job
        if job.finished:
            if job.error is not None and job.error.code == Status.DEADLINE_EXCEEDED:
                # Our timer expired the job at its deadline, then the client's cancel (its side of the same
                # deadline, which it may see first) ended the call: recorded as its sentences were dropped.
                ENDED_CODE.set(Status.DEADLINE_EXCEEDED)
            return
        if (job.deadline is not None and time.monotonic() >= job.deadline) or ended_by_deadline(self.context):
            ENDED_CODE.set(Status.DEADLINE_EXCEEDED)
            self.batcher.expire(job)
        else:
            ENDED_CODE.set(Status.CANCELLED)
            self.batcher.abandon(job, Status.CANCELLED, "the client cancelled the call", reason="cancelled")

    async def answer(self, build: Callable[[list[TextResult]], Answer]) -> Answer:
        """Wait for the job (until the deadline), then turn its results, in text order, into the call's answer
        with `build`; raise RequestFailed if it failed.

        With attention maps the post-processing (trimming the maps, copying them into messages) takes tens of
        milliseconds for a large request (64 long texts, every map: ~45 ms, 5.4 MB): it then runs on a worker
        thread, so that the event loop is not held for all of it (gRPC still serializes the answer on the
        loop)."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        self.job.add_done_callback(functools.partial(_call_soon, loop, _resolve, answered))
        timer = self._deadline_timer(loop)
        try:
            await answered
        finally:
            if timer is not None:
                timer.cancel()
        times = self.times
        if times is not None:
            times.answered_at = time.monotonic()

        def finish() -> Answer:
            return build(self.job.outcome())

        answer = await asyncio.to_thread(finish) if self._has_maps() else finish()
        if times is not None:
            times.built_at = time.monotonic()
        return answer

    def _has_maps(self) -> bool:
        """Maps asked for, or sampled for the attention metrics (--quality-sample-rate: the entropy of each
        cross-attention map is computed while the job is finished)."""
        return self.job.options.needs_attention or any(
            raw is not None and raw.hypothesis.cross_attention is not None for raw in self.job.raw
        )

    async def tokens(self) -> AsyncIterator[int]:
        """A streaming job's token ids as the worker generates them; ends when the job is answered (then
        `answer()` gives the rest); at the deadline the job is expired, which ends it."""
        events = self.job.events
        assert isinstance(events, LoopEvents), "not a streaming job"
        timer = self._deadline_timer(asyncio.get_running_loop())
        try:
            while (token_id := await events.get()) is not STREAM_END:
                yield token_id
        finally:
            if timer is not None:
                timer.cancel()

    def _deadline_timer(self, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
        deadline = self.job.deadline
        if deadline is None:
            return None
        return loop.call_later(max(deadline - time.monotonic(), 0.0), self.batcher.expire, self.job)


def submit_job(
    runtime: Runtime,
    context: grpc.aio.ServicerContext,
    prepare: Callable[[Engine, Limits], Work[Any]],
    *,
    stream: bool = False,
) -> Submitted:
    """The one path of every translation call (Translate, TranslateStream, ModelInfer): arrival -> the
    served model -> the request's checks (`prepare`) -> Job -> submit; the caller then waits with
    `answer()` or `tokens()` inside `with submitted:`. Call it from the call's coroutine.

    A refused submit (RESOURCE_EXHAUSTED, UNAVAILABLE) leaves nothing to abandon. A call that ends while its
    job is queued (grpc.aio cancels the coroutine at its first await) has it abandoned by `Submitted`.
    """
    arrival = time.monotonic()
    engine, batcher, limits = runtime.serving()
    work = prepare(engine, limits)
    job = Job(
        work.sources,
        work.options,
        arrival=arrival,
        deadline=deadline_of(context, work.timeout_s),
        stream=stream,
        events=LoopEvents(asyncio.get_running_loop()) if stream else None,
    )
    batcher.submit(job)
    for source in work.sources:  # what the model was not trained for, counted once per text for every API
        if longer_than_training(engine, len(source.ids)):
            runtime.metrics.beyond_training.labels(reason="longer").inc()
        if source.unknown_words:
            runtime.metrics.beyond_training.labels(reason="unknown_words").inc()
    times = None
    if enabled():
        times = CallTimes(job)
        CALL_TIMES.set(times)
    return Submitted(engine, batcher, job, work, context, times)
