"""`OnnxBackend`: the search's `StepBackend` over the exported graphs (encoder, decoder step, select).

The encoder runs once per padded batch (on CPU once per group of similar source lengths); the decoder-step
graph runs once per generated position over the rows that are still unfinished, with the key/value cache
passed from one step to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.core.model_format import decoder_outputs, select_outputs
from service.core.search import Maps
from service.engine.onnx_runtime import CPU

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


def cache_length(value: Cache) -> int:
    """Entries along a cache's length axis ([N, H, t, Dh]), without copying a device cache to the host."""
    return value.shape[2] if isinstance(value, np.ndarray) else value.shape()[2]


def to_host(value: Cache) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


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
        self.group_encoder_by_length = encoder.get_providers()[0] == CPU

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[DecoderState, np.ndarray | None]:
        padding = src_ids == self.pad_id
        wanted = self.cross_names + (self.encoder_attention_names if with_attention else [])
        groups = encoder_groups((~padding).sum(axis=1)) if self.group_encoder_by_length else []
        encoder_attention = None
        if len(groups) > 1:
            # (Grouping is on only for the CPU provider: with IO binding the arrays are wrapped, not copied.)
            cross, encoder_attention = self._encode_groups(src_ids, groups, wanted)
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
        if with_attention and encoder_attention is None:
            encoder_attention = np.stack(outputs[2 * self.n_layers :], axis=1)  # L x [B,H,S,S] -> [B,L,H,S,S]
        empty = np.zeros((len(src_ids), self.n_heads, 0, self.head_dim), dtype=np.float32)
        state = DecoderState(
            [empty] * self.n_layers,
            [empty] * self.n_layers,
            cross[0::2],
            cross[1::2],
            padding,
            np.zeros(len(src_ids), dtype=np.int64),
        )
        return state, encoder_attention

    def _encode_groups(self, src_ids: np.ndarray, groups: list[np.ndarray], wanted: list[str]
                       ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The encoder run per group of rows, each cut to its own longest source, put back at full width:
        (cross keys and values, L x 2 arrays [B,H,S,Dh]; encoder attention [B,L,H,S,S] if wanted, else None).

        A real position's outputs do not depend on the padding after it (padded keys get exactly zero
        weight), so the tokens and attention maps are those of one whole-batch run (bitwise on the toy
        test split). Columns beyond a row's own length stay zero: they are masked everywhere downstream,
        and the search trims the encoder attention to each sentence's length. The maps go straight into
        their layer of one [B,L,H,S,S] array: stacking per-layer arrays afterwards copied all of it again
        (encoder maps of 512 sentences at batch 128: 12-14 ms on the host that way, 2.7-2.8 ms this way;
        docs/experiments/maps_cost.py).
        """
        batch, width = src_ids.shape
        n_cross = len(self.cross_names)
        heads, n_maps = self.n_heads, len(wanted) - n_cross
        cross = [np.zeros((batch, heads, width, self.head_dim), dtype=np.float32) for _ in range(n_cross)]
        attention = np.zeros((batch, n_maps, heads, width, width), dtype=np.float32) if n_maps else None
        for rows in groups:
            group_width = int((src_ids[rows] != self.pad_id).sum(axis=1).max())
            ids = np.ascontiguousarray(src_ids[rows, :group_width])
            results = self.encoder.run(wanted, {"src_ids": ids, "src_padding_mask": ids == self.pad_id})
            for output, result in zip(cross, results[:n_cross], strict=True):
                output[rows, :, :group_width] = result
            if attention is not None:
                for layer, result in enumerate(results[n_cross:]):
                    attention[rows, layer, :, :group_width, :group_width] = result
        return cross, attention

    def step(
        self, state: DecoderState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[DecoderState, np.ndarray, Maps | None, Maps | None]:
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
            # Per layer, L x [N, H, 1, *] (search.Maps): the search writes them where it keeps them.
            first = 1 + 2 * layers
            cross, self_attention = outputs[first : first + layers], outputs[first + layers :]
        else:
            outputs = self.decoder.run(self.step_outputs, feeds)
            cross = self_attention = None
        present = outputs[1 : 1 + 2 * layers]
        state.self_key, state.self_value = present[0::2], present[1::2]
        state.positions = state.positions + 1
        return state, outputs[0], cross, self_attention

    def _step_bound(
        self, state: DecoderState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[DecoderState, np.ndarray, Maps | None, Maps | None]:
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
            cross, self_attention = maps[:layers], maps[layers:]  # per layer (search.Maps)
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

