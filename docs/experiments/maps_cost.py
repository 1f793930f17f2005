"""What keeping attention maps costs the host, per way of keeping them (the engine's host work only).

    .venv/bin/python docs/experiments/maps_cost.py

1. Encoder maps of a batch encoded in groups of similar lengths (the CPU path), the test split's first 512
   sentences in batches of 32 and 128, the groups' onnxruntime outputs computed once beforehand; then, per
   way, putting them together and taking every row's [L,H,S,S] out:
   - per-layer batch arrays stacked into [B,L,H,S,S] (np.stack), as the engine did;
   - one [B,L,H,S,S] array written in place (service.engine.backend.OnnxBackend._encode_groups).
   (Keeping the groups' own arrays and stacking each row from its group was measured too: no faster than
   the array written in place, 2.9-3.2 against 2.7-2.8 ms at batch 128, so not kept.)
2. Decoder maps of a greedy search: 20 steps of 64 rows with two compactions, then one row's maps, as beam
   search keeps them (a back-pointer history walked step by step, search._History) and as greedy search
   keeps them (a buffer per stretch between compactions, search._GreedyMaps).
Medians of 9 interleaved rounds.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable

import numpy as np

from model.data import toy_split
from service.core.search import _GreedyMaps, _History, padded
from service.engine.backend import encoder_groups
from service.engine.engine import Engine

Group = tuple[np.ndarray, int, list[np.ndarray]]  # rows, width, L maps [G,H,W,W]


def encoded_groups(engine: Engine, batch: np.ndarray) -> list[Group]:
    backend = engine.runner.backend
    wanted = backend.cross_names + backend.encoder_attention_names
    groups = []
    for rows in encoder_groups((batch != backend.pad_id).sum(axis=1)):
        width = int((batch[rows] != backend.pad_id).sum(axis=1).max())
        ids = np.ascontiguousarray(batch[rows, :width])
        outputs = backend.encoder.run(wanted, {"src_ids": ids, "src_padding_mask": ids == backend.pad_id})
        groups.append((rows, width, outputs[len(backend.cross_names):]))
    return groups


def stacked(batch: np.ndarray, groups: list[Group]) -> None:
    rows_total, width = batch.shape
    layers = [np.zeros((rows_total, 4, width, width), np.float32) for _ in groups[0][2]]
    for rows, group_width, maps in groups:
        for layer, result in zip(layers, maps, strict=True):
            layer[rows, :, :group_width, :group_width] = result
    every = np.stack(layers, axis=1)
    for row, length in enumerate((batch != 0).sum(axis=1).tolist()):
        every[row, :, :, :length, :length].copy()


def in_place(batch: np.ndarray, groups: list[Group]) -> None:
    rows_total, width = batch.shape
    every = np.zeros((rows_total, len(groups[0][2]), 4, width, width), np.float32)
    for rows, group_width, maps in groups:
        for layer, result in enumerate(maps):
            every[rows, layer, :, :group_width, :group_width] = result
    for row, length in enumerate((batch != 0).sum(axis=1).tolist()):
        every[row, :, :, :length, :length].copy()


def median_ms(calls: dict[str, Callable[[], None]], rounds: int = 9) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def encoder_maps(engine: Engine, ids: list[list[int]]) -> None:
    for size in (32, 128):
        prepared = [(batch, encoded_groups(engine, batch))
                    for batch in (padded(ids[i:i + size], 0) for i in range(0, len(ids), size))]
        ways = {"stacked per-layer arrays": stacked, "one array written in place": in_place}
        def run_all(way: Callable[[np.ndarray, list[Group]], None], prepared: list = prepared) -> None:
            for batch, groups in prepared:
                way(batch, groups)
        result = median_ms({name: lambda way=way: run_all(way) for name, way in ways.items()})
        shown = ", ".join(f"{name} {ms:.2f} ms" for name, ms in result.items())
        print(f"encoder maps, batch {size}: {shown} (per {len(ids)} sentences)")


def decoder_maps() -> None:
    rng = np.random.default_rng(0)
    rows, layers, heads, width, steps = 64, 3, 4, 20, 20
    history, greedy = _History(), _GreedyMaps()
    alive = np.arange(rows)
    for step in range(steps):
        kept = None
        if step in (8, 14):  # compactions: every other row stays
            kept = np.arange(0, alive.size, 2)
            alive = alive[kept]
        cross = rng.random((alive.size, layers, heads, width), dtype=np.float32)
        self_att = rng.random((alive.size, layers, heads, step + 1), dtype=np.float32)
        history.parents.append(kept)
        history.cross.append(cross)
        history.self_.append(self_att)
        greedy.add(step, alive, cross, self_att)
    row, position = int(alive[0]), 0
    def walk() -> tuple[np.ndarray, np.ndarray]:
        return history.attention(history.path(steps - 1, position), 15)
    walked = timeit.timeit(walk, number=5000) / 5000
    sliced = timeit.timeit(lambda: greedy.of(row, steps, 15), number=5000) / 5000
    for a, b in zip(walk(), greedy.of(row, steps, 15), strict=True):
        assert np.array_equal(a, b)
    print(f"decoder maps of one row, {steps} steps, two compactions: back-pointer history "
          f"{walked * 1e6:.1f} us, buffers per stretch {sliced * 1e6:.1f} us (the same arrays)")


def main() -> None:
    engine = Engine.load("model_repository", "toy-en-es", threads=1)
    ids = [e.ids for e in engine.encode_texts([x.source for x in toy_split("test", 512)])]
    encoder_maps(engine, ids)
    decoder_maps()
    engine.close()


if __name__ == "__main__":
    main()
