"""Dynamic batching: one queue for every client and RPC kind, `workers` threads that run its batches.

RPCs put a `Job` (one request's texts) in the queue and wait for it. A worker only searches: it hands each
text's raw `Hypothesis` back to its job, and the waiting RPC does the per-sentence post-processing
(`finish`, the translation metrics) in `Job.outcome`. With several workers (on CPU,
one per engine lane: Triton's instance count) a batch can start while another runs, so a request arriving
during a long batch does not wait for it to end; each worker's batch runs on its share of the lanes. A
worker forms batches:

- A batch starts from the oldest waiting sentence and is filled with the queued sentences that may share its
  search (equal `TranslateOptions.search_key()` and `max_length`), closest in length first, which keeps
  padding low, up to `max_batch_size` sentences and `max_batch_tokens` padded source tokens.
- It starts as soon as it is full, or `max_queue_delay` after the oldest sentence arrived.
- A request's texts may travel in several batches; results are put back in request order.

Every accepted job is answered exactly once: completed, or failed by the first of deadline, cancellation,
engine error or shutdown (`abandon`). Abandoning frees the job's queued sentences at once and its running
rows at the next decoding step (`is_abandoned`), so nobody computes for a caller who left.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from service.core.options import TranslateOptions
from service.core.search import Hypothesis
from service.engine.engine import Engine
from service.engine.lane_process import LaneLost
from service.scheduler.job import Job, RawResult, TextResult
from service.scheduler.metrics import ServerMetrics
from service.scheduler.status import RequestFailed, Status

log = logging.getLogger("translator.batcher")

LANE_LOST_MESSAGE = "a decoding lane stopped while translating this request and is being replaced; retry it"


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = 64
    max_batch_tokens: int = 4096  # 0: no token limit
    max_queue_delay_s: float = 0.005
    max_queue_size: int = 1024
    quality_sample_rate: float = 0.0  # fraction of attention-free batches run with attention for the metrics
    workers: int = 1  # batches run at the same time, each by its own worker thread
    # Iteration-level batching for the requests that allow it (greedy, no attention maps): queued sentences
    # join a running batch between decoding steps instead of waiting for it to end.
    iteration_batching: bool = False


@dataclass
class _Item:
    job: Job
    index: int  # position of the text in its request
    length: int  # source tokens, </s> included
    seq: int  # arrival order over all sentences


def _emit_token(item: _Item, token_id: int) -> None:
    """Stream a generated token to the job's RPC, unless the job is not streamed or already over."""
    events = item.job.events
    if events is not None and not item.job.finished:
        events.put(int(token_id))


def fill(
    candidates: list[_Item], rows: int, widest: int, max_rows: int, max_tokens: int
) -> tuple[list[_Item], bool]:
    """The one batch-filling rule, for new batches and running ones: candidates join in the order given
    while the batch (`rows` sentences so far, the longest `widest` tokens) stays within `max_rows` sentences
    and `max_tokens` padded source tokens (0: no token limit). One that would pass the token limit is
    skipped, since a shorter one further on may still fit. Returns the joiners and whether a limit was hit."""
    chosen: list[_Item] = []
    limited = False
    for item in candidates:
        if rows + len(chosen) >= max_rows:
            limited = True
            break
        width = max(widest, item.length)
        if max_tokens and (rows + len(chosen) + 1) * width > max_tokens:
            limited = True
            continue
        chosen.append(item)
        widest = width
    return chosen, limited or rows + len(chosen) >= max_rows


def batch_key(options: TranslateOptions) -> tuple:
    """Sentences share a batch only when one search serves them all: it takes one set of options."""
    return (options.search_key(), options.max_length)


