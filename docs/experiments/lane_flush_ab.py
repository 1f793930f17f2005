"""A/B: two thread lanes that flush denormals to zero (the engine's lane threads) against the same lanes
without the flush.

    .venv/bin/python docs/experiments/lane_flush_ab.py

Two engines in one process, identical but for their lane threads (the second one's keep denormals);
both hand every part of a batch to a lane thread, so only the flush differs. Greedy, the test sentences,
whole passes for at least 2.5 s, 6 interleaved rounds; medians per batch size.
"""

from __future__ import annotations

import statistics

from arena_ab import rate  # this folder's arena A/B: the same timing loop

from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from service.engine.engine import Engine
from service.engine.lanes import LaneThreads

BATCH_SIZES = (8, 32, 128)
ROUNDS = 6


def main() -> None:
    flushing = Engine.load("model_repository", "toy-en-es", device="cpu", threads=2)
    keeping = Engine.load("model_repository", "toy-en-es", device="cpu", threads=2)
    # The same engine whose lane threads skip the flush (no initializer).
    assert keeping._lane_threads is not None
    keeping._lane_threads.close()
    keeping._lane_threads = LaneThreads(keeping.lanes, "engine-lane", lambda: None)
    engines = {"flush": flushing, "keep": keeping}
    sources = [s.ids for s in flushing.encode_texts(read_sentences(DEFAULT_SENTENCES)[:512])]
    print(f"{'batch':>5} {'keep':>8} {'flush':>8} {'ratio':>6}  (sentences/s, two lanes, median of {ROUNDS})")
    for size in BATCH_SIZES:
        rounds: dict[str, list[float]] = {name: [] for name in engines}
        for round_number in range(ROUNDS):
            names = list(engines) if round_number % 2 == 0 else list(reversed(engines))
            for name in names:
                rounds[name].append(rate(engines[name], sources, size))
        flush, keep = statistics.median(rounds["flush"]), statistics.median(rounds["keep"])
        print(f"{size:>5} {keep:>8.1f} {flush:>8.1f} {flush / keep:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
