"""`FixedStepBackend`: the search's `StepBackend` over decoder_fixed.onnx, whose shapes are fixed for a batch.

Every tensor a batch's steps read or write is allocated once where the session runs (host or GPU), at a
bucketed size (rows: a power of two; cache capacity: doubling from `FIRST_CAPACITY`; source width: a
multiple of `SOURCE_STEP`), and bound once. A step moves only what changed: the tokens and positions in,
each row's new cache entries (the graph's ScatterND, whose output is bound to the very cache it reads, so
onnxruntime writes in place and copies nothing else), the log-probs out. The same shapes and addresses at
every step are what a GPU's captured graph needs: with `cuda_graph`, the session is made with onnxruntime's
`enable_cuda_graph`, and each pooled set of tensors is its own captured graph (`gpu_graph_id`). On the CPU
the same graph and the same code run without capture, pooled or not; tests/engine/test_fixed_step.py checks
them against the dynamic step token for token.

Rows beyond a batch's real ones (up to its bucket) decode padding and are never read. Row b's cache entry for
position p is at index p whatever the other rows' positions, so rows that join a running batch need no left
padding. Moving rows (`select`, `merge`, a capacity bucket outgrown) goes through the host: rare in greedy
search (service.core.search compacts seldom), a cost on a GPU that beam search pays every step.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.core.model_format import fixed_step_outputs
from service.core.search import Maps
from service.engine.backend import OnnxBackend, to_host

FIRST_CAPACITY = 32  # cache entries of a new batch; doubled (a new bucket) when a row reaches it
SOURCE_STEP = 8  # source widths are bucketed to a multiple of this
# The inputs the host writes before each step (small: a row's token, position and cache slots).
STEP_INPUTS = ("tokens", "positions", "cache_slots")


def row_bucket(rows: int) -> int:
    """The smallest power of two holding `rows`."""
    return 1 << max(0, rows - 1).bit_length()


def capacity_bucket(entries: int, limit: int | None) -> int:
    capacity = FIRST_CAPACITY
    while capacity < entries:
        capacity *= 2
    return capacity if limit is None else max(entries, min(capacity, limit))


def width_bucket(width: int) -> int:
    return max(SOURCE_STEP, -(-width // SOURCE_STEP) * SOURCE_STEP)


@dataclass
class BoundTensors:
    """One bucket's tensors and their binding: `host` holds the arrays the host writes or reads (tokens,
    positions, cache_slots, src_padding_mask, cache_entries), `device` every bound tensor by graph name
    (caches under their input names), `graph_id` the captured graph that replays on exactly these tensors."""

    host: dict[str, np.ndarray]
    device: dict[str, ort.OrtValue]
    binding: ort.IOBinding
    graph_id: int = 0

    @property
    def bucket(self) -> tuple[int, int, int]:
        """(rows, capacity, source width) of its tensors."""
        host = self.host
        return (len(host["tokens"]), len(host["cache_entries"]), host["src_padding_mask"].shape[1])


@dataclass
class FixedState:
    """A batch of `rows` real rows: the first `rows` of a bucket's bound tensors."""

    rows: int
    tensors: BoundTensors

    @property
    def host(self) -> dict[str, np.ndarray]:
        return self.tensors.host

    @property
    def device(self) -> dict[str, ort.OrtValue]:
        return self.tensors.device

    @property
    def positions(self) -> np.ndarray:
        return self.tensors.host["positions"]

    @property
    def bucket(self) -> tuple[int, int, int]:
        return self.tensors.bucket


