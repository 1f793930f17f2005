"""`Engine`: a model version, served. It loads and checks the version, then plans and dispatches.

It decides where a batch runs (its lanes: threads sharing one `Runner` in this process, or lane processes
with a `Runner` each, in which case this process loads no sessions), splits each batch over them by source
length, and sums what they return. It knows nothing of queues, requests or the wire.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path

from service.core.model_format import FLOAT32, ModelLoadError, ModelVersion, resolve
from service.core.options import TranslateOptions, max_steps
from service.core.postprocess import Translation, finish
from service.core.search import Hypothesis
from service.core.vocabulary import EncodedText, Vocabulary
from service.engine import lane_messages as msg
from service.engine.lane_process import ProcessLanes, ProcessRunningBatch
from service.engine.lanes import LaneThreads, lane_parts, plan_lanes
from service.engine.onnx_runtime import (
    CPU,
    CUDA,
    CUDA_FAILED,
    choose_providers,
    flush_denormals_on_this_thread,
)
from service.engine.runner import Runner, TimedRunningBatch
from service.engine.timing import Searched, StageTimes

log = logging.getLogger("translator.engine")


RunningBatchOnLane = TimedRunningBatch | ProcessRunningBatch


class Engine:
    """Translate texts with a model version: batches, options, attention maps, unknown-word replacement.

    A batch is decoded in `lanes` parallel parts (rows grouped by source length), each on a lane of its own
    (service.engine.lanes says why lanes, and how many).
    """

    def __init__(
        self,
        model: ModelVersion,
        device: str = "auto",
        threads: int | None = None,
        max_length_limit: int = 256,
        spinning: bool = False,
        io_binding: bool | None = None,
        lanes: int | None = None,
        lane_processes: bool = False,
        step_graph: str = "dynamic",
    ) -> None:
        self.model = model
        self.step_graph = step_graph
        self.vocabulary = self._load_vocabulary(model)
        threads = threads or os.cpu_count() or 1
        providers = choose_providers(device)
        positions = model.max_positions
        # No sentence is decoded past the model's position table, whatever the caller allows.
        self.max_length_limit = min(max_length_limit, positions) if positions else max_length_limit
        self.runner: Runner | None = None
        self.lane_processes: ProcessLanes | None = None
        self._lane_threads: LaneThreads | None = None
        self.lanes = plan_lanes(providers[0], threads, lanes)
        if lane_processes:
            self.lane_processes = self._start_lane_processes(device, threads, spinning, io_binding)
            if self.lane_processes.provider != providers[0]:  # "auto" found no usable CUDA
                self.lane_processes.close()
                self._cuda_failed(device)
                self.lanes = plan_lanes(CPU, threads, lanes)  # the CPU's lanes, not the GPU's
                self.lane_processes = self._start_lane_processes("cpu", threads, spinning, io_binding)
            self.provider = self.lane_processes.provider
            self.io_binding = self.lane_processes.io_binding
        else:
            self.runner = Runner(
                model, providers, max(1, threads // self.lanes), spinning, io_binding, step_graph
            )
            if self.runner.provider != providers[0]:
                self._cuda_failed(device)
                self.lanes = plan_lanes(CPU, threads, lanes)
                self.runner = Runner(
                    model, [CPU], max(1, threads // self.lanes), spinning, io_binding, step_graph
                )
            self.provider = self.runner.provider
            self.io_binding = self.runner.io_binding
            if self.lanes > 1:
                self._lane_threads = LaneThreads(self.lanes, "engine-lane", flush_denormals_on_this_thread)
                weakref.finalize(self, self._lane_threads.close)  # an engine nobody closes keeps no threads
        if step_graph == "fixed" and self.provider == CUDA and self.runner is not None and self.lanes > 1:
            # Its captured graphs replay on pooled tensors, one search at a time (service.engine.fixed_step).
            raise ModelLoadError(
                "--step-graph fixed on CUDA runs one lane per process: ask for --lanes 1 or lane processes"
            )
        if model.precision == "float16" and self.provider == CPU:
            log.warning("float16 graphs on the CPU: onnxruntime computes most of them in float32 there, at "
                        "float32's speed; float16 is meant for GPUs (int8 is the CPU's faster precision)")

    @classmethod
    def load(
        cls,
        repository: str | Path,
        name: str,
        version: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        max_length_limit: int = 256,
        spinning: bool = False,
        io_binding: bool | None = None,
        lanes: int | None = None,
        lane_processes: bool = False,
        precision: str = FLOAT32,
        step_graph: str = "dynamic",
    ) -> Engine:
        return cls(
            resolve(repository, name, version, precision=precision),
            device=device,
            threads=threads,
            max_length_limit=max_length_limit,
            spinning=spinning,
            io_binding=io_binding,
            lanes=lanes,
            lane_processes=lane_processes,
            step_graph=step_graph,
        )

    @staticmethod
    def _load_vocabulary(model: ModelVersion) -> Vocabulary:
        vocabulary = Vocabulary.from_file(model.file("tokenizer.json"))
        architecture = model.architecture
        if vocabulary.size != architecture.tgt_vocab_size:
            raise ModelLoadError(
                f"{model.file('tokenizer.json')}: {vocabulary.size} tokens, but model.json "
                f"says the model has {architecture.tgt_vocab_size}"
            )
        ours = {
            "pad": vocabulary.pad_id,
            "bos": vocabulary.bos_id,
            "eos": vocabulary.eos_id,
            "unk": vocabulary.unk_id,
        }
        if model.special_ids != ours:
            raise ModelLoadError(
                f"{model.file('model.json')}: special ids {model.special_ids} differ from tokenizer.json's "
                f"{ours}"
            )
        return vocabulary

    def _start_lane_processes(
        self, device: str, threads: int, spinning: bool, io_binding: bool | None
    ) -> ProcessLanes:
        load = msg.Load(
            self.model, device, max(1, threads // self.lanes), spinning, io_binding, self.step_graph
        )
        return ProcessLanes(load, self.lanes)

    def _cuda_failed(self, device: str) -> None:
        """CUDA was planned but onnxruntime ran on the CPU: an error if CUDA was insisted on."""
        if device == "cuda":
            raise ModelLoadError(
                f"{self.model.path}: device 'cuda' asked for, but onnxruntime could not start its CUDA "
                f"provider ({CUDA_FAILED})"
            )
        log.warning("onnxruntime could not start its CUDA provider (%s): running on the CPU", CUDA_FAILED)

    def encode_texts(self, texts: list[str]) -> list[EncodedText]:
        return [self.vocabulary.encode_source(text) for text in texts]

    def search(
        self,
        sources: list[list[int]],
        options: TranslateOptions,
        on_token: Callable[[int, int], object] | None = None,
        is_abandoned: Callable[[int], bool] | None = None,
        lanes: int | None = None,
        on_done: Callable[[int, Hypothesis], object] | None = None,
        wants_tokens: Callable[[int], bool] | None = None,
    ) -> Searched:
        """The shared search over a batch of source ids, in up to `lanes` (default: the engine's) parallel
        parts; its results in row order and the time its lanes spent. Rows are independent, so the results
        do not depend on the split; the callbacks get the caller's row numbers, possibly from several lanes
        at once, and must not call this engine's search themselves (a lane would wait for itself).
        `wants_tokens(row)`: whether that row's tokens matter to `on_token` (None: all): with lane
        processes only those cross, and a row whose lane dies is searched again when none of its tokens
        went out (see `ProcessLanes.search`)."""
        processes = self.lane_processes
        usable = self.lanes if processes is None else min(self.lanes, processes.count)
        parts = lane_parts([len(s) for s in sources], min(lanes or self.lanes, usable))
        if not parts:
            return Searched([], StageTimes())
        if processes is not None:
            return processes.search(
                parts, sources, options, self.max_length_limit, on_token, is_abandoned, on_done, wants_tokens
            )
        runner = self.runner
        assert runner is not None  # no lane processes: this process runs the search
        if len(parts) == 1:
            return runner.search(sources, options, self.max_length_limit, on_token, is_abandoned, on_done)
        results: list[Hypothesis | None] = [None] * len(sources)
        times = StageTimes()

        def run(rows: list[int]) -> None:
            part = runner.search(
                [sources[i] for i in rows],
                options,
                self.max_length_limit,
                None if on_token is None else lambda row, token: on_token(rows[row], token),
                None if is_abandoned is None else lambda row: is_abandoned(rows[row]),
                None if on_done is None else lambda row, hypothesis: on_done(rows[row], hypothesis),
            )
            for row, hypothesis in zip(rows, part.hypotheses, strict=True):
                results[row] = hypothesis
            times.add(part.times.encode_s, part.times.decode_s)

        lane_threads = self._lane_threads
        assert lane_threads is not None  # more than one part: the engine has lanes (closed: `run` refuses)
        # Every part runs on a lane thread of its own, none on the caller's: the lane threads flush denormals.
        futures = lane_threads.run([functools.partial(run, rows) for rows in parts])
        wait(futures)  # every lane has stopped before this returns or raises
        for future in futures:
            future.result()
        return Searched(results, times)

    def search_ids(
        self,
        sources: list[list[int]],
        options: TranslateOptions,
        on_token: Callable[[int, int], object] | None = None,
        is_abandoned: Callable[[int], bool] | None = None,
        lanes: int | None = None,
        on_done: Callable[[int, Hypothesis], object] | None = None,
    ) -> list[Hypothesis | None]:
        """`search`'s hypotheses alone."""
        return self.search(sources, options, on_token, is_abandoned, lanes, on_done).hypotheses

    def running_batch(
        self,
        options: TranslateOptions,
        on_token: Callable[[object, int], object] | None = None,
        on_done: Callable[[object, Hypothesis], object] | None = None,
        is_abandoned: Callable[[object], bool] | None = None,
        wants_tokens: Callable[[object], bool] | None = None,
    ) -> RunningBatchOnLane:
        """A running batch that sentences join between steps (`TranslateOptions.joins_running_batch`), on
        one lane: a lane process of its own when the engine has them (`wants_tokens(key)`: whether that row's
        tokens cross to this process; all of them when None), else the calling thread. Add sentences with
        `join`, `step` it, and `close` it when done."""
        if not options.joins_running_batch:
            raise ValueError("only greedy search without attention maps runs as a running batch")
        if self.lane_processes is not None:
            return ProcessRunningBatch(
                self.lane_processes, options, on_token, on_done, is_abandoned, wants_tokens
            )
        assert self.runner is not None
        return self.runner.running_batch(options, on_token, on_done, is_abandoned)

    def join(
        self,
        batch: RunningBatchOnLane,
        keys: list[object],
        sources: list[list[int]],
        options: TranslateOptions | list[TranslateOptions],
    ) -> float:
        """Join sentences to a running batch; `options` for all of them or one per sentence (each keeps its
        own max_length; the rest must be the batch's). Returns the encoder seconds it took."""
        each = options if isinstance(options, list) else [options] * len(sources)
        lengths = [
            max_steps(len(source), o.max_length, self.max_length_limit)
            for source, o in zip(sources, each, strict=True)
        ]
        return batch.add(keys, sources, lengths)

    @property
    def lanes_waited_for(self) -> int:
        """Callers waiting for a free lane process (0 without them)."""
        return 0 if self.lane_processes is None else self.lane_processes.waiting

    def close(self) -> None:
        """Stop the lane processes and threads, if any (the in-process sessions need no closing)."""
        if self.lane_processes is not None:
            self.lane_processes.close()
        if self._lane_threads is not None:
            self._lane_threads.close()

    def translate(
        self, texts: list[str], options: TranslateOptions | None = None, batch_size: int = 64
    ) -> list[Translation]:
        """Translate a list of texts; similar lengths share a batch, results come back in input order."""
        options = options or TranslateOptions()
        sources = self.encode_texts(texts)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i].ids))
        results: list[Translation | None] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            hypotheses = self.search_ids([sources[i].ids for i in chunk], options)
            for i, hypothesis in zip(chunk, hypotheses, strict=True):
                assert hypothesis is not None  # nothing is abandoned without is_abandoned
                results[i] = finish(self.vocabulary, sources[i], hypothesis, options)
        return [r for r in results if r is not None]
