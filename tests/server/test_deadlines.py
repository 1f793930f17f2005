"""Calls that end early: deadlines, cancellation, and how such calls and their sentences are counted."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.api.translator.v1 import translator_pb2 as pb
from service.core.options import TranslateOptions
from service.server.app import TranslatorServer
from service.server.config import ServerConfig
from tests.support.kserve import infer_request
from tests.support.metrics import scrape, value, wait_for_increase
from tests.support.server import Client, SlowBackend, running, slow_config, slow_engine
from tests.support.waiting import wait_for


def test_a_call_cancelled_while_queued_leaves_the_queue(tiny_repository: Path) -> None:
    engine, _ = slow_engine(tiny_repository)
    config = slow_config(tiny_repository, batch_workers=1)
    with running(config, engine=engine) as server:
        assert server.port and server.metrics_port and server.runtime.batcher
        batcher = server.runtime.batcher
        client = Client(server.port)
        before = scrape(server.metrics_port)

        # One 60-step batch (~1.2 s) holds the only worker; a call with another search waits behind it.
        busy = client.translator.Translate.future(
            pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=60)), timeout=30
        )
        wait_for(lambda: value(scrape(server.metrics_port), "translator_inflight_requests") == 1)
        options = pb.TranslateOptions(max_length=20, length_penalty=0.8)
        waiting = client.translator.Translate.future(
            pb.TranslateRequest(texts=["a dog"], options=options), timeout=30
        )
        wait_for(lambda: batcher.depth == 1, message="the second call to be queued")
        waiting.cancel()
        wait_for(lambda: batcher.depth == 0, message="the cancelled call to leave the queue")
        dropped = "translator_dropped_sentences_total"
        message = "its sentence dropped as cancelled"
        wait_for_increase(server.metrics_port, before, dropped, message, reason="cancelled", stage="queued")
        assert not busy.done() and len(busy.result().translations[0].target_tokens) == 60
        message = "the call counted as CANCELLED"
        requests = "translator_requests_total"
        wait_for_increase(
            server.metrics_port, before, requests, message, method="Translate", code="CANCELLED"
        )
        client.close()


def test_deadline_exceeded_frees_queued_and_running_work(slow: tuple[TranslatorServer, SlowBackend]) -> None:
    server, backend = slow
    assert server.port and server.metrics_port and server.runtime.batcher
    client = Client(server.port)
    before = scrape(server.metrics_port)
    earlier_steps = backend.steps  # the warm-up (and earlier tests) decoded through this backend too
    with ThreadPoolExecutor(1) as pool:
        # A long request occupies the worker; one with other options and a short deadline waits behind it.
        busy = pool.submit(
            client.translator.Translate,
            pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=25)),
            timeout=30,
        )
        wait_for(lambda: backend.steps > earlier_steps, message="decoding to start")
        with pytest.raises(grpc.RpcError) as failure:
            client.translator.Translate(
                pb.TranslateRequest(
                    texts=["a dog"], options=pb.TranslateOptions(max_length=26, length_penalty=0.9)
                ),
                timeout=0.15,
            )
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server.runtime.batcher.depth == 0, message="the queue to empty")  # type: ignore[union-attr]
        assert len(busy.result().translations[0].target_tokens) == 25
    # A request whose deadline passes during decoding has its rows dropped: the steps stop.
    with pytest.raises(grpc.RpcError) as failure:
        client.translator.Translate(
            pb.TranslateRequest(texts=["the big dog"], options=pb.TranslateOptions(max_length=200)),
            timeout=0.3,
        )
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def dropped_while_decoding() -> float:
        return value(
            scrape(server.metrics_port),
            "translator_dropped_sentences_total",
            reason="deadline_exceeded",
            stage="decoding",
        )

    baseline = value(
        before, "translator_dropped_sentences_total", reason="deadline_exceeded", stage="decoding"
    )
    # On a busy machine the worker may notice the deadline a little late: wait for the drop, then the steps
    # must stand still.
    wait_for(lambda: dropped_while_decoding() - baseline == 1, message="the decoding rows to be dropped")
    time.sleep(0.05)  # a step already under way when the rows were dropped still ends
    steps = backend.steps
    time.sleep(0.2)
    assert backend.steps == steps
    after = scrape(server.metrics_port)
    for stage in ("queued", "decoding"):
        dropped = value(after, "translator_dropped_sentences_total", reason="deadline_exceeded", stage=stage)
        assert (
            dropped
            - value(before, "translator_dropped_sentences_total", reason="deadline_exceeded", stage=stage)
            == 1
        ), stage
    assert value(after, "translator_queue_depth_sentences") == 0
    # KServe clients set Triton's `timeout` parameter (microseconds) rather than a gRPC deadline.
    with pytest.raises(grpc.RpcError) as failure:
        client.kserve.ModelInfer(infer_request(["the big dog"], max_length=200, timeout=100_000), timeout=10)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client.close()


class PastDeadlineContext:
    """What a handler's context looks like once gRPC has ended the call at its deadline."""

    def __init__(self) -> None:
        self.aborted: list[grpc.StatusCode] = []

    def time_remaining(self) -> float:
        return 0.0

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append(code)
        raise AssertionError("aborted a call that gRPC had already ended")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_failure_found_after_the_deadline_is_not_sent_again(streaming: bool) -> None:
    """gRPC answered DEADLINE_EXCEEDED already: aborting again makes it log an error for a timeout."""
    import asyncio

    from service.scheduler.metrics import ServerMetrics
    from service.scheduler.status import RequestFailed, Status
    from service.server.accounting import tracked, tracked_stream
    from service.server.runtime import Runtime

    class Servicer:
        def __init__(self) -> None:
            self.runtime = Runtime(config=ServerConfig(), metrics=ServerMetrics())

        @tracked("Translate")
        async def unary(self, request: Any, context: Any) -> Any:
            raise RequestFailed(Status.DEADLINE_EXCEEDED, "the deadline passed while queued")

        @tracked_stream("TranslateStream")
        async def stream(self, request: Any, context: Any) -> Any:
            raise RequestFailed(Status.DEADLINE_EXCEEDED, "the deadline passed while decoding")
            yield  # an async generator

    async def call(servicer: Servicer, context: PastDeadlineContext) -> None:
        if streaming:  # the wrapper writes the stream's messages itself (context.write)
            await servicer.stream(None, context)
        else:
            await servicer.unary(None, context)

    servicer, context = Servicer(), PastDeadlineContext()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call(servicer, context))
    assert context.aborted == []
    method = "TranslateStream" if streaming else "Translate"
    counted = servicer.runtime.metrics.requests.labels(method=method, code="DEADLINE_EXCEEDED")._value.get()
    assert counted == 1