class FixedStepBackend:
    """`StepBackend` with the encoder of an `OnnxBackend` and the decoder step of decoder_fixed.onnx.

    `max_capacity`: the longest cache a row may need (the model's position table; None: unbounded).
    `cuda_graph`: capture each set of tensors' step once and replay it. A captured graph reads and writes the
    addresses it was captured on, so then (`persistent`, also testable on the CPU) every state takes a set
    of tensors from a pool kept per bucket and gives it back when it is dropped: a new batch copies into a
    set instead of allocating, and a set in use is never another state's. One search at a time per backend
    in that mode (the engine refuses in-process lanes beside it).
    """

    def __init__(
        self,
        encoder_backend: OnnxBackend,
        decoder: ort.InferenceSession,
        vocabulary_size: int,
        pad_id: int,
        max_capacity: int | None = None,
        device_type: str = "cpu",
        device_id: int = 0,
        cuda_graph: bool = False,
    ) -> None:
        self.encoder_backend = encoder_backend
        self.decoder = decoder
        self.n_layers = encoder_backend.n_layers
        self.n_heads = encoder_backend.n_heads
        self.head_dim = encoder_backend.head_dim
        self.vocabulary_size = vocabulary_size
        self.pad_id = pad_id
        self.max_capacity = max_capacity
        self.device_type = device_type
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        self.persistent = cuda_graph
        self._free: dict[tuple[int, int, int], list[BoundTensors]] = {}  # bucket -> sets no state holds
        self._sets = 0  # sets made so far: the next one's graph id
        self._pool_lock = threading.Lock()  # states are dropped (and their sets freed) on any thread
        layers = range(self.n_layers)
        self.cache_names = [f"cache_self_{kind}.{i}" for i in layers for kind in ("key", "value")]
        self.cross_names = encoder_backend.cross_names  # the encoder's outputs are the step's inputs
        outputs = fixed_step_outputs(self.n_layers)
        self.map_names = list(outputs[1 + 2 * self.n_layers :])  # cross_attention.*, then self_attention.*

    # -- tensors -----------------------------------------------------------------------------------------

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        # On the CPU the OrtValue wraps the array (no copy); on a GPU it is a copy in device memory.
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def _bind(
        self, host: dict[str, np.ndarray], tensors: dict[str, np.ndarray], graph_id: int
    ) -> BoundTensors:
        """Tensors where the session runs, starting as `host` (kept on the host too) and `tensors` (device
        only), and outputs of their own, all bound."""
        device = {name: self._on_device(array) for name, array in {**host, **tensors}.items()}
        binding = self.decoder.io_binding()
        for name, value in device.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.cache_names:  # the written caches are the caches read: onnxruntime writes in place
            binding.bind_ortvalue_output(name.replace("cache_", "written_"), device[name])
        # Outputs into tensors of their own too: a captured graph writes where it wrote when captured.
        bucket_rows, capacity = len(host["tokens"]), len(host["cache_entries"])
        width = host["src_padding_mask"].shape[1]
        outputs = {"log_probs": np.zeros((bucket_rows, self.vocabulary_size), np.float32)}
        for name in self.map_names:
            keys = width if name.startswith("cross") else capacity
            outputs[name] = np.zeros((bucket_rows, self.n_heads, 1, keys), np.float32)
        for name, array in outputs.items():
            device[name] = self._on_device(array)
            binding.bind_ortvalue_output(name, device[name])
        return BoundTensors(host, device, binding, graph_id)

    def _state(self, host: dict[str, np.ndarray], tensors: dict[str, np.ndarray], rows: int) -> FixedState:
        """A state of `rows` real rows whose tensors hold `host` and `tensors`."""
        if not self.persistent:
            return FixedState(rows, self._bind(host, tensors, 0))
        bucket = (len(host["tokens"]), len(host["cache_entries"]), host["src_padding_mask"].shape[1])
        with self._pool_lock:
            free = self._free.get(bucket)
            bound = free.pop() if free else None
            if bound is None:
                bound = self._bind(*self._fresh(*bucket), graph_id=self._sets)
                self._sets += 1
        for name, array in host.items():
            np.copyto(bound.host[name], array)
            bound.device[name].update_inplace(bound.host[name])
        for name, array in tensors.items():
            bound.device[name].update_inplace(np.ascontiguousarray(array))
        state = FixedState(rows, bound)
        weakref.finalize(state, self._give_back, bound)
        return state

    def _give_back(self, bound: BoundTensors) -> None:
        with self._pool_lock:
            self._free.setdefault(bound.bucket, []).append(bound)

    def _fresh(
        self, rows: int, capacity: int, width: int
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Host arrays and device tensors (zeros) of a bucket of `rows` rows, all rows padding."""
        heads, head_dim = self.n_heads, self.head_dim
        slots = np.zeros((rows, heads, 3), dtype=np.int64)
        slots[:, :, 0] = np.arange(rows)[:, None]
        slots[:, :, 1] = np.arange(heads)[None, :]
        mask = np.ones((rows, width), dtype=bool)
        mask[:, 0] = False  # a padding row attends to one (zero) key: finite, never read
        host = {
            "tokens": np.full(rows, self.pad_id, dtype=np.int64),
            "positions": np.zeros(rows, dtype=np.int64),
            "cache_slots": slots,
            "cache_entries": np.arange(capacity, dtype=np.int64),
            "src_padding_mask": mask,
        }
        # Zeros, not uninitialised memory: entries not yet written are masked, but a NaN there would still
        # poison the products.
        tensors = {name: np.zeros((rows, heads, capacity, head_dim), np.float32) for name in self.cache_names}
        tensors |= {name: np.zeros((rows, heads, width, head_dim), np.float32) for name in self.cross_names}
        return host, tensors

    def _gathered(self, parts: list[tuple[FixedState, np.ndarray]], capacity: int, width: int) -> FixedState:
        """A state of each part's rows in turn (`(state, rows)`: rows of that state, in that order), at
        `capacity` and `width`; every row keeps its position and cache entries."""
        count = sum(len(rows) for _, rows in parts)
        host, tensors = self._fresh(row_bucket(count), capacity, width)
        host["src_padding_mask"][:count] = True
        offset = 0
        for state, rows in parts:
            _, part_capacity, part_width = state.bucket
            kept, columns = min(capacity, part_capacity), min(width, part_width)
            target = slice(offset, offset + len(rows))
            for name in ("tokens", "positions"):
                host[name][target] = state.host[name][rows]
            host["src_padding_mask"][target, :columns] = state.host["src_padding_mask"][rows, :columns]
            for name in self.cache_names:
                tensors[name][target, :, :kept] = state.device[name].numpy()[rows, :, :kept]
            for name in self.cross_names:
                tensors[name][target, :, :columns] = state.device[name].numpy()[rows, :, :columns]
            offset += len(rows)
        return self._state(host, tensors, count)

    def _read(self, value: ort.OrtValue) -> np.ndarray:
        """A step's output as a new host array (the search keeps it; the bound buffer is reused)."""
        array = value.numpy()
        return array.copy() if self.device_type == "cpu" else array

    # -- StepBackend -------------------------------------------------------------------------------------

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[FixedState, np.ndarray | None]:
        encoded, encoder_attention = self.encoder_backend.encode(src_ids, with_attention)
        rows, width = src_ids.shape
        capacity = capacity_bucket(1, self.max_capacity)
        host, tensors = self._fresh(row_bucket(rows), capacity, width_bucket(width))
        host["src_padding_mask"][:rows] = True
        host["src_padding_mask"][:rows, :width] = encoded.src_padding_mask
        for i in range(self.n_layers):
            for kind, values in (("key", encoded.cross_key), ("value", encoded.cross_value)):
                tensors[f"cross_{kind}.{i}"][:rows, :, :width] = to_host(values[i])
        return self._state(host, tensors, rows), encoder_attention

    def step(
        self, state: FixedState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[FixedState, np.ndarray, Maps | None, Maps | None]:
        rows = state.rows
        entries = int(state.positions[:rows].max(initial=0)) + 1  # cache entries the step's rows use
        if entries > state.bucket[1]:  # a row reached the capacity: the next bucket
            capacity = capacity_bucket(entries, self.max_capacity)
            state = self._gathered([(state, np.arange(rows))], capacity, state.bucket[2])
        host = state.host
        host["tokens"][:rows] = tokens
        host["cache_slots"][:, :, 2] = state.positions[:, None]
        if self.device_type != "cpu":  # on the CPU the bound tensors are these arrays
            for name in STEP_INPUTS:
                state.device[name].update_inplace(host[name])
        options = None
        if self.cuda_graph:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(state.tensors.graph_id))
        self.decoder.run_with_iobinding(state.tensors.binding, options)
        log_probs = self._read(state.device["log_probs"])[:rows]
        cross = self_attention = None
        if with_attention:
            maps = [self._read(state.device[name])[:rows] for name in self.map_names]
            cross = maps[: self.n_layers]  # per layer (search.Maps)
            self_attention = [m[..., :entries] for m in maps[self.n_layers :]]
        state.positions[:rows] += 1
        return state, log_probs, cross, self_attention

    def select(self, state: FixedState, rows: np.ndarray) -> FixedState:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == state.rows and np.array_equal(rows, np.arange(state.rows)):
            return state
        # The source width shrinks to what the kept rows use, as in OnnxBackend.select.
        mask = state.host["src_padding_mask"][rows]
        used = int((~mask).sum(axis=1).max()) if len(rows) else 1
        return self._gathered([(state, rows)], state.bucket[1], width_bucket(used))

    def merge(self, first: FixedState, second: FixedState) -> FixedState:
        """`first`'s rows then `second`'s (rows joining a running batch): each keeps its own positions."""
        capacity = max(first.bucket[1], second.bucket[1])
        width = max(first.bucket[2], second.bucket[2])
        return self._gathered(
            [(first, np.arange(first.rows)), (second, np.arange(second.rows))], capacity, width
        )
