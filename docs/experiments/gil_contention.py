"""How much Python work beside the engine costs it, and how much of that is the GIL.

    .venv/bin/python docs/experiments/gil_contention.py

The engine (2 lanes, 2 threads) translates batches of 16 in-process for 4 s: alone; with Python "burner"
threads in the same process (each holds the GIL for part of every millisecond, then sleeps, like the gRPC
threads of a busy server); and with the same burners as separate processes (the same CPU taken, no GIL
shared). The gap between the last two is the GIL's part. Two rounds.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from service.core.options import TranslateOptions
from service.engine.engine import Engine

LOADS = ((1, 0.5), (2, 0.4))  # (burners, share of each millisecond each one computes)
BATCH = 16


def burn(stop: Any, duty: float, period: float = 0.001) -> None:
    while not stop.is_set():
        end = time.perf_counter() + duty * period
        count = 0
        while time.perf_counter() < end:
            count += 1
        time.sleep((1 - duty) * period)


def rate(engine: Engine, sources: list[list[int]], seconds: float = 4.0) -> float:
    started, sentences = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        for i in range(0, len(sources), BATCH):
            sentences += len(engine.search_ids(sources[i:i + BATCH], TranslateOptions()))
    return sentences / (time.perf_counter() - started)


def with_burners(engine: Engine, sources: list[list[int]], count: int, duty: float, kind: str) -> float:
    stop: Any = threading.Event() if kind == "thread" else multiprocessing.Event()
    make = threading.Thread if kind == "thread" else multiprocessing.Process
    burners = [make(target=burn, args=(stop, duty), daemon=True) for _ in range(count)]
    for burner in burners:
        burner.start()
    time.sleep(0.3)
    try:
        return rate(engine, sources)
    finally:
        stop.set()
        for burner in burners:
            burner.join()


def main() -> None:
    engine = Engine.load("model_repository", "toy-en-es", device="cpu", threads=2)
    sources = [s.ids for s in engine.encode_texts(read_sentences(DEFAULT_SENTENCES)[:256])]
    engine.search_ids(sources[:BATCH], TranslateOptions())
    print("engine sentences/s at batch 16: alone | Python load in threads | the same load in processes")
    for round_number in (1, 2):
        for count, duty in LOADS:
            alone = rate(engine, sources)
            threads = with_burners(engine, sources, count, duty, "thread")
            processes = with_burners(engine, sources, count, duty, "process")
            print(f"round {round_number}, {count} x {duty:.0%} of a core: {alone:.0f} | {threads:.0f} | "
                  f"{processes:.0f}  (GIL: {1 - threads / processes:.0%} of the processes' rate)", flush=True)


if __name__ == "__main__":
    main()
