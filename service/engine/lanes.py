"""Lanes: how a batch is split into parallel parts, and the threads that run the parts in-process.

On CPU each lane runs single-threaded onnxruntime calls: at this model's size a decoding step is a few
hundred small kernels, and two threads inside one kernel gain little over one (their hand-offs cost about
what the split work saves), while two lanes each on one core give about 1.6-1.8x
(docs/decisions/lanes.md). On a GPU lanes only overlap kernel launches.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from service.engine.onnx_runtime import CUDA

log = logging.getLogger("translator.engine")


class LaneThreads:
    """Threads for the parts of a batch: each part on a thread of its own, each thread with its own queue.

    A ThreadPoolExecutor does not promise one part per thread (its workers take their work from one shared
    queue), so a batch's parts could run one after the other on one thread while another lane idles
    (docs/decisions/lanes.md). Batches that run at once (several batch workers) take
    distinct free lanes, most recently used first. The threads start with the first batch that needs them and
    run `initializer()` first (the denormal flush).
    """

    def __init__(self, count: int, name: str, initializer: Callable[[], object]) -> None:
        self.count = count
        self._name = name
        self._initializer = initializer
        self._queues: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        self._free: list[int] = []
        self._condition = threading.Condition()
        self._closed = False

    def run(self, calls: list[Callable[[], object]]) -> list[Future]:
        """Start each call on a free lane thread of its own (waiting for enough free lanes); their futures."""
        if len(calls) > self.count:
            raise ValueError(f"{len(calls)} parts for {self.count} lane threads")
        with self._condition:
            if not self._threads and not self._closed:
                self._start()
            while not self._closed and len(self._free) < len(calls):
                self._condition.wait()
            if self._closed:
                raise RuntimeError("the engine is closed: its lane threads are stopped")
            # Queued under the lock, so that a `close` cannot put its stop marker ahead of this work.
            futures: list[Future] = []
            for call in calls:
                lane = self._free.pop()
                future: Future = Future()
                future.add_done_callback(lambda _, lane=lane: self._release(lane))
                self._queues[lane].put((future, call))
                futures.append(future)
        return futures

    def close(self) -> None:
        """Refuse new calls; the threads stop once they are done with what they have."""
        with self._condition:
            if self._closed:
                return
            self._closed = True
            self._condition.notify_all()
        for work in self._queues:
            work.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _start(self) -> None:
        self._queues = [queue.SimpleQueue() for _ in range(self.count)]
        self._threads = [
            threading.Thread(target=self._work, args=(work,), name=f"{self._name}_{i}", daemon=True)
            for i, work in enumerate(self._queues)
        ]
        self._free = list(range(self.count))
        for thread in self._threads:
            thread.start()

    def _release(self, lane: int) -> None:
        with self._condition:
            self._free.append(lane)
            self._condition.notify_all()

    def _work(self, work: queue.SimpleQueue) -> None:
        try:
            self._initializer()
        except Exception:  # the lane still runs, only without what the initializer sets (speed)
            log.exception("a lane thread's initializer failed")
        while (item := work.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)


# A lane's time for a run of rows, in units of one source token: every step costs a fixed share (weights,
# kernel launches) that the longest row decides, plus a share per row and step (the fit:
# docs/decisions/lanes.md).
LANE_STEP_COST = 13.5  # per position of the run's longest source: the fixed cost of one decoder step
LANE_ROW_STEP_COST = 0.46  # per row and position of the longest source: padded encoder and step rows


def lane_cost(
    sorted_lengths: np.ndarray, prefix: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:
    """Predicted time of the runs [starts, ends) of ascending lengths (ends > starts); prefix[k] is the sum
    of the first k lengths."""
    longest = sorted_lengths[ends - 1]
    return longest * (LANE_STEP_COST + LANE_ROW_STEP_COST * (ends - starts)) + prefix[ends] - prefix[starts]


def lane_parts(lengths: list[int], lanes: int) -> list[list[int]]:
    """Rows split into at most `lanes` runs of similar source length whose predicted times are as even as
    possible (the batch is done when its slowest lane is).

    Sorted by length so that each run's rows finish at about the same step (a run decodes until its
    longest row is done). A run's time grows with its longest row much more than with its row count
    (`lane_cost`), so the lane of long sentences gets fewer rows. Exact minimum of the slowest run over
    the contiguous splits; every lane gets a row while there are enough.

    Dynamic programming, one layer per run: slowest[j] is the best slowest run over the first j rows in
    the runs made so far. For the run [i, j) added next, slowest[i] grows with i and the run's time shrinks
    with i, so the best i is where they cross: a binary search per j (all j at once), O(lanes x n log n)
    time and O(n) memory.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    n = len(order)
    lanes = max(1, min(lanes, n))
    if lanes == 1:
        return [order.tolist()] if n else []
    ordered = np.asarray(lengths, dtype=np.float64)[order]
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    ends = np.arange(n + 1)
    slowest = np.full(n + 1, np.inf)
    slowest[1:] = lane_cost(ordered, prefix, np.zeros(n, dtype=np.int64), ends[1:])
    starts_by_run = []
    for runs in range(2, lanes + 1):
        # The new run [i, j) needs i >= runs - 1 (one row per earlier run) and i <= j - 1.
        j = ends[runs:]
        low, high = np.full(j.size, runs - 1), j - 1
        while np.any(low < high):  # smallest i in [low, high] with slowest[i] >= time of [i, j)
            middle = (low + high) // 2
            crossed = slowest[middle] >= lane_cost(ordered, prefix, middle, j)
            high = np.where(crossed, middle, high)
            low = np.where(crossed, low, middle + 1)
        before = np.maximum(low - 1, runs - 1)  # the crossing may be just past the best start
        at = np.maximum(slowest[low], lane_cost(ordered, prefix, low, j))
        just_before = np.maximum(slowest[before], lane_cost(ordered, prefix, before, j))
        best_start = np.where(just_before < at, before, low)
        slowest = np.full(n + 1, np.inf)
        slowest[runs:] = np.minimum(at, just_before)
        starts_by_run.append(np.concatenate([np.zeros(runs, dtype=np.int64), best_start]))
    bounds = [n]
    for best_start in reversed(starts_by_run):
        bounds.append(int(best_start[bounds[-1]]))
    bounds.append(0)
    bounds.reverse()
    return [order[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def plan_lanes(provider: str, threads: int, lanes: int | None) -> int:
    """On CPU every thread is a lane unless told otherwise. On a GPU the rows run together anyway; lanes
    there only overlap the host's kernel launches (a step of this model is launch-bound), and two lanes mean
    smaller batches in the service (docs/ENGINE.md, "On a GPU"): 1 unless asked."""
    if provider == CUDA:
        return max(1, lanes or 1)
    return max(1, min(lanes or threads, threads))


