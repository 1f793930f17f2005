"""The inference engine: a model version run by onnxruntime (CUDA if present, else CPU); no torch.

The encoder runs once per padded batch (on CPU once per group of similar source lengths); the decoder-step
graph runs once per generated position over the rows that are still unfinished, with the key/value cache
passed from one step to the next.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import io
import logging
import os
import platform
import queue
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.core.model_format import (
    ENCODER_INPUTS,
    ModelLoadError,
    ModelVersion,
    decoder_inputs,
    decoder_outputs,
    encoder_outputs,
    resolve,
    select_inputs,
    select_outputs,
)
from service.core.search import GreedyStream, Hypothesis, padded, search
from service.core.vocabulary import EncodedText, Vocabulary
from service.engine.lane_process import ProcessLanes, ProcessStream

log = logging.getLogger(__name__)

ATTENTION_KINDS = ("cross", "decoder_self", "encoder_self")


@dataclass(frozen=True)
class TranslateOptions:
    beam_size: int = 1
    max_length: int | None = None  # generated tokens; None: 2 x source length + 10, capped by the engine
    length_penalty: float = 1.0
    replace_unknowns: bool = False
    attention: frozenset[str] = frozenset()  # any of ATTENTION_KINDS

    def __post_init__(self) -> None:
        unknown = set(self.attention) - set(ATTENTION_KINDS)
        if unknown:
            raise ValueError(
                f"unknown attention kinds {sorted(unknown)}; expected some of {list(ATTENTION_KINDS)}"
            )
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention) or self.replace_unknowns

    def search_key(self) -> tuple:
        """Options that must be equal for sentences to share a batch."""
        return (self.beam_size, self.length_penalty, self.needs_attention)


@dataclass
class Translation:
    text: str
    token_ids: list[int]  # generated ids, no <s>/</s>
    target_tokens: list[str]  # decoder tokens, one per attention row (</s> included when produced)
    source_tokens: list[str]  # encoder tokens, one per attention column (</s> included)
    score: float
    log_prob: float
    unknown_words: list[str]
    cross_attention: np.ndarray | None = None  # [L, H, T, S]
    decoder_self_attention: np.ndarray | None = None  # [L, H, T, T]
    encoder_attention: np.ndarray | None = None  # [L, H, S, S]


# A cache tensor: a numpy array (plain mode, and the empty past of step 0), or in the IO-binding mode an
# OrtValue that stays on the session's device between steps.
Cache = np.ndarray | ort.OrtValue


@dataclass
class DecoderState:
    """One array per decoder layer (the graphs' own layout: nothing is split or stacked per step)."""

    self_key: list[Cache]  # L x [N, H, t, Dh]
    self_value: list[Cache]
    cross_key: list[Cache]  # L x [N, H, S, Dh]
    cross_value: list[Cache]
    src_padding_mask: np.ndarray  # [N, S] bool, True = padding (always on the host)
    # [N] int64: each row's own position (= its real cache entries; the cache of a row that joined later is
    # left-padded to the shared length t)
    positions: np.ndarray


def layers_stacked(maps: list[np.ndarray]) -> np.ndarray:
    """L x [N, H, 1, K] (one step's maps, one per layer) -> [N, L, H, K]; filled in place, which costs less
    per step than np.stack's generic path."""
    first = maps[0]
    stacked = np.empty((first.shape[0], len(maps), first.shape[1], first.shape[3]), dtype=first.dtype)
    for layer, weights in enumerate(maps):
        stacked[:, layer] = weights[:, :, 0]
    return stacked


def cache_length(value: Cache) -> int:
    """Entries along a cache's length axis ([N, H, t, Dh]), without copying a device cache to the host."""
    return value.shape[2] if isinstance(value, np.ndarray) else value.shape()[2]


def to_host(value: Cache) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def available_providers() -> list[str]:
    return ort.get_available_providers()


_PRELOAD_LOCK = threading.Lock()


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the `nvidia-*` pip packages before the first CUDA session.

    onnxruntime-gpu does not link them from there itself; without this, a machine whose CUDA comes from pip
    (no system toolkit) fails to create the CUDA provider and onnxruntime quietly falls back to the CPU.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21: the libraries must be on the loader's path
        return
    printed = io.StringIO()
    # It reports what it could not load on stdout (in colour): caught for the log. redirect_stdout swaps the
    # process-wide sys.stdout, so engines loading at the same time take turns (functools.cache does not lock).
    with _PRELOAD_LOCK, contextlib.redirect_stdout(printed):
        preload()
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", printed.getvalue()).split())
    if message:
        log.warning("loading CUDA libraries: %s", message)


# Float32 matrix products in float32, not TF32 (the CUDA provider's default on Ampere and later): TF32 keeps
# 10 mantissa bits, which moves log-probs by ~1e-3 and can flip a greedy choice against the PyTorch model.
CUDA_OPTIONS = {"use_tf32": "0"}


def choose_providers(device: str) -> list[str]:
    """`auto` takes CUDA when onnxruntime-gpu sees a GPU; `cuda` insists on it; `cpu` never uses it."""
    available = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ModelLoadError(f"device 'cuda' asked for, but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


# A padded key's attention score is the most negative float, and onnxruntime's CPU softmax takes exp of it
# through denormal intermediates, which this CPU runs about 9x slower (a [16,4,18,18] softmax with half its
# keys padded: 240 us instead of 27 us; the weights are 0 either way). The threads the engine owns (its lane
# threads, the lane processes) therefore flush denormals to zero for good. The caller's threads are left
# alone: onnxruntime's own option (session.set_denormal_as_zero) would set this on whichever thread builds a
# session, where the caller's code would then run without denormals too.
_MXCSR_FLUSH_DENORMALS = 0x8040  # bit 15: flush to zero; bit 6: denormals are zero


@functools.cache
def _libm() -> ctypes.CDLL | None:
    """glibc's libm on x86-64 (its fenv_t holds the SSE control word MXCSR as the 8th 32-bit field)."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


def flush_denormals_on_this_thread() -> bool:
    """Flush denormal floats to zero on the calling thread from now on; only for threads the engine owns.
    False where that cannot be done (not x86-64 Linux), which only costs speed."""
    libm = _libm()
    environment = (ctypes.c_uint32 * 16)()  # fenv_t is 32 bytes; room to spare
    if libm is None or libm.fegetenv(environment) != 0:
        return False
    environment[7] |= _MXCSR_FLUSH_DENORMALS
    return libm.fesetenv(environment) == 0


# The lanes run the same sessions at once, and a session's CPU arena serves them under one lock; the system
# allocator does not (README, "The engine": docs/experiments/arena_ab.py measures both).
CPU_MEMORY_ARENA = False


def make_session(
    path: Path, providers: list[str], threads: int | None, spinning: bool = False
) -> ort.InferenceSession:
    """An onnxruntime session; `spinning` lets idle intra-op workers busy-wait for the next operator.

    Spinning is off by default: each session has its own pool, so the encoder's workers spin while the
    decoder runs, and any worker spins while Python does the search between steps. On a machine whose
    cores are shared (a server's other threads, other processes) those spinning threads take the cores the
    running ones need: greedy batch 32 on 2 threads of a busy 2-core machine ran 3x faster without it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if providers[0] == "CPUExecutionProvider":
        options.enable_cpu_mem_arena = CPU_MEMORY_ARENA
    provider_options = [CUDA_OPTIONS if name == "CUDAExecutionProvider" else {} for name in providers]
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=providers, provider_options=provider_options
        )
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({error})") from error


def check_signature(
    session: ort.InferenceSession, path: Path, inputs: Iterable[str], outputs: Iterable[str], described: dict
) -> None:
    """The graph must have the inputs/outputs the engine feeds and model.json promises."""
    actual_inputs = [i.name for i in session.get_inputs()]
    actual_outputs = [o.name for o in session.get_outputs()]
    if actual_inputs != list(inputs) or actual_outputs != list(outputs):
        raise ModelLoadError(
            f"{path}: graph has inputs {actual_inputs} and outputs {actual_outputs}, "
            f"expected {list(inputs)} and {list(outputs)}"
        )
    if described.get("inputs") != actual_inputs or described.get("outputs") != actual_outputs:
        raise ModelLoadError(f"{path}: its inputs/outputs do not match those listed in model.json")


class LaneThreads:
    """Threads for the parts of a batch: each part on a thread of its own, each thread with its own queue.

    A ThreadPoolExecutor does not promise one part per thread (its workers take their work from one shared
    queue): with one, a batch's two parts sometimes ran one after the other on the same thread while the
    other lane idled, in 1 of 8 first batches and 1 of 40 later ones of a fresh two-lane engine, and in 2 to 3
    of 8 runs of tests/test_batcher.py's two-lane test. Batches that run at once (several batch workers) take
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


class OnnxBackend:
    """The `StepBackend` of service.core.search over the exported graphs (encoder, decoder step, select).

    `io_binding`: the cross keys/values (encoder outputs) and the decoder's self-attention caches are bound
    as outputs on `device_type`/`device_id` and fed back to the next step as `OrtValue`s, so on a GPU they
    stay in device memory instead of being copied to the host and back at every step. Only the small
    per-step inputs (tokens, padding mask) and what the search reads (log-probs, attention maps) cross to
    the host. Off (plain numpy feeds) by default; the Engine turns it on for CUDA.
    """

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        selector: ort.InferenceSession,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        pad_id: int,
        n_encoder_layers: int | None = None,
        io_binding: bool = False,
        device_type: str = "cpu",
        device_id: int = 0,
    ) -> None:
        self.io_binding = io_binding
        self.selector = selector  # select.onnx: `select` for device caches, where they are
        self.select_output_names = list(select_outputs(n_layers))
        self.device_type = device_type
        self.device_id = device_id
        self.encoder = encoder
        self.pad_id = pad_id
        self.decoder = decoder
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.head_dim = head_dim
        n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
        self.cross_names = [name for i in range(n_layers) for name in (f"cross_key.{i}", f"cross_value.{i}")]
        self.encoder_attention_names = [f"encoder_attention.{i}" for i in range(n_encoder_layers)]
        self.past_names = [
            name for i in range(n_layers) for name in (f"past_self_key.{i}", f"past_self_value.{i}")
        ]
        outputs = decoder_outputs(n_layers)
        self.step_outputs = list(outputs[: 1 + 2 * n_layers])
        self.step_outputs_with_attention = list(outputs)
        self.present_names = list(outputs[1 : 1 + 2 * n_layers])
        self.attention_outputs = list(outputs[1 + 2 * n_layers :])
        # On CPU the encoder's cost grows with rows x padded width, and a batch of mixed lengths is mostly
        # padding (toy test split at batch 128: 65%); on a GPU the padding is nearly free and every extra
        # run costs launches, so there the batch stays whole.
        self.group_encoder_by_length = encoder.get_providers()[0] == "CPUExecutionProvider"

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[DecoderState, np.ndarray | None]:
        padding = src_ids == self.pad_id
        wanted = self.cross_names + (self.encoder_attention_names if with_attention else [])
        groups = encoder_groups((~padding).sum(axis=1)) if self.group_encoder_by_length else []
        if len(groups) > 1:
            # (Grouping is on only for the CPU provider: with IO binding the arrays are wrapped, not copied.)
            outputs = self._encode_groups(src_ids, groups, wanted)
            cross = outputs[: 2 * self.n_layers]
            if self.io_binding:
                cross = [self._to_device(a) for a in cross]
        elif self.io_binding:
            binding = self.encoder.io_binding()
            binding.bind_cpu_input("src_ids", np.ascontiguousarray(src_ids))
            binding.bind_cpu_input("src_padding_mask", padding)
            for name in self.cross_names:
                binding.bind_output(name, self.device_type, self.device_id)
            for name in wanted[len(self.cross_names) :]:
                binding.bind_output(name, "cpu")
            self.encoder.run_with_iobinding(binding)
            values = binding.get_outputs()  # in the order bound
            cross = values[: 2 * self.n_layers]
            outputs = cross + [v.numpy() for v in values[2 * self.n_layers :]]
        else:
            outputs = self.encoder.run(wanted, {"src_ids": src_ids, "src_padding_mask": padding})
            cross = outputs[: 2 * self.n_layers]
        empty = np.zeros((len(src_ids), self.n_heads, 0, self.head_dim), dtype=np.float32)
        state = DecoderState(
            [empty] * self.n_layers,
            [empty] * self.n_layers,
            cross[0::2],
            cross[1::2],
            padding,
            np.zeros(len(src_ids), dtype=np.int64),
        )
        # L x [B, H, S, S] -> [B, L, H, S, S]
        encoder_attention = np.stack(outputs[2 * self.n_layers :], axis=1) if with_attention else None
        return state, encoder_attention

    def _encode_groups(self, src_ids: np.ndarray, groups: list[np.ndarray], wanted: list[str]
                       ) -> list[np.ndarray]:
        """The encoder run per group of rows, each cut to its own longest source, put back at full width.

        A real position's outputs do not depend on the padding after it (padded keys get exactly zero
        weight), so the tokens and attention maps are those of one whole-batch run (bitwise on the toy
        test split). Columns beyond a row's own length stay zero: they are masked everywhere downstream,
        and the search trims the encoder attention to each sentence's length.
        """
        batch, width = src_ids.shape
        n_cross = len(self.cross_names)
        outputs = [
            np.zeros((batch, self.n_heads, width, self.head_dim), dtype=np.float32) for _ in range(n_cross)
        ] + [
            np.zeros((batch, self.n_heads, width, width), dtype=np.float32)
            for _ in range(len(wanted) - n_cross)
        ]
        for rows in groups:
            group_width = int((src_ids[rows] != self.pad_id).sum(axis=1).max())
            ids = np.ascontiguousarray(src_ids[rows, :group_width])
            results = self.encoder.run(wanted, {"src_ids": ids, "src_padding_mask": ids == self.pad_id})
            for output, result in zip(outputs[:n_cross], results[:n_cross], strict=True):
                output[rows, :, :group_width] = result
            for output, result in zip(outputs[n_cross:], results[n_cross:], strict=True):
                output[rows, :, :group_width, :group_width] = result
        return outputs

    def step(
        self, state: DecoderState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[DecoderState, np.ndarray, np.ndarray | None, np.ndarray | None]:
        if self.io_binding:
            return self._step_bound(state, tokens, with_attention)
        feeds = {"tokens": tokens, "src_padding_mask": state.src_padding_mask, "positions": state.positions}
        layers = self.n_layers
        for i in range(layers):
            feeds[self.past_names[2 * i]] = state.self_key[i]
            feeds[self.past_names[2 * i + 1]] = state.self_value[i]
            feeds[self.cross_names[2 * i]] = state.cross_key[i]
            feeds[self.cross_names[2 * i + 1]] = state.cross_value[i]
        if with_attention:
            outputs = self.decoder.run(self.step_outputs_with_attention, feeds)
            # L x [N, H, 1, *] -> [N, L, H, *]
            first = 1 + 2 * layers
            cross = layers_stacked(outputs[first : first + layers])
            self_attention = layers_stacked(outputs[first + layers :])
        else:
            outputs = self.decoder.run(self.step_outputs, feeds)
            cross = self_attention = None
        present = outputs[1 : 1 + 2 * layers]
        state.self_key, state.self_value = present[0::2], present[1::2]
        state.positions = state.positions + 1
        return state, outputs[0], cross, self_attention

    def _step_bound(
        self, state: DecoderState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[DecoderState, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`step` with IO binding: caches in and out as device OrtValues, the rest through the host."""
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("src_padding_mask", state.src_padding_mask)
        binding.bind_cpu_input("positions", state.positions)
        layers = self.n_layers
        for i in range(layers):
            self._bind_input(binding, self.past_names[2 * i], state.self_key[i])
            self._bind_input(binding, self.past_names[2 * i + 1], state.self_value[i])
            self._bind_input(binding, self.cross_names[2 * i], state.cross_key[i])
            self._bind_input(binding, self.cross_names[2 * i + 1], state.cross_value[i])
        binding.bind_output("log_probs", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        if with_attention:
            for name in self.attention_outputs:
                binding.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(binding)
        values = binding.get_outputs()  # in the order bound
        present = values[1 : 1 + 2 * layers]
        state.self_key, state.self_value = present[0::2], present[1::2]
        state.positions = state.positions + 1
        if with_attention:
            maps = [v.numpy() for v in values[1 + 2 * layers :]]
            # L x [N, H, 1, *] -> [N, L, H, *]
            cross = layers_stacked(maps[:layers])
            self_attention = layers_stacked(maps[layers:])
        else:
            cross = self_attention = None
        return state, values[0].numpy(), cross, self_attention

    @staticmethod
    def _bind_input(binding: ort.IOBinding, name: str, value: Cache) -> None:
        if isinstance(value, np.ndarray):  # the empty past of step 0 (zero bytes to copy)
            binding.bind_cpu_input(name, value)
        else:
            binding.bind_ortvalue_input(name, value)

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        # On CPU the OrtValue wraps the (contiguous) array without a copy and keeps a reference to it.
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def merge(self, first: DecoderState, second: DecoderState) -> DecoderState:
        """The rows of `first` then those of `second` (rows joining a running batch): the shorter caches
        are left-padded to the longer length (the positions input masks that padding), the cross keys/values
        right-padded to the wider source (the padding mask covers it)."""
        past = max(cache_length(first.self_key[0]), cache_length(second.self_key[0]))
        width = max(first.src_padding_mask.shape[1], second.src_padding_mask.shape[1])

        def joined(a: Cache, b: Cache, length: int, left: bool) -> Cache:
            parts = []
            for value in (to_host(a), to_host(b)):
                missing = length - value.shape[2]
                pad = [(0, 0), (0, 0), (missing, 0) if left else (0, missing), (0, 0)]
                parts.append(np.pad(value, pad) if missing else value)
            merged = np.concatenate(parts, axis=0)
            return merged if isinstance(a, np.ndarray) else self._to_device(merged)

        masks = [
            np.pad(m, [(0, 0), (0, width - m.shape[1])], constant_values=True)
            for m in (first.src_padding_mask, second.src_padding_mask)
        ]
        return DecoderState(
            [joined(a, b, past, True) for a, b in zip(first.self_key, second.self_key, strict=True)],
            [joined(a, b, past, True) for a, b in zip(first.self_value, second.self_value, strict=True)],
            [joined(a, b, width, False) for a, b in zip(first.cross_key, second.cross_key, strict=True)],
            [joined(a, b, width, False) for a, b in zip(first.cross_value, second.cross_value, strict=True)],
            np.concatenate(masks, axis=0),
            np.concatenate([first.positions, second.positions]),
        )

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        mask = state.src_padding_mask[rows]
        # Trimming the source columns that no kept row uses spares the cross-attention work on padding.
        width = int((~mask).sum(axis=1).max()) if len(rows) else mask.shape[1]

        # Likewise the leading cache entries that are left padding for every kept row (rows that joined a
        # running batch later): none when the rows started together.
        # Device caches (IO binding) are selected by the select graph where they are: a round trip through
        # the host cost a GPU half of a batch-512 decode.
        positions = state.positions[rows]
        lead = cache_length(state.self_key[0]) - int(positions.max()) if len(rows) else 0
        if not isinstance(state.cross_key[0], np.ndarray):  # the IO-binding mode: device caches
            self_key, self_value, cross_key, cross_value = self._select_bound(state, rows, lead, width)
            return DecoderState(self_key, self_value, cross_key, cross_value,
                                np.ascontiguousarray(mask[:, :width]), positions)

        # np.take, not x[rows]: it returns a contiguous array (onnxruntime would copy a non-contiguous
        # input again on every later step); the cross keys/values are trimmed to `width` first.
        def take(value: np.ndarray, columns: int | None = None, lead: int = 0) -> np.ndarray:
            if columns is not None:
                value = value[:, :, :columns]
            return np.take(value[:, :, lead:] if lead else value, rows, axis=0)

        return DecoderState(
            [take(a, lead=lead) for a in state.self_key],
            [take(a, lead=lead) for a in state.self_value],
            [take(a, width) for a in state.cross_key],
            [take(a, width) for a in state.cross_value],
            np.ascontiguousarray(mask[:, :width]),
            positions,
        )

    def _select_bound(
        self, state: DecoderState, rows: np.ndarray, cache_start: int, source_width: int
    ) -> tuple[list[Cache], list[Cache], list[Cache], list[Cache]]:
        """`select` by the select graph, on the caches' device: kept caches per layer (self key, self
        value, cross key, cross value), the leading `cache_start` entries and the source columns from
        `source_width` on dropped."""
        binding = self.selector.io_binding()
        binding.bind_cpu_input("rows", np.ascontiguousarray(rows, dtype=np.int64))
        binding.bind_cpu_input("cache_start", np.array([cache_start], dtype=np.int64))
        binding.bind_cpu_input("source_width", np.array([source_width], dtype=np.int64))
        for i in range(self.n_layers):
            self._bind_input(binding, f"self_key.{i}", state.self_key[i])
            self._bind_input(binding, f"self_value.{i}", state.self_value[i])
            self._bind_input(binding, f"cross_key.{i}", state.cross_key[i])
            self._bind_input(binding, f"cross_value.{i}", state.cross_value[i])
        for name in self.select_output_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.selector.run_with_iobinding(binding)
        kept = binding.get_outputs()  # per layer: self key, self value, cross key, cross value
        return kept[0::4], kept[1::4], kept[2::4], kept[3::4]


# What one more encoder run costs on CPU, in padded source positions: onnxruntime's fixed cost per run of the
# default model (d_model 128, 3 layers) is about 0.3 ms, what 15-40 positions cost (1-2 threads).
ENCODER_RUN_COST = 32


def encoder_groups(lengths: np.ndarray, run_cost: float = ENCODER_RUN_COST) -> list[np.ndarray]:
    """Rows split into runs of similar source length, minimising padded positions + run_cost per run.

    Exact over contiguous ranges of the rows sorted by length (dynamic programming over the distinct
    lengths, at most the padded width of them).
    """
    order = np.argsort(lengths, kind="stable")
    values, counts = np.unique(lengths[order], return_counts=True)
    ends = np.concatenate([[0], np.cumsum(counts)])
    best = np.zeros(len(values) + 1)
    start = np.zeros(len(values) + 1, dtype=np.int64)
    for b in range(1, len(values) + 1):
        # Cheapest split of the first b lengths whose last run covers lengths a..b-1 (padded to values[b-1]).
        costs = best[:b] + values[b - 1] * (ends[b] - ends[:b]) + run_cost
        start[b] = int(np.argmin(costs))
        best[b] = costs[start[b]]
    groups = []
    b = len(values)
    while b > 0:
        groups.append(order[ends[start[b]]:ends[b]])
        b = int(start[b])
    return groups[::-1]


# A lane's time for a run of rows, in units of one source token: every step costs a fixed share (weights,
# kernel launches) that the longest row decides, plus a share per row and step. Fitted on the 2-core CPU
# over 300 runs of 1-64 rows of the test sentences (docs/experiments/lane_split_fit.py; mean error 5-6%,
# two fits gave 12.6-13.5 and 0.44-0.46).
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
    smaller batches in the service (README, "GPU"): 1 unless asked."""
    if provider == "CUDAExecutionProvider":
        return max(1, lanes or 1)
    return max(1, min(lanes or threads, threads))


class Engine:
    """Translate texts with a model version: batches, options, attention maps, unknown-word replacement.

    A batch is decoded in `lanes` parallel parts (rows grouped by source length), each on its own thread
    (onnxruntime releases the GIL while it runs). On CPU each lane runs single-threaded onnxruntime calls:
    at this model's size a decoding step is a few hundred small kernels, and two threads inside one kernel
    gain little over one (their hand-offs cost about what the split work saves), while two lanes each on
    one core give about 1.6-1.8x (README, "The engine"). On a GPU lanes only overlap kernel launches.
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
    ) -> None:
        self.model = model
        self.providers = choose_providers(device)
        threads = threads or os.cpu_count() or 1
        self.vocabulary = Vocabulary.from_file(model.file("tokenizer.json"))
        architecture = model.architecture
        if self.vocabulary.size != architecture.tgt_vocab_size:
            raise ModelLoadError(
                f"{model.file('tokenizer.json')}: {self.vocabulary.size} tokens, but model.json "
                f"says the model has {architecture.tgt_vocab_size}"
            )
        special = model.special_ids
        ours = {
            "pad": self.vocabulary.pad_id,
            "bos": self.vocabulary.bos_id,
            "eos": self.vocabulary.eos_id,
            "unk": self.vocabulary.unk_id,
        }
        if special != ours:
            raise ModelLoadError(
                f"{model.file('model.json')}: special ids {special} differ from tokenizer.json's {ours}"
            )
        graphs = model.description["graphs"]
        self.lanes = plan_lanes(self.providers[0], threads, lanes)
        encoder, decoder, selector = self._sessions(threads, spinning)
        if self.providers[0] == "CUDAExecutionProvider" and encoder.get_providers()[0] != self.providers[0]:
            # onnxruntime logs a failed CUDA provider and carries on with the CPU; asked for CUDA, we do not.
            reason = "its log above says why: usually a CUDA or cuDNN library it cannot find"
            if device == "cuda":
                raise ModelLoadError(
                    f"{model.path}: device 'cuda' asked for, but onnxruntime could not start its CUDA "
                    f"provider ({reason})"
                )
            log.warning("onnxruntime could not start its CUDA provider (%s): running on the CPU", reason)
            self.providers = ["CPUExecutionProvider"]
            self.lanes = plan_lanes(self.providers[0], threads, lanes)  # the CPU's lanes, not the GPU's
            encoder, decoder, selector = self._sessions(threads, spinning)
        layers = architecture.n_decoder_layers
        check_signature(
            encoder,
            model.file("encoder.onnx"),
            ENCODER_INPUTS,
            encoder_outputs(architecture.n_encoder_layers, layers),
            graphs.get("encoder", {}),
        )
        check_signature(
            decoder,
            model.file("decoder.onnx"),
            decoder_inputs(layers),
            decoder_outputs(layers),
            graphs.get("decoder", {}),
        )
        check_signature(
            selector,
            model.file("select.onnx"),
            select_inputs(layers),
            select_outputs(layers),
            graphs.get("select", {}),
        )
        self.provider = encoder.get_providers()[0]
        on_cuda = self.provider == "CUDAExecutionProvider"
        self._lane_threads = (
            LaneThreads(self.lanes, "engine-lane", flush_denormals_on_this_thread) if self.lanes > 1 else None
        )
        if self._lane_threads is not None:  # an engine nobody closes does not keep its threads
            weakref.finalize(self, self._lane_threads.close)
        # The lanes may run in processes of their own (service.engine.lane_process); `search_ids` sends them
        # its parts, and this process's sessions serve everything else (streams, warm-up). On a GPU each
        # lane process holds a CUDA context of its own.
        self.lane_processes: ProcessLanes | None = None
        if lane_processes:
            self.lane_processes = ProcessLanes(
                model,
                self.lanes,
                max(1, threads // self.lanes),
                max_length_limit,
                spinning,
                device="cuda" if on_cuda else "cpu",
            )
        # IO binding (caches kept on the device between steps) is automatic on CUDA; on CPU there is no
        # copy to spare, so plain numpy feeds stay the default there (`io_binding=True` forces it, for tests).
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        self.backend = OnnxBackend(
            encoder,
            decoder,
            selector,
            layers,
            architecture.n_heads,
            architecture.head_dim,
            self.vocabulary.pad_id,
            n_encoder_layers=architecture.n_encoder_layers,
            io_binding=self.io_binding,
            device_type="cuda" if on_cuda else "cpu",
            device_id=0,
        )
        self.max_length_limit = max_length_limit
        self._check_shapes()

    def _sessions(
        self, threads: int, spinning: bool
    ) -> tuple[ort.InferenceSession, ort.InferenceSession, ort.InferenceSession]:
        """The encoder, decoder-step and select sessions, each lane's share of the threads per session."""
        lane_threads = max(1, threads // self.lanes)
        return (
            make_session(self.model.file("encoder.onnx"), self.providers, lane_threads, spinning),
            make_session(self.model.file("decoder.onnx"), self.providers, lane_threads, spinning),
            make_session(self.model.file("select.onnx"), self.providers, 1, spinning),
        )

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
    ) -> Engine:
        return cls(
            resolve(repository, name, version),
            device=device,
            threads=threads,
            max_length_limit=max_length_limit,
            spinning=spinning,
            io_binding=io_binding,
            lanes=lanes,
            lane_processes=lane_processes,
        )

    def _check_shapes(self) -> None:
        """The graphs' fixed dimensions must be the ones model.json describes (layers, heads, vocabulary)."""
        architecture = self.model.architecture
        layers, heads, head_dim = architecture.n_decoder_layers, architecture.n_heads, architecture.head_dim
        expected = {("decoder.onnx", "log_probs"): [None, architecture.tgt_vocab_size]}
        for i in range(layers):
            expected["encoder.onnx", f"cross_key.{i}"] = [None, heads, None, head_dim]
            expected["encoder.onnx", f"cross_value.{i}"] = [None, heads, None, head_dim]
            expected["decoder.onnx", f"past_self_key.{i}"] = [None, heads, None, head_dim]
            expected["decoder.onnx", f"past_self_value.{i}"] = [None, heads, None, head_dim]
        sessions = {"encoder.onnx": self.backend.encoder, "decoder.onnx": self.backend.decoder}
        for (file, name), dims in expected.items():
            session = sessions[file]
            values = {v.name: v.shape for v in [*session.get_inputs(), *session.get_outputs()]}
            actual = [d if isinstance(d, int) else None for d in values[name]]
            if actual != dims:
                raise ModelLoadError(
                    f"{self.model.file(file)}: '{name}' has dimensions {values[name]}, but "
                    f"model.json describes {layers} decoder layers, {heads} heads of size "
                    f"{head_dim} and a vocabulary of {architecture.tgt_vocab_size}"
                )

    def encode_texts(self, texts: list[str]) -> list[EncodedText]:
        return [self.vocabulary.encode_source(text) for text in texts]

    def max_length_for(self, source_length: int, options: TranslateOptions) -> int:
        """Per sentence, so that a translation does not depend on the batch it shares."""
        automatic = 2 * source_length + 10
        return min(options.max_length or automatic, self.max_length_limit)

    def search_ids(
        self,
        sources: list[list[int]],
        options: TranslateOptions,
        on_token: Callable[[int, int], None] | None = None,
        is_abandoned: Callable[[int], bool] | None = None,
        lanes: int | None = None,
        on_done: Callable[[int, Hypothesis], None] | None = None,
    ) -> list[Hypothesis | None]:
        """Run the shared search over a batch of source ids, in up to `lanes` (default: the engine's)
        parallel parts. Rows are independent, so the results do not depend on the split; the callbacks
        get the caller's row numbers, possibly from several lane threads at once, and must not call this
        engine's search themselves (a lane would wait for itself)."""
        usable = self.lanes if self.lane_processes is None else min(self.lanes, self.lane_processes.count)
        parts = lane_parts([len(s) for s in sources], min(lanes or self.lanes, usable))
        if self.lane_processes is not None and parts:
            results, encode_s, decode_s = self.lane_processes.search(
                parts, sources, options, self.max_length_limit, on_token, is_abandoned, on_done
            )
            self._record_times(encode_s, decode_s)
            return results
        if len(parts) <= 1:
            return self._search_padded(sources, options, on_token, is_abandoned, on_done)
        results: list[Hypothesis | None] = [None] * len(sources)

        def run(rows: list[int]) -> None:
            local_on_token = None if on_token is None else lambda row, token: on_token(rows[row], token)
            local_abandoned = None if is_abandoned is None else lambda row: is_abandoned(rows[row])
            local_done = None if on_done is None else lambda row, hypothesis: on_done(rows[row], hypothesis)
            found = self._search_padded(
                [sources[i] for i in rows], options, local_on_token, local_abandoned, local_done
            )
            for row, hypothesis in zip(rows, found, strict=True):
                results[row] = hypothesis

        lane_threads = self._lane_threads
        assert lane_threads is not None  # more than one part: the engine has lanes (closed: `run` refuses)
        # Each lane runs in a copy of the caller's context (context variables, such as the batcher's timing
        # of the running batch, follow the batch into the lane threads). Every part runs on a lane thread of
        # its own, none on the caller's: the lane threads flush denormals (flush_denormals_on_this_thread).
        futures = lane_threads.run(
            [functools.partial(contextvars.copy_context().run, run, rows) for rows in parts]
        )
        wait(futures)  # every lane has stopped before this returns or raises
        for future in futures:
            future.result()
        return results

    def _search_padded(
        self,
        sources: list[list[int]],
        options: TranslateOptions,
        on_token: Callable[[int, int], None] | None,
        is_abandoned: Callable[[int], bool] | None,
        on_done: Callable[[int, Hypothesis], None] | None = None,
    ) -> list[Hypothesis | None]:
        """The shared search over one padded batch."""
        src_ids = padded(sources, self.vocabulary.pad_id)
        return search(
            self.backend,
            src_ids,
            pad_id=self.vocabulary.pad_id,
            bos_id=self.vocabulary.bos_id,
            eos_id=self.vocabulary.eos_id,
            beam_size=options.beam_size,
            max_length=np.array([self.max_length_for(len(s), options) for s in sources]),
            length_penalty=options.length_penalty,
            with_attention=options.needs_attention,
            on_token=on_token,
            is_abandoned=is_abandoned,
            on_done=on_done,
        )

    def close(self) -> None:
        """Stop the lane processes and threads, if any (the in-process sessions need no closing)."""
        if self.lane_processes is not None:
            self.lane_processes.close()
        if self._lane_threads is not None:
            self._lane_threads.close()

    def can_stream(self, options: TranslateOptions) -> bool:
        """Whether sentences with these options can join a running batch (`stream`)."""
        return options.beam_size == 1 and not options.needs_attention

    def stream(
        self,
        options: TranslateOptions,
        on_token: Callable[[object, int], object] | None = None,
        on_done: Callable[[object, Hypothesis], object] | None = None,
        is_abandoned: Callable[[object], bool] | None = None,
        wants_tokens: Callable[[object], bool] | None = None,
    ) -> GreedyStream | ProcessStream:
        """A running batch that sentences join between steps (greedy, no attention maps: `can_stream`),
        on one lane: a lane process of its own when the engine has them (`wants_tokens(key)`: whether that
        row's tokens cross to this process; all of them when None), else the calling thread. Add sentences
        with `stream_add`, `step` it, and `close` it when done."""
        if not self.can_stream(options):
            raise ValueError("only greedy search without attention maps runs as a stream")
        if self.lane_processes is not None:
            lanes, record = self.lane_processes, self._record_times
            return ProcessStream(lanes, options, on_token, on_done, is_abandoned, wants_tokens, record)
        return GreedyStream(
            self.backend,
            pad_id=self.vocabulary.pad_id,
            bos_id=self.vocabulary.bos_id,
            eos_id=self.vocabulary.eos_id,
            length_penalty=options.length_penalty,
            on_token=on_token,
            on_done=on_done,
            is_abandoned=is_abandoned,
            max_positions=self.model.description["architecture"].get("max_positions"),
        )

    @property
    def lanes_waited_for(self) -> int:
        """Callers waiting for a free lane process (0 without them)."""
        return 0 if self.lane_processes is None else self.lane_processes.waiting

    def _record_times(self, encode_s: float, decode_s: float) -> None:
        times = getattr(self.backend, "times", None)  # the batcher's timing wrapper, when there is one
        if callable(times):
            times().add(encode_s=encode_s, decode_s=decode_s)

    def stream_add(
        self,
        stream: GreedyStream | ProcessStream,
        keys: list[object],
        sources: list[list[int]],
        options: TranslateOptions | list[TranslateOptions],
    ) -> None:
        """Join sentences to a stream; `options` for all of them or one per sentence (each keeps its own
        max_length; the rest must be the stream's)."""
        each = options if isinstance(options, list) else [options] * len(sources)
        lengths = [self.max_length_for(len(source), o) for source, o in zip(sources, each, strict=True)]
        stream.add(keys, sources, lengths)

    def finish(self, source: EncodedText, hypothesis: Hypothesis, options: TranslateOptions) -> Translation:
        """Text, tokens and the attention maps the caller asked for, trimmed to the real lengths."""
        ids = list(hypothesis.tokens)
        target_tokens = self.vocabulary.tokens(ids) + (["</s>"] if hypothesis.finished else [])
        text = self.vocabulary.decode(ids)
        if (
            options.replace_unknowns
            and self.vocabulary.unk_id in ids
            and hypothesis.cross_attention is not None
        ):
            text = self.replace_unknowns(ids, source, hypothesis.cross_attention)
        wanted = options.attention
        return Translation(
            text=text,
            token_ids=ids,
            target_tokens=target_tokens,
            source_tokens=list(source.tokens),
            score=hypothesis.score,
            log_prob=hypothesis.log_prob,
            unknown_words=list(source.unknown_words),
            cross_attention=hypothesis.cross_attention if "cross" in wanted else None,
            decoder_self_attention=hypothesis.self_attention if "decoder_self" in wanted else None,
            encoder_attention=hypothesis.encoder_attention if "encoder_self" in wanted else None,
        )

    def replace_unknowns(self, ids: list[int], source: EncodedText, cross_attention: np.ndarray) -> str:
        """Each generated <unk> becomes the source word its mean cross-attention points to most."""
        mean = cross_attention.mean(axis=(0, 1))[:, :-1]  # the source </s> is not a word to copy
        words = []
        for position, token_id in enumerate(ids):
            if token_id == self.vocabulary.unk_id and mean.shape[1]:
                words.append(source.pieces[int(mean[position].argmax())])
            else:
                words.append(self.vocabulary.decode([token_id]))
        return " ".join(w for w in words if w)

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
                results[i] = self.finish(sources[i], hypothesis, options)
        return [r for r in results if r is not None]