class Batcher:
    """The queue and its worker threads, over `engine`."""

    def __init__(
        self, engine: Engine, settings: BatchingSettings, metrics: ServerMetrics, seed: int | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: dict[tuple, list[_Item]] = {}  # by batch_key, each in arrival order
        self._depth = 0  # queued sentences
        self._running: list[set[Job]] = [set() for _ in range(settings.workers)]  # by worker
        self._busy = 0  # workers running a batch
        self._closed = False  # no new jobs
        self._stopping = False  # workers exit
        self._seq = itertools.count()
        self._random = random.Random(seed)
        # Each worker's batches run on its share of the engine's lanes (engines without lanes have one).
        self._lanes = max(1, engine.lanes // settings.workers)
        self._threads = [
            threading.Thread(
                target=self._work, args=(worker,), name=f"translator-batcher-{worker}", daemon=True
            )
            for worker in range(settings.workers)
        ]

    # ----------------------------------------------------------------------------------------------------
    # RPC side
    # ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def depth(self) -> int:
        return self._depth

    def submit(self, job: Job) -> None:
        """Queue a job, or raise RESOURCE_EXHAUSTED (queue full) / UNAVAILABLE (shutting down) at once.

        A job already answered (abandoned before it was submitted) is refused with its error: it must not
        be queued and computed for nobody.
        """
        count = len(job.sources)
        with self._cond:
            if job.finished:
                raise job.error or RequestFailed(Status.INTERNAL, "this job was already answered")
            if self._closed:
                raise RequestFailed(Status.UNAVAILABLE, "the server is shutting down")
            if self._depth + count > self.settings.max_queue_size:
                raise RequestFailed(
                    Status.RESOURCE_EXHAUSTED,
                    f"queue full: {self._depth} sentences waiting, max_queue_size="
                    f"{self.settings.max_queue_size}, this request has {count}; retry later",
                )
            waiting = self._pending.setdefault(batch_key(job.options), [])
            for index, source in enumerate(job.sources):
                waiting.append(_Item(job, index, len(source.ids), next(self._seq)))
            self._set_depth(self._depth + count)
            self._cond.notify_all()

    def run(self, job: Job) -> list[TextResult]:
        """Submit and wait for the job (until its deadline); returns the results or raises RequestFailed."""
        self.submit(job)
        self.wait(job)
        return job.outcome()

    def wait_idle(self) -> None:
        """Block until nothing is queued and the workers are done with their batches (metrics included)."""
        with self._cond:
            while (self._depth or self._busy) and self._alive():
                self._cond.wait(0.1)

    def wait(self, job: Job) -> None:
        """Block until the job is answered; at its deadline, abandon it with DEADLINE_EXCEEDED."""
        while not job.finished:
            timeout = None if job.deadline is None else max(job.deadline - time.monotonic(), 0.0)
            if job.wait(timeout):
                return
            self.expire(job)

    def expire(self, job: Job) -> bool:
        waited_ms = (time.monotonic() - job.arrival) * 1000
        return self.abandon(
            job,
            Status.DEADLINE_EXCEEDED,
            f"deadline exceeded after {waited_ms:.0f} ms",
            reason="deadline_exceeded",
        )

    def abandon(self, job: Job, code: Status, message: str, reason: str) -> bool:
        """Fail the job unless it is already answered: its queued sentences leave the queue now, its running
        rows at the next decoding step. Returns whether this call answered it."""
        with self._cond:
            if job.finished:
                return False
            queued = self._remove_queued(job)
            running = job._remaining - queued
            job.error = RequestFailed(code, message)
            job._close()
        self.metrics.drop(reason, "queued", queued)
        self.metrics.drop(reason, "decoding", running)
        return True

    def close(self, timeout: float) -> None:
        """Refuse new jobs, let the queued and running ones finish for up to `timeout` s, fail the rest with
        UNAVAILABLE, stop the worker."""
        end = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while (self._depth or self._busy) and self._alive() and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())
            leftovers = {item.job for items in self._pending.values() for item in items}.union(*self._running)
        for job in leftovers:
            self.abandon(
                job,
                Status.UNAVAILABLE,
                "the server shut down before this request completed",
                reason="shutdown",
            )
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5.0)

    # ----------------------------------------------------------------------------------------------------
    # Worker side
    # ----------------------------------------------------------------------------------------------------

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self.metrics.queue_depth.set(depth)

    def _remove_queued(self, job: Job) -> int:
        key = batch_key(job.options)
        items = self._pending.get(key, [])
        kept = [item for item in items if item.job is not job]
        removed = len(items) - len(kept)
        if removed:
            if kept:
                self._pending[key] = kept
            else:
                del self._pending[key]
            self._set_depth(self._depth - removed)
        return removed

    def _work(self, worker: int) -> None:
        while True:
            items: list[_Item] = []
            try:
                batch = self._next_batch(worker)
                if batch is None:
                    return
                items = batch
                options = items[0].job.options
                sampled = not options.needs_attention and (
                    self._random.random() < self.settings.quality_sample_rate
                )
                if sampled:
                    # Attention outputs do not change the search; finish() drops the maps nobody asked for.
                    self._run_batch(items, replace(options, attention=frozenset({"cross"})))
                elif self.settings.iteration_batching and options.joins_running_batch:
                    self._run_iterations(worker, items)
                else:
                    self._run_batch(items, options)
            except LaneLost as lost:  # the engine answered every row it could: the rest may be retried
                self._lane_lost(worker, items, lost)
            except Exception as error:  # a worker must survive anything; its batch gets INTERNAL
                log.exception("batch of %d sentences failed", len(items))
                with self._cond:
                    jobs = {item.job for item in items} | self._running[worker]
                for job in jobs:
                    self.abandon(
                        job,
                        Status.INTERNAL,
                        f"the engine failed on this request's batch: {type(error).__name__}: {error}",
                        reason="error",
                    )
            finally:
                with self._cond:
                    if items:
                        self._busy -= 1
                    self._running[worker].clear()
                    self._cond.notify_all()

    def _lane_lost(self, worker: int, items: list[_Item], lost: LaneLost) -> None:
        """A lane process died under this batch: its unanswered requests get UNAVAILABLE, which clients may
        retry (the lane is being replaced); the process id stays in the log."""
        log.warning("a decoding lane died under a batch of %d sentences: %s", len(items), lost.detail)
        with self._cond:
            if lost.rows is None:  # a running batch: every request in it
                jobs = {item.job for item in items} | self._running[worker]
            else:
                jobs = {items[row].job for row in lost.rows}
        for job in jobs:
            self.abandon(job, Status.UNAVAILABLE, LANE_LOST_MESSAGE, reason="lane_lost")

    def _next_batch(self, worker: int) -> list[_Item] | None:
        """Wait for a batch worth starting and take its sentences out of the queue (None: stop)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                waiting = min(self._pending.values(), key=lambda items: items[0].seq)
                chosen, full = self._select(waiting)
                start_at = waiting[0].job.arrival + self.settings.max_queue_delay_s
                now = time.monotonic()
                if full or now >= start_at or self._closed or waiting[0].job.urgent:
                    self._dequeue(chosen)
                    self._busy += 1
                    self._running[worker] = {item.job for item in chosen}
                    return chosen
                self._cond.wait(start_at - now)

    def _select(self, waiting: list[_Item]) -> tuple[list[_Item], bool]:
        """The oldest sentence plus the compatible ones closest in length; whether the batch is full."""
        first = waiting[0]
        closest = sorted(waiting[1:], key=lambda i: (abs(i.length - first.length), i.seq))
        settings = self.settings
        chosen, full = fill(closest, 1, first.length, settings.max_batch_size, settings.max_batch_tokens)
        return [first, *chosen], full

    def _observe_batch(self, items: list[_Item], start: float) -> None:
        for item in items:
            self.metrics.queue_wait.observe(start - item.job.arrival)
        self.metrics.batch_sentences.observe(len(items))
        self.metrics.batch_tokens.observe(len(items) * max(item.length for item in items))

    def _run_batch(self, items: list[_Item], options: TranslateOptions) -> None:
        start = time.monotonic()
        self._observe_batch(items, start)

        def deliver(row: int, hypothesis: Hypothesis) -> None:
            # A text is answered as soon as its row is done, not when the batch's longest one is.
            item = items[row]
            queue_ms, compute_ms = (start - item.job.arrival) * 1000, (time.monotonic() - start) * 1000
            self._deliver(item, hypothesis, queue_ms, compute_ms)

        searched = self.engine.search(  # every result leaves through `deliver` (on_done)
            [item.job.sources[item.index].ids for item in items],
            options,
            on_token=self._token_sink(items),
            is_abandoned=self._abandoned_check(items),
            lanes=self._lanes,
            on_done=deliver,
            wants_tokens=lambda row: items[row].job.events is not None,
        )
        self.metrics.compute_duration.labels(stage="encode").observe(searched.times.encode_s)
        self.metrics.compute_duration.labels(stage="decode").observe(searched.times.decode_s)

    def _run_iterations(self, worker: int, items: list[_Item]) -> None:
        """Iteration-level batching: the batch decodes step by step, and between steps the queued sentences
        that may share its search join it (up to the batch limits) while finished rows leave. Each join is
        one batch in the metrics: its queue wait, size, encoding time, and the decoding time since the
        previous join."""
        options = items[0].job.options
        # Rows keep their own max_length in a running batch: every queued sentence with the same search joins.
        key = options.search_key()
        started: dict[int, float] = {}  # id(item) -> when it joined

        def deliver(item: _Item, hypothesis: Hypothesis) -> None:
            joined = started.pop(id(item))
            now = time.monotonic()
            self._deliver(item, hypothesis, (joined - item.job.arrival) * 1000, (now - joined) * 1000)

        batch = self.engine.running_batch(
            options,
            on_token=_emit_token,
            on_done=deliver,
            is_abandoned=lambda item: self._gone(item.job),
            wants_tokens=lambda item: item.job.events is not None,
        )
        try:
            widest = 0
            joining: list[_Item] = items
            while joining:
                now = time.monotonic()
                self._observe_batch(joining, now)
                for item in joining:
                    started[id(item)] = now
                sources = [item.job.sources[item.index].ids for item in joining]
                encode_s = self.engine.join(batch, joining, sources, [item.job.options for item in joining])
                self.metrics.compute_duration.labels(stage="encode").observe(encode_s)
                widest = max([widest, *(item.length for item in joining)])
                decode_s = 0.0
                joining = []
                while batch.size and not joining:
                    decode_s += batch.step()
                    joining = self._joiners(worker, key, batch.size, widest)
                self.metrics.compute_duration.labels(stage="decode").observe(decode_s)
        finally:
            batch.close()

    def _joiners(self, worker: int, key: tuple, rows: int, widest: int) -> list[_Item]:
        """Queued sentences that join a running batch of `rows` rows now: oldest first, within the batch
        limits. While another worker is idle a running batch keeps to its share of max_batch_size, so the
        idle one starts one of its own with the rest (on its own lane); none join while sentences of other
        options have waited max_queue_delay, so that the batch drains and they get a worker."""
        settings = self.settings
        # A running batch holds a lane process: with a batch waiting for one (more workers than lanes), it
        # takes nobody in, so that it ends and gives its lane up.
        if self.engine.lanes_waited_for:
            return []
        with self._cond:
            if not self._pending:
                return []
            now = time.monotonic()
            waiting: list[_Item] = []
            for (search_key, _), queued in self._pending.items():
                if search_key == key:
                    waiting += queued
                elif now - queued[0].job.arrival >= settings.max_queue_delay_s:
                    return []
            limit = settings.max_batch_size
            if self._busy < settings.workers:
                limit = -(-limit // settings.workers)
            # Like a new batch, joiners gather for up to max_queue_delay unless they fill the running batch:
            # each join costs an encoder run and a copy of the running caches, worth paying for a group, not
            # for every arrival.
            oldest = min((item.job.arrival for item in waiting), default=now)
            if now - oldest < settings.max_queue_delay_s and rows + len(waiting) < limit:
                return []
            oldest_first = sorted(waiting, key=lambda item: item.seq)
            chosen, _ = fill(oldest_first, rows, widest, limit, settings.max_batch_tokens)
            self._dequeue(chosen)
            self._running[worker] |= {item.job for item in chosen}
            return chosen

    def _dequeue(self, items: list[_Item]) -> None:
        """Take sentences that a worker starts out of the queue (one pass per batch key they come from)."""
        taken = {id(item) for item in items}
        for key in {batch_key(item.job.options) for item in items}:
            rest = [item for item in self._pending[key] if id(item) not in taken]
            if rest:
                self._pending[key] = rest
            else:
                del self._pending[key]
        self._set_depth(self._depth - len(items))

    def _gone(self, job: Job) -> bool:
        """Whether nobody waits for the job any more: failed (cancelled, ...) or past its deadline."""
        if job.finished:  # only a failed job can be finished while one of its rows still runs
            return True
        if job.deadline is not None and time.monotonic() >= job.deadline:
            self.expire(job)
            return True
        return False

    def _deliver(self, item: _Item, hypothesis: Hypothesis, queue_ms: float, compute_ms: float) -> None:
        """Hand the raw result to its job; the RPC waiting for the job finishes it (`Job.outcome`)."""
        job = item.job
        raw = RawResult(hypothesis, queue_ms, compute_ms, self.engine.vocabulary, self.metrics)
        with self._cond:
            if job.finished:
                return
            job.raw[item.index] = raw
            job._remaining -= 1
            if job._remaining == 0:
                job._close()

    def _token_sink(self, items: list[_Item]) -> Any:
        if all(item.job.events is None for item in items):
            return None

        def on_token(row: int, token_id: int) -> None:
            _emit_token(items[row], token_id)

        return on_token

    def _abandoned_check(self, items: list[_Item]) -> Any:
        def is_abandoned(row: int) -> bool:
            return self._gone(items[row].job)

        return is_abandoned
