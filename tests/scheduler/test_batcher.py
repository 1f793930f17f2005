"""The dynamic batcher against a fake engine: batch formation, limits, failures, deadlines, cancellation."""

from __future__ import annotations

import threading
import time

import pytest

from service.core.options import TranslateOptions
from service.scheduler.batcher import Batcher, BatchingSettings
from service.scheduler.job import STREAM_END, Job
from service.scheduler.metrics import ServerMetrics
from service.scheduler.status import RequestFailed, Status
from tests.support.fake_engine import FAIL, make, source


@pytest.fixture
def stop_batchers():
    made: list[Batcher] = []
    yield made
    for batcher in made:
        batcher.close(timeout=1.0)


def test_groups_similar_lengths_up_to_max_batch_size(stop_batchers: list[Batcher]) -> None:
    batcher, engine, metrics = make(max_batch_size=4)
    stop_batchers.append(batcher)
    jobs = [Job([source(n)], TranslateOptions()) for n in (3, 10, 4, 9, 3, 10, 4, 9)]
    for job in jobs:  # all queued before the worker starts: the grouping is deterministic
        batcher.submit(job)
    assert batcher.depth == 8
    batcher.start()
    for job in jobs:
        assert job.wait(5)
        assert job.outcome()[0].translation.text == " ".join(["5"] * (len(job.sources[0].ids) - 1))
    assert [sorted(b) for b in engine.batches] == [[3, 3, 4, 4], [9, 9, 10, 10]]
    assert batcher.depth == 0 and metrics.queue_depth._value.get() == 0


