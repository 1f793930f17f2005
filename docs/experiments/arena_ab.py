"""A/B: the engine's CPU sessions with and without onnxruntime's memory arena, at 1 and 2 lanes.

    .venv/bin/python docs/experiments/arena_ab.py

In one process, engines of each setting are loaded side by side and timed in interleaved rounds (greedy,
the test split's sentences, whole passes for at least 2.5 s); medians per setting and batch size.
"""

from __future__ import annotations

import statistics
import time

import service.engine.onnx_runtime as engine_module
from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from service.core.options import TranslateOptions
from service.engine.engine import Engine

BATCH_SIZES = (1, 8, 32, 128)
ROUNDS = 3


def load(arena: bool, lanes: int) -> Engine:
    engine_module.CPU_MEMORY_ARENA = arena  # read when the sessions are made
    try:
        return Engine.load("model_repository", "toy-en-es", device="cpu", threads=2, lanes=lanes)
    finally:
        engine_module.CPU_MEMORY_ARENA = False


def rate(engine: Engine, sources: list[list[int]], size: int) -> float:
    engine.search_ids(sources[:size], TranslateOptions())  # warm-up
    started, sentences = time.perf_counter(), 0
    while time.perf_counter() - started < 2.5:
        for i in range(0, len(sources), size):
            sentences += len(engine.search_ids(sources[i:i + size], TranslateOptions()))
    return sentences / (time.perf_counter() - started)


def main() -> None:
    engines = {(arena, lanes): load(arena, lanes) for lanes in (1, 2) for arena in (True, False)}
    first = next(iter(engines.values()))
    sources = [s.ids for s in first.encode_texts(read_sentences(DEFAULT_SENTENCES)[:512])]
    print(f"{'lanes':>5} {'batch':>5} {'arena on':>10} {'arena off':>10} {'off/on':>7}"
          f"  (sentences/s, median of {ROUNDS} rounds)")
    for lanes in (1, 2):
        for size in BATCH_SIZES:
            rounds: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(ROUNDS):
                for arena in (True, False):
                    rounds[arena].append(rate(engines[arena, lanes], sources, size))
            on, off = statistics.median(rounds[True]), statistics.median(rounds[False])
            print(f"{lanes:>5} {size:>5} {on:>10.1f} {off:>10.1f} {off / on:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
