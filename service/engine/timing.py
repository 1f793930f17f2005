"""Where a search's time goes: seconds in the encoder and in the decode loop, returned with its results."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.search import Hypothesis


@dataclass
class StageTimes:
    """Seconds spent in the encoder and in the decode loop (steps and row selection), summed over lanes."""

    encode_s: float = 0.0
    decode_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, encode_s: float = 0.0, decode_s: float = 0.0) -> None:
        with self._lock:  # the lanes of one batch add from their own threads
            self.encode_s += encode_s
            self.decode_s += decode_s


@dataclass
class Searched:
    """A search's results in the caller's row order (None: abandoned) and the time it took."""

    hypotheses: list[Hypothesis | None]
    times: StageTimes


class TimedBackend:
    """A StepBackend that adds the time of each call to one `StageTimes`: one per search, so searches that
    run at once (several batch workers, several lanes) never mix their figures."""

    def __init__(self, inner: Any, times: StageTimes) -> None:
        self.inner = inner
        self.times = times

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[object, np.ndarray | None]:
        start = time.perf_counter()
        try:
            return self.inner.encode(src_ids, with_attention)
        finally:
            self.times.add(encode_s=time.perf_counter() - start)

    def step(self, state: object, tokens: np.ndarray, with_attention: bool) -> tuple[Any, ...]:
        start = time.perf_counter()
        try:
            return self.inner.step(state, tokens, with_attention)
        finally:
            self.times.add(decode_s=time.perf_counter() - start)

    def select(self, state: object, rows: np.ndarray) -> object:
        start = time.perf_counter()
        try:
            return self.inner.select(state, rows)
        finally:
            self.times.add(decode_s=time.perf_counter() - start)

    def merge(self, first: object, second: object) -> object:
        return self.inner.merge(first, second)  # a copy on the host, counted in neither stage
