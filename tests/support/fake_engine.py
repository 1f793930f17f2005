"""A fake engine for the batcher (each source echoed back, one token a step) and batchers built on it."""

from __future__ import annotations

import time

from service.core.search import Hypothesis
from service.core.vocabulary import EncodedText
from service.engine.timing import Searched, StageTimes
from service.scheduler.batcher import Batcher, BatchingSettings
from service.scheduler.metrics import ServerMetrics

FAIL = 99  # a source starting with this id makes the fake engine raise
EOS = 2


def source(length: int, first: int = 5) -> EncodedText:
    """`length` tokens, </s> included."""
    ids = [first] + [5] * (length - 2) + [EOS]
    return EncodedText(ids=ids, tokens=[str(i) for i in ids], pieces=[str(i) for i in ids])


class FakeVocabulary:
    """Token ids as their numbers: a translation's text is its ids joined by spaces."""

    unk_id = 3

    def tokens(self, ids: list[int]) -> list[str]:
        return [str(i) for i in ids]

    def decode(self, ids: list[int], source: object = None, words: list[str] | None = None) -> str:
        return " ".join(words if words is not None else map(str, ids))


class FakeEngine:
    """Echoes each source as its translation, one token per step (so streaming and abandoning are visible)."""

    lanes = 1
    lanes_waited_for = 0

    def __init__(self, step_s: float = 0.0) -> None:
        self.vocabulary = FakeVocabulary()
        self.step_s = step_s
        self.batches: list[list[int]] = []  # lengths of the sentences of each batch
        self.steps = 0

    def search(self, sources, options, on_token=None, is_abandoned=None, lanes=None,  # noqa: ANN001, ANN201
               on_done=None, wants_tokens=None):  # noqa: ANN001
        self.batches.append([len(s) for s in sources])
        if any(s[0] == FAIL for s in sources):
            raise RuntimeError("boom")
        alive = [True] * len(sources)
        results = [
            Hypothesis(tokens=list(ids[:-1]), log_prob=-1.0, score=-0.5, finished=True) for ids in sources
        ]
        for step in range(max(len(s) for s in sources) - 1):
            if not any(alive):
                break
            for row, ids in enumerate(sources):
                if alive[row] and is_abandoned is not None and is_abandoned(row):
                    alive[row] = False
                if alive[row] and step < len(ids) - 1 and on_token is not None:
                    on_token(row, ids[step])
            self.steps += 1
            time.sleep(self.step_s)
            for row, ids in enumerate(sources):
                if alive[row] and step == len(ids) - 2 and on_done is not None:
                    on_done(row, results[row])
        hypotheses = [result if ok else None for result, ok in zip(results, alive, strict=True)]
        return Searched(hypotheses, StageTimes())


def make(step_s: float = 0.0, **settings: float) -> tuple[Batcher, FakeEngine, ServerMetrics]:
    """A batcher (not started) over a FakeEngine whose steps take `step_s`; `settings` override the small
    defaults."""
    engine, metrics = FakeEngine(step_s), ServerMetrics()
    values = {"max_batch_size": 4, "max_batch_tokens": 0, "max_queue_delay_s": 0.02, "max_queue_size": 64}
    values.update(settings)
    return Batcher(engine, BatchingSettings(**values), metrics), engine, metrics  # type: ignore[arg-type]