def test_token_budget_limits_padded_tokens(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(max_batch_size=64, max_batch_tokens=20)
    stop_batchers.append(batcher)
    job = Job([source(5) for _ in range(6)] + [source(12)], TranslateOptions())
    batcher.submit(job)
    batcher.start()
    assert job.wait(5)
    assert len(job.outcome()) == 7
    assert all(len(b) * max(b) <= 20 or len(b) == 1 for b in engine.batches)
    assert sorted(len(b) for b in engine.batches if 5 in b) == [2, 4]


def test_request_split_across_batches_comes_back_in_order(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(max_batch_size=2)
    stop_batchers.append(batcher)
    batcher.start()
    lengths = [7, 3, 5, 3, 7, 4]
    results = batcher.run(Job([source(n, first=10 + i) for i, n in enumerate(lengths)], TranslateOptions()))
    assert [r.translation.text.split()[0] for r in results] == [str(10 + i) for i in range(len(lengths))]
    assert len(engine.batches) == 3


def test_only_compatible_options_share_a_batch(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(max_batch_size=8)
    stop_batchers.append(batcher)
    jobs = [Job([source(4)], TranslateOptions(beam_size=1 + i % 2)) for i in range(4)]
    jobs.append(Job([source(4)], TranslateOptions(max_length=7)))
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    for job in jobs:
        assert job.wait(5) and job.error is None
    assert sorted(len(b) for b in engine.batches) == [1, 2, 2]


def test_waits_for_max_queue_delay_then_runs_alone(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(max_queue_delay_s=0.05)
    stop_batchers.append(batcher)
    batcher.start()
    (result,) = batcher.run(Job([source(4)], TranslateOptions()))
    assert 45 <= result.queue_ms < 1000
    assert engine.batches == [[4]]
    (urgent,) = batcher.run(Job([source(4)], TranslateOptions(), urgent=True))  # the warm-up does not wait
    assert urgent.queue_ms < 45


def test_engine_error_fails_only_that_batch_and_the_worker_goes_on(stop_batchers: list[Batcher]) -> None:
    batcher, _, metrics = make(max_batch_size=8)
    stop_batchers.append(batcher)
    bad = Job([source(4, first=FAIL)], TranslateOptions(beam_size=2))
    good = Job([source(4)], TranslateOptions())
    batcher.submit(bad)
    batcher.submit(good)
    batcher.start()
    assert bad.wait(5) and good.wait(5)
    with pytest.raises(RequestFailed) as failure:
        bad.outcome()
    assert failure.value.code == Status.INTERNAL and "boom" in failure.value.message
    assert good.outcome()[0].translation.text == "5 5 5"
    assert batcher.run(Job([source(3)], TranslateOptions()))[0].translation.text == "5 5"
    assert metrics.dropped_sentences.labels(reason="error", stage="decoding")._value.get() == 1


def test_full_queue_is_refused_at_once_and_abandoning_frees_it(stop_batchers: list[Batcher]) -> None:
    batcher, _, metrics = make(max_queue_size=4)
    stop_batchers.append(batcher)
    first = Job([source(4)] * 3, TranslateOptions())
    batcher.submit(first)
    with pytest.raises(RequestFailed) as failure:
        batcher.submit(Job([source(4)] * 2, TranslateOptions()))
    assert failure.value.code == Status.RESOURCE_EXHAUSTED
    assert "max_queue_size=4" in failure.value.message
    assert batcher.abandon(first, Status.CANCELLED, "gone", reason="cancelled")
    assert not batcher.abandon(first, Status.CANCELLED, "again", reason="cancelled")  # answered once
    assert batcher.depth == 0
    assert metrics.dropped_sentences.labels(reason="cancelled", stage="queued")._value.get() == 3
    batcher.submit(Job([source(4)] * 4, TranslateOptions()))


def test_deadline_drops_queued_and_running_work(stop_batchers: list[Batcher]) -> None:
    batcher, engine, metrics = make(step_s=0.01, max_batch_size=1)
    stop_batchers.append(batcher)
    batcher.start()
    # `long` runs and is dropped mid-decoding; `queued` waits behind it and is dropped from the queue.
    long = Job([source(60)], TranslateOptions(), deadline=time.monotonic() + 0.1)
    queued = Job([source(4)], TranslateOptions(), deadline=time.monotonic() + 0.05)
    batcher.submit(long)
    batcher.submit(queued)
    for job in (queued, long):
        batcher.wait(job)
        with pytest.raises(RequestFailed) as failure:
            job.outcome()
        assert failure.value.code == Status.DEADLINE_EXCEEDED
    assert batcher.depth == 0
    time.sleep(0.05)
    steps = engine.steps
    time.sleep(0.1)
    assert engine.steps == steps < 59  # decoding stopped well before the 59 steps of the long source
    assert metrics.dropped_sentences.labels(reason="deadline_exceeded", stage="queued")._value.get() == 1
    assert metrics.dropped_sentences.labels(reason="deadline_exceeded", stage="decoding")._value.get() == 1


def test_stream_events_then_end_and_cancel_stops_rows(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(step_s=0.01)
    stop_batchers.append(batcher)
    batcher.start()
    job = Job([source(5, first=7)], TranslateOptions(), stream=True)
    batcher.submit(job)
    assert job.events is not None
    events = []
    while (event := job.events.get(timeout=5)) is not STREAM_END:
        events.append(event)
    assert events == [7, 5, 5, 5]
    cancelled = Job([source(80)], TranslateOptions(), stream=True)
    batcher.submit(cancelled)
    assert cancelled.events is not None
    cancelled.events.get(timeout=5)
    batcher.abandon(cancelled, Status.CANCELLED, "client left", reason="cancelled")
    time.sleep(0.05)
    steps = engine.steps
    time.sleep(0.1)
    assert engine.steps == steps


def test_close_refuses_new_work_and_answers_everything(stop_batchers: list[Batcher]) -> None:
    batcher, _, _ = make(max_queue_delay_s=10.0)
    jobs = [Job([source(4)], TranslateOptions()) for _ in range(3)]
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    closer = threading.Thread(target=batcher.close, args=(2.0,))
    closer.start()
    closer.join(5)
    assert all(job.wait(0) and job.error is None for job in jobs)  # closing flushes without the long delay
    with pytest.raises(RequestFailed) as failure:
        batcher.submit(Job([source(4)], TranslateOptions()))
    assert failure.value.code == Status.UNAVAILABLE


def test_submit_refuses_a_job_already_answered(stop_batchers: list[Batcher]) -> None:
    batcher, engine, metrics = make()
    stop_batchers.append(batcher)
    batcher.start()
    job = Job([source(4)], TranslateOptions())
    # Its call ended before it was submitted: abandoning it answers it; it must never be queued afterwards.
    assert batcher.abandon(job, Status.CANCELLED, "client left", reason="cancelled")
    with pytest.raises(RequestFailed) as failure:
        batcher.submit(job)
    assert failure.value.code == Status.CANCELLED
    assert batcher.depth == 0
    time.sleep(0.05)  # longer than max_queue_delay: a queued job would have run by now
    assert engine.batches == []


def test_a_second_worker_starts_a_batch_while_the_first_runs(stop_batchers: list[Batcher]) -> None:
    """With two workers a short request arriving during a long batch does not wait for it to end."""
    batcher, engine, _ = make(step_s=0.01, max_batch_size=4, max_queue_delay_s=0.0, workers=2)
    stop_batchers.append(batcher)
    batcher.start()
    long_job = Job([source(60)], TranslateOptions())  # 59 steps of 10 ms
    batcher.submit(long_job)
    deadline = time.monotonic() + 5
    while engine.steps == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    started = time.monotonic()
    (short,) = batcher.run(Job([source(3)], TranslateOptions()))
    assert time.monotonic() - started < 0.3 and not long_job.finished
    assert short.translation.text == "5 5"
    assert long_job.wait(5) and long_job.outcome()[0].translation.text == " ".join(["5"] * 59)
    assert sorted(map(len, engine.batches)) == [1, 1]


def test_one_worker_runs_one_batch_at_a_time(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(step_s=0.01, max_batch_size=1, max_queue_delay_s=0.0)
    stop_batchers.append(batcher)
    batcher.start()
    long_job = Job([source(30)], TranslateOptions())
    batcher.submit(long_job)
    deadline = time.monotonic() + 5
    while engine.steps == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    batcher.run(Job([source(3)], TranslateOptions()))
    assert long_job.finished  # the short one waited for the long batch


def test_close_drains_every_worker(stop_batchers: list[Batcher]) -> None:
    batcher, _, _ = make(step_s=0.005, max_batch_size=1, max_queue_delay_s=0.0, workers=3)
    batcher.start()
    jobs = [Job([source(10)], TranslateOptions()) for _ in range(6)]
    for job in jobs:
        batcher.submit(job)
    batcher.close(timeout=5.0)
    assert all(job.finished and job.error is None for job in jobs)
    assert not any(thread.is_alive() for thread in batcher._threads)


class RecordingBackend:
    """Passes every call on and records how long each decoding step took, on which thread."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.step_s: dict[str, float] = {}

    def step(self, *args: object) -> object:
        start = time.perf_counter()
        result = self.inner.step(*args)  # type: ignore[attr-defined]
        name = threading.current_thread().name
        self.step_s[name] = self.step_s.get(name, 0.0) + time.perf_counter() - start
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_batch_over_two_lanes_is_timed_on_both(stop_batchers: list[Batcher]) -> None:
    """The encode/decode metrics of a batch split over lanes add the lane threads' time too."""
    from service.engine.engine import Engine
    from tests.conftest import DEFAULT_MODEL, DEFAULT_REPOSITORY

    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lanes=2)
    recorder = RecordingBackend(engine.runner.backend)
    engine.runner.backend = recorder  # type: ignore[assignment]
    metrics = ServerMetrics()
    settings = BatchingSettings(max_batch_size=16, max_queue_delay_s=0.0, workers=1)
    batcher = Batcher(engine, settings, metrics)
    stop_batchers.append(batcher)
    sources = engine.encode_texts(["the dog sees the cat"] * 4 + ["the big red dog sees the small cat"] * 4)
    job = Job(sources, TranslateOptions())
    batcher.submit(job)
    batcher.start()
    assert job.wait(30) and job.error is None
    batcher.wait_idle()
    assert len(recorder.step_s) == 2  # both lanes stepped, on two threads
    decode_sum = metrics.compute_duration.labels(stage="decode")._sum.get()
    assert decode_sum >= 0.99 * sum(recorder.step_s.values())
    assert metrics.compute_duration.labels(stage="encode")._sum.get() > 0


def test_a_short_text_is_answered_before_its_batchs_longest_is_done(stop_batchers: list[Batcher]) -> None:
    batcher, engine, _ = make(step_s=0.01, max_batch_size=4, max_queue_delay_s=0.05)
    stop_batchers.append(batcher)
    long_job, short_job = Job([source(60)], TranslateOptions()), Job([source(3)], TranslateOptions())
    batcher.submit(long_job)
    batcher.submit(short_job)
    batcher.start()
    assert short_job.wait(5)
    assert not long_job.finished  # still decoding: 59 steps of 10 ms
    (short,) = short_job.outcome()
    assert short.translation.text == "5 5" and short.compute_ms < 200
    assert long_job.wait(5)
    assert long_job.outcome()[0].compute_ms > short.compute_ms
    assert engine.batches == [[60, 3]]  # they did share one batch


class FailingBackend(RecordingBackend):
    """Raises on every decoding step from the `fail_from`-th on."""

    def __init__(self, inner: object, fail_from: int) -> None:
        super().__init__(inner)
        self.fail_from, self.calls = fail_from, 0

    def step(self, *args: object) -> object:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise RuntimeError("step exploded")
        return super().step(*args)


def test_an_engine_error_in_a_running_stream_fails_every_joined_request(stop_batchers: list[Batcher]) -> None:
    from service.engine.engine import Engine
    from tests.conftest import DEFAULT_MODEL, DEFAULT_REPOSITORY

    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=1)
    backend = FailingBackend(engine.runner.backend, fail_from=4)
    engine.runner.backend = backend  # type: ignore[assignment]
    metrics = ServerMetrics()
    settings = BatchingSettings(max_batch_size=8, max_queue_delay_s=0.0, iteration_batching=True)
    batcher = Batcher(engine, settings, metrics)
    stop_batchers.append(batcher)
    batcher.start()
    first = Job(engine.encode_texts(["the big red dog sees the small cat"]), TranslateOptions())
    batcher.submit(first)
    wait_until = time.monotonic() + 5
    while backend.calls < 2 and time.monotonic() < wait_until:
        time.sleep(0.001)
    second = Job(engine.encode_texts(["the cat"]), TranslateOptions())  # joins the running stream
    batcher.submit(second)
    for job in (first, second):
        assert job.wait(5)
        with pytest.raises(RequestFailed) as failure:
            job.outcome()
        assert failure.value.code == Status.INTERNAL and "step exploded" in failure.value.message
    backend.fail_from = 10**9  # the engine recovers: the worker goes on serving
    (result,) = batcher.run(Job(engine.encode_texts(["the cat"]), TranslateOptions()))
    assert result.translation.text


def test_done_callbacks_run_once_from_the_answering_thread_or_at_once(stop_batchers: list[Batcher]) -> None:
    """What the asyncio server waits on: each callback runs exactly once, when the job is answered (completed
    or abandoned), and a callback added to an answered job runs at once."""
    batcher, _, _ = make(step_s=0.01)
    stop_batchers.append(batcher)
    batcher.start()
    calls: list[tuple[str, str]] = []

    def recorder(name: str) -> object:
        return lambda: calls.append((name, threading.current_thread().name))

    done = Job([source(6)], TranslateOptions())
    done.add_done_callback(recorder("completed"))
    assert calls == []
    batcher.submit(done)
    assert done.wait(5)
    assert [name for name, _ in calls] == ["completed"]
    assert calls[0][1] != threading.current_thread().name  # the worker that delivered it
    done.add_done_callback(recorder("late"))
    assert calls[-1] == ("late", threading.current_thread().name)
    abandoned = Job([source(80)], TranslateOptions())
    abandoned.add_done_callback(recorder("abandoned"))
    batcher.submit(abandoned)
    batcher.abandon(abandoned, Status.CANCELLED, "client left", reason="cancelled")
    batcher.abandon(abandoned, Status.CANCELLED, "client left", reason="cancelled")
    time.sleep(0.05)  # the worker's next step sees the abandoned row: no second answer
    assert [name for name, _ in calls] == ["completed", "late", "abandoned"]


def test_a_streaming_job_puts_its_events_into_the_sink_it_was_given(stop_batchers: list[Batcher]) -> None:
    batcher, _, _ = make()
    stop_batchers.append(batcher)
    batcher.start()

    class Sink:
        def __init__(self) -> None:
            self.items: list[int | None] = []

        def put(self, item: int | None) -> None:
            self.items.append(item)

    sink = Sink()
    job = Job([source(4, first=7)], TranslateOptions(), stream=True, events=sink)
    batcher.submit(job)
    assert job.wait(5)
    assert job.events is sink and sink.items == [7, 5, 5, STREAM_END]


def test_streams_give_their_lane_process_up_to_a_waiting_worker(stop_batchers: list[Batcher]) -> None:
    """Two workers, one lane process: a running stream holds the lane, so while the other worker waits for
    it the stream takes nobody in and ends; no request waits for the whole run."""
    from service.engine.engine import Engine
    from tests.conftest import DEFAULT_MODEL, DEFAULT_REPOSITORY

    engine = Engine.load(
        DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=1, lanes=1, lane_processes=True
    )
    try:
        settings = BatchingSettings(
            max_batch_size=8, max_queue_delay_s=0.002, iteration_batching=True, workers=2
        )
        batcher = Batcher(engine, settings, ServerMetrics())
        stop_batchers.append(batcher)
        batcher.start()
        jobs: list[Job] = []
        answered: dict[int, float] = {}
        texts = ["the big red dog sees the small cat", "a cat", "the dog sees her"]
        stop_at = time.monotonic() + 3.0
        while time.monotonic() < stop_at:  # a steady stream of arrivals, well below what one lane can do
            index = len(jobs)
            job = Job(engine.encode_texts([texts[index % 3]]), TranslateOptions())
            job.add_done_callback(lambda index=index: answered.setdefault(index, time.monotonic()))
            batcher.submit(job)
            jobs.append(job)
            time.sleep(0.0025)
        for job in jobs:
            assert job.wait(10), "a request was never answered"
            job.outcome()
        waits = [answered[index] - job.arrival for index, job in enumerate(jobs)]
        assert max(waits) < 1.5, f"a request waited {max(waits):.2f} s of a 3 s run"
    finally:
        engine.close()