class BeforeDeadlineContext(PastDeadlineContext):
    """A handler's context when the client's cancel arrives just before the server's copy of the deadline."""

    def time_remaining(self) -> float:
        return 0.005


def test_a_call_its_deadline_timer_dropped_counts_as_deadline_exceeded() -> None:
    """The server's timer expires the job at its deadline; the client, at its side of the same deadline, then
    cancels the call before the server's clock has passed it. The call is recorded DEADLINE_EXCEEDED, the
    reason its sentence was dropped for (it was recorded CANCELLED: 1 run in ~8 of
    tests/system/test_faults.py::test_deadlines_shorter_than_the_queue_wait saw the counts disagree)."""
    import asyncio

    from service.scheduler.job import Job
    from service.scheduler.metrics import ServerMetrics
    from service.server.accounting import tracked
    from service.server.runtime import Runtime, Submitted, Work
    from tests.support.fake_engine import make, source

    batcher, engine, batcher_metrics = make()

    class Servicer:
        def __init__(self) -> None:
            self.runtime = Runtime(config=ServerConfig(), metrics=ServerMetrics())

        @tracked("Translate")
        async def unary(self, request: Any, context: Any) -> Any:
            job = Job([source(4)], TranslateOptions(), deadline=time.monotonic() + 0.001)
            batcher.submit(job)
            work = Work(job.sources, job.options, None)
            with Submitted(engine, batcher, job, work, context):  # type: ignore[arg-type]
                batcher.expire(job)  # what Submitted's deadline timer does
                raise asyncio.CancelledError  # grpc.aio ending the call on the client's cancel

    servicer = Servicer()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(servicer.unary(None, BeforeDeadlineContext()))
    requests = servicer.runtime.metrics.requests
    assert requests.labels(method="Translate", code="DEADLINE_EXCEEDED")._value.get() == 1
    assert requests.labels(method="Translate", code="CANCELLED")._value.get() == 0
    dropped = batcher_metrics.dropped_sentences
    assert dropped.labels(reason="deadline_exceeded", stage="queued")._value.get() == 1


def test_cancelled_stream_stops_decoding(slow: tuple[TranslatorServer, SlowBackend]) -> None:
    server, backend = slow
    assert server.port and server.metrics_port
    client = Client(server.port)
    before = scrape(server.metrics_port)
    call = client.translator.TranslateStream(
        pb.TranslateStreamRequest(text="the small cat", options=pb.TranslateOptions(max_length=200))
    )
    received = [next(call) for _ in range(3)]
    assert [m.token.index for m in received] == [0, 1, 2]
    call.cancel()
    message = "the cancelled row to be dropped"
    dropped = "translator_dropped_sentences_total"
    wait_for_increase(server.metrics_port, before, dropped, message, reason="cancelled", stage="decoding")
    time.sleep(0.05)
    steps = backend.steps
    time.sleep(0.15)
    assert backend.steps == steps, "decoding went on after the client cancelled"
    after = scrape(server.metrics_port)
    assert value(after, "translator_generated_tokens_total") == value(
        before, "translator_generated_tokens_total"
    )
    wait_for(
        lambda: (
            value(
                scrape(server.metrics_port),
                "translator_requests_total",
                method="TranslateStream",
                code="CANCELLED",
            )
            >= 1
        ),
        message="the cancelled call to be counted",
    )
    client.close()
