"""How a batch is split over lanes: fit a lane's time, then A/B the split against an even split by length.

    .venv/bin/python docs/experiments/lane_split_fit.py

1. Fit: 300 runs of 1-64 rows (runs of similar length, as `lane_parts` makes them) from the test
   sentences, one lane, best of 3; least squares of the time on (longest source, sum of source lengths,
   rows x longest source). The ratios of the coefficients to the per-token one are
   `service.engine.engine.LANE_STEP_COST` and `LANE_ROW_STEP_COST`.
2. A/B, two lanes, interleaved rounds: `lane_parts` (even predicted time) against cutting the sorted
   rows where their cumulative length is even (the split used before), sentences/s per batch size.
"""

from __future__ import annotations

import random
import statistics
import time

import numpy as np

import service.engine.engine as engine_module  # its lane_parts is swapped for the A/B
from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from service.core.options import TranslateOptions
from service.engine.engine import Engine

RUNS = 300
BATCH_SIZES = (8, 32, 64, 128)
ROUNDS = 5


def even_length_parts(lengths: list[int], lanes: int) -> list[list[int]]:
    """The split before: sorted rows cut where the cumulative source length is even."""
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    lanes = max(1, min(lanes, len(order)))
    total = sum(lengths) or 1
    parts: list[list[int]] = [[] for _ in range(lanes)]
    done = 0
    for position, row in enumerate(order):
        lane = max(min(lanes - 1, done * lanes // total, position), lanes - (len(order) - position))
        parts[lane].append(row)
        done += lengths[row]
    return [part for part in parts if part]


def fit(engine: Engine, sources: list[list[int]]) -> None:
    rng = random.Random(0)
    features, seconds = [], []
    for _ in range(RUNS):
        rows = rng.choice([1, 2, 4, 8, 12, 16, 24, 32, 48, 64])
        start = rng.randrange(0, len(sources) - 128)
        pool = sorted(sources[start:start + 128], key=len)
        first = rng.randrange(0, 128 - rows + 1)
        run = pool[first:first + rows]
        engine.search_ids(run, TranslateOptions(), lanes=1)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            engine.search_ids(run, TranslateOptions(), lanes=1)
            best = min(best, time.perf_counter() - started)
        lengths = np.array([len(s) for s in run])
        features.append([1.0, lengths.max(), lengths.sum(), rows * lengths.max()])
        seconds.append(best)
    x, y = np.array(features), np.array(seconds)
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    error = np.abs(x @ coefficients - y) / y
    constant, longest, per_token, rows_longest = coefficients * 1e6
    print(f"fit over {RUNS} runs (us): constant {constant:.1f}, per position of the longest source "
          f"{longest:.1f}, per source token {per_token:.1f}, per row x longest {rows_longest:.1f}; "
          f"mean relative error {error.mean():.3f}")
    print(f"in source tokens: LANE_STEP_COST = {longest / per_token:.2f}, "
          f"LANE_ROW_STEP_COST = {rows_longest / per_token:.2f}")


def rate(engine: Engine, sources: list[list[int]], size: int) -> float:
    engine.search_ids(sources[:size], TranslateOptions())  # warm-up
    started = time.perf_counter()
    for i in range(0, len(sources), size):
        engine.search_ids(sources[i:i + size], TranslateOptions())
    return len(sources) / (time.perf_counter() - started)


def main() -> None:
    single = Engine.load("model_repository", "toy-en-es", device="cpu", threads=1)
    sentences = read_sentences(DEFAULT_SENTENCES)
    sources = [s.ids for s in single.encode_texts((sentences * 2)[:1024])]
    fit(single, sources)
    engine = Engine.load("model_repository", "toy-en-es", device="cpu", threads=2)
    splits = {"even cost": engine_module.lane_parts, "even length": even_length_parts}
    print(f"{'batch':>5} {'even length':>12} {'even cost':>10} {'ratio':>6}  (sentences/s, two lanes, "
          f"median of {ROUNDS} rounds)")
    for size in BATCH_SIZES:
        rounds: dict[str, list[float]] = {name: [] for name in splits}
        for round_number in range(ROUNDS):
            names = list(splits) if round_number % 2 == 0 else list(reversed(splits))
            for name in names:
                engine_module.lane_parts = splits[name]
                try:
                    rounds[name].append(rate(engine, sources[:512], size))
                finally:
                    engine_module.lane_parts = splits["even cost"]
        new, old = statistics.median(rounds["even cost"]), statistics.median(rounds["even length"])
        print(f"{size:>5} {old:>12.1f} {new:>10.1f} {new / old:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
