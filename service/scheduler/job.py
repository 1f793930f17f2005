"""A request's texts on their way through the scheduler (`Job`), and what comes back for each text.

The scheduler's worker hands each text's raw `Hypothesis` to its job; the waiting call does the per-text
post-processing (`finish`, the translation metrics) in `Job.outcome`, on its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service.core.options import TranslateOptions
from service.core.postprocess import Translation, finish
from service.core.search import Hypothesis
from service.core.vocabulary import EncodedText, Vocabulary
from service.scheduler.metrics import ServerMetrics
from service.scheduler.status import RequestFailed, Status

log = logging.getLogger("translator.batcher")

STREAM_END = None  # last item of a streaming job's event queue; token ids are ints


class EventSink(Protocol):
    """Where a streaming job's token ids (then STREAM_END) go: a queue.SimpleQueue, or the RPC's own."""

    def put(self, item: int | None) -> None: ...


@dataclass
class TextResult:
    translation: Translation
    queue_ms: float  # request arrival -> start of the batch that carried this text
    compute_ms: float  # that batch's engine time until this text was done


@dataclass
class RawResult:
    """One text's search result as the worker delivers it; `Job.outcome` turns it into a TextResult."""

    hypothesis: Hypothesis
    queue_ms: float
    compute_ms: float
    vocabulary: Vocabulary  # the served model's, for `finish` (it only reads it: thread-safe)
    metrics: ServerMetrics  # the batcher's metrics when the batch ran (the warm-up swaps in throwaway ones)


class Job:
    """One request's texts on their way through the batcher; read its outcome once `wait` returns True."""

    def __init__(
        self,
        sources: list[EncodedText],
        options: TranslateOptions,
        *,
        arrival: float | None = None,
        deadline: float | None = None,
        stream: bool = False,
        urgent: bool = False,
        events: EventSink | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a job needs at least one text")
        self.sources = sources
        self.options = options
        self.arrival = time.monotonic() if arrival is None else arrival  # time.monotonic() clock
        self.deadline = deadline  # time.monotonic() clock; None: no deadline
        self.urgent = urgent  # its batch starts without waiting for max_queue_delay (the warm-up)
        self.raw: list[RawResult | None] = [None] * len(sources)  # filled by the worker
        self.results: list[TextResult | None] = [None] * len(sources)  # filled by outcome()
        self.error: RequestFailed | None = None
        self.finished = False  # completed or failed; guarded by the batcher's lock
        # Token ids as the worker generates them, then STREAM_END: read by the streaming RPC.
        self.events: EventSink | None = None
        if stream:
            self.events = events if events is not None else queue.SimpleQueue()
        self._remaining = len(sources)
        self._done = threading.Event()
        self._done_callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._settled = False  # outcome() did the post-processing (or observed what was delivered)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the job is answered (at once if it is): from the thread that answers it,
        often with the batcher's lock held, so it must be quick, thread-safe and take no batcher lock (an
        event loop's call_soon_threadsafe)."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._done_callbacks.append(callback)
                return
        callback()

    def outcome(self) -> list[TextResult]:
        """The results in text order, or the error the job failed with. Call it once the job is answered:
        the first call finishes the translations (in the calling thread, not the batcher's worker) and
        observes their metrics."""
        assert self.finished
        with self._settle_lock:
            if not self._settled:
                self._settled = True
                self._settle()
        if self.error is not None:
            raise self.error
        assert all(r is not None for r in self.results)
        return [r for r in self.results if r is not None]

    def _settle(self) -> None:
        if self.error is not None:
            # Failed: the texts delivered before the failure still count in the metrics, as generated.
            for raw in self.raw:
                if raw is not None:
                    observe(raw)
            return
        for index, raw in enumerate(self.raw):
            assert raw is not None
            try:
                translation = finish(raw.vocabulary, self.sources[index], raw.hypothesis, self.options)
            except Exception as error:
                log.exception("finishing a translation failed")
                failure = f"post-processing the translation failed: {error}"
                self.error = RequestFailed(Status.INTERNAL, failure)
                raw.metrics.drop("error", "decoding", len(self.raw) - index)
                self.results = [None] * len(self.sources)
                return
            self.results[index] = TextResult(translation, raw.queue_ms, raw.compute_ms)
            observe(raw)

    def _close(self) -> None:
        self.finished = True
        if self.events is not None:
            self.events.put(STREAM_END)
        with self._callbacks_lock:
            self._done.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            callback()


def observe(raw: RawResult) -> None:
    """The per-translation metrics; the step count is len(Translation.target_tokens), </s> included."""
    hypothesis = raw.hypothesis
    steps = len(hypothesis.tokens) + (1 if hypothesis.finished else 0)
    raw.metrics.observe_translation(hypothesis.log_prob, steps, hypothesis.cross_attention)
