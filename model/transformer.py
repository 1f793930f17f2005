"""A small encoder-decoder Transformer ("Attention Is All You Need"), written out in one file.

Pre-norm variant (LayerNorm before every sublayer, one final LayerNorm after each stack) because it trains
stably without warm-up tricks at this size. Names follow the paper: query, key, value, memory, src_mask,
tgt_mask.

Three ways to run the decoder, all computing the same function (tests/model/test_transformer.py checks it):

* ``forward(src_ids, tgt_in_ids)``: training, teacher forcing, logits for every target position.
* ``decode_full(tgt_in_ids, memory, src_padding_mask)``: the whole target prefix at once, without a cache,
  returning log-probs and attention maps; this is the "PyTorch eager without cache" baseline and the
  reference for the cached path.
* ``encode`` + ``cross_keys_values`` once per source, then ``decode_step`` once per generated token with a
  growing self-attention key/value cache. These are the calls the ONNX encoder and decoder-step graphs
  wrap, so they take and return plain tensors, branch only on shapes, and never modify their inputs. The
  graphs call their per-layer variants (``encode_layers``, ``cross_keys_values_layers``,
  ``decode_step_layers``: one tensor per layer instead of stacked ``[L, ...]`` ones), which the stacked
  calls are built on. ``decode_step_in_place_layers`` is the same step on caches of a fixed capacity, each
  row's new entry written at its own position (the fixed-shape graph).

Shape letters: B batch, S source length, T target length, t cache length (tokens decoded so far), D d_model,
H heads, Dh = D / H, L layers, V target vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONS = ("absolute", "relative")


def position_problems(
    positions: str, relative_buckets: int, relative_max_distance: int, name: Callable[[str], str] = str
) -> list[str]:
    """What is wrong with a position setting, each field called ``name(field)`` (training names them as
    flags): the one check behind TransformerConfig and translator-train's refusals."""
    found = []
    if positions not in POSITIONS:
        found.append(f"{name('positions')} must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if relative_buckets < 4 or relative_buckets % 4:
        found.append(f"{name('relative_buckets')} must be a multiple of 4, at least 4, "
                     f"got {relative_buckets}")
    elif relative_max_distance <= relative_buckets // 2:
        found.append(f"{name('relative_max_distance')} must exceed {name('relative_buckets')} / 2 "
                     f"({relative_buckets // 2}), got {relative_max_distance}")
    return found


@dataclass
class TransformerConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    max_positions: int = 512
    # "absolute": sinusoids added to the embeddings (positions past the longest training text are unseen);
    # "relative": no position table, a learned bias per head and bucket of key - query distance in every
    # self-attention (T5's buckets), distances beyond `relative_max_distance` all in the last bucket
    # (docs/decisions/long-sentences.md).
    positions: str = "absolute"
    relative_buckets: int = 32
    relative_max_distance: int = 24
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError("d_model must be even for the sin/cos position table")
        if problems := position_problems(self.positions, self.relative_buckets, self.relative_max_distance):
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        return cls(**data)


def relative_position_buckets(
    distance: Tensor, bidirectional: bool, buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of each key - query distance (int64, same shape).

    Half the buckets (or half of each direction's half, when bidirectional) are exact distances, the rest
    logarithmically wider up to ``max_distance``; anything farther shares the last bucket. A decoder
    (unidirectional) sees only keys at or before its query. Computed in float32 with truncation, the way
    CTranslate2 computes it, so that a converted model attends exactly like ours (tests check that no
    distance lands within float32 rounding of a bucket boundary).
    """
    bucket = torch.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (distance > 0).long() * buckets
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)
    exact = buckets // 2
    far = exact + (
        torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)
    ).long()
    return bucket + torch.where(distance < exact, distance, far.clamp(max=buckets - 1))


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """[T, T] boolean, True above the diagonal: position i may not look at positions j > i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``n_heads`` subspaces.

    Split into ``project_query`` / ``project_key_value`` / ``attend`` so that incremental decoding can
    project keys and values once (the source for cross-attention, one new token for self-attention; see the
    ``step_*`` methods). Key/value tensors in head layout are ``[B, H, Tk, Dh]``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """[B, T, D] -> [B, H, T, Dh]"""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def project_query(self, query: Tensor) -> Tensor:
        return self.split_heads(self.query(query))

    def project_key_value(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.key(key)), self.split_heads(self.value(value))

    def packed_query_key_value(self, x: Tensor, query_scale: float = 1.0) -> Tensor:
        """Self-attention's three projections of x [..., D] as one matrix product -> [..., 3D]
        (query, key, value side by side)."""
        weight = torch.cat([self.query.weight * query_scale, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias * query_scale, self.key.bias, self.value.bias])
        return F.linear(x, weight, bias)

    def fused_query_key_value(self, x: Tensor, query_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's three projections of x [..., D] as one matrix product -> 3 x [..., D]."""
        packed = self.packed_query_key_value(x, query_scale)
        query, key, value = packed.split(self.n_heads * self.head_dim, dim=-1)
        return query, key, value

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attention on projected heads: ([B,H,Tq,Dh], [B,H,Tk,Dh] x2) -> ([B,Tq,D], weights [B,H,Tq,Tk]).
        ``position_bias`` [H,Tq,Tk] is added to the scores (relative positions)."""
        scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)
        if position_bias is not None:
            scores = scores + position_bias
        mask = self._combine_masks(key_padding_mask, attn_mask)
        if mask is not None:
            # The most negative finite value rather than -inf: a fully masked row then stays finite (no
            # NaN in the forward or the backward pass) and is zeroed below like every masked entry.
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        if mask is not None:
            weights = weights.masked_fill(mask, 0.0)
        context = self.dropout(weights) @ value
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.output(context), weights

    @staticmethod
    def _combine_masks(key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
        """Broadcastable [B|1, 1, Tq|1, Tk] boolean mask, True = may not attend."""
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            # [Tq, Tk] is shared by the batch, [B, Tq, Tk] is per sentence; both are shared by the heads.
            extra = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]
            mask = extra if mask is None else mask | extra
        return mask

    # -- one new query position (incremental decoding, inference only) -------------------------------
    # Written for the exported decoder-step graph, which runs once per generated token: rows are [B, D]
    # (no length axis), the three self-attention projections are one matrix product, the 1/sqrt(Dh) scale
    # is folded into the query projection, masks are additive, and reshapes put -1 on the batch axis so
    # the graph holds constant shapes instead of Shape/Gather/Concat chains. Each of those saves nodes that
    # onnxruntime would dispatch on every step.

    def step_query_key_value(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B,D] -> (scaled query, key, value) of the new position, each [B,H,1,Dh]."""
        query, key, value = self.fused_query_key_value(x, query_scale=1 / math.sqrt(self.head_dim))
        return self._step_heads(query), self._step_heads(key), self._step_heads(value)

    def step_query(self, x: Tensor) -> Tensor:
        """x [B,D] -> scaled query [B,H,1,Dh] (cross-attention: keys and values come from the encoder)."""
        scale = 1 / math.sqrt(self.head_dim)
        return self._step_heads(F.linear(x, self.query.weight * scale, self.query.bias * scale))

    def _step_heads(self, x: Tensor) -> Tensor:
        return x.view(-1, self.n_heads, 1, self.head_dim)

    def step_attend(
        self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Scaled query [B,H,1,Dh], key/value [B,H,Tk,Dh], additive bias [B,1,1,Tk] (see padding_bias)
        -> (output [B,D], weights [B,H,1,Tk])."""
        scores = query @ key.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        weights = scores.softmax(dim=-1)
        # [B,H,1,Dh] is laid out as [B,H*Dh]: no transpose needed to merge the heads.
        context = (weights @ value).view(-1, self.n_heads * self.head_dim)
        return self.output(context), weights

    # -- a whole source at once (the exported encoder graph, inference only) -----------------------------
    # Rows are [B*S, D], so that every projection exports as one Gemm with its bias fused (onnxruntime
    # fuses MatMul + Add only for 2-D inputs); the three projections are one product whose heads are split
    # by one reshape + transpose; the padding mask is an additive bias made once for every layer.

    def rows_self_attend(self, x: Tensor, batch: int, length: int, bias: Tensor) -> tuple[Tensor, Tensor]:
        """x [B*S, D], additive bias [B,1,1,S] (see padding_bias) -> (output [B*S, D], weights [B,H,S,S])."""
        packed = self.packed_query_key_value(x, query_scale=1 / math.sqrt(self.head_dim))
        heads = packed.view(batch, length, 3 * self.n_heads, self.head_dim).transpose(1, 2)
        query, key, value = heads.split(self.n_heads, dim=1)
        weights = (query @ key.transpose(-2, -1) + bias).softmax(dim=-1)
        context = (weights @ value).transpose(1, 2).reshape(batch * length, self.n_heads * self.head_dim)
        return self.output(context), weights

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """query [B,Tq,D], key/value [B,Tk,D] -> (output [B,Tq,D], weights [B,H,Tq,Tk])."""
        key, value = self.project_key_value(key, value)
        return self.attend(self.project_query(query), key, value, key_padding_mask, attn_mask, position_bias)


class RelativePositionBias(nn.Module):
    """One learned score per (bucket of key - query distance, head), added to a self-attention's scores."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.bias = nn.Embedding(config.relative_buckets, config.n_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """buckets [Tq,Tk] -> additive scores [H,Tq,Tk]."""
        return self.bias(buckets).permute(2, 0, 1)

    def rows(self, buckets: Tensor) -> Tensor:
        """One query per row: buckets [B,Tk] -> additive scores [B,H,1,Tk]."""
        return self.bias(buckets).permute(0, 2, 1).unsqueeze(2)


def make_relative_bias(config: TransformerConfig) -> RelativePositionBias | None:
    return RelativePositionBias(config) if config.positions == "relative" else None


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.relative_bias = make_relative_bias(config)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, src_mask: Tensor, buckets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B,S,D], src_mask [B,S] (True = padding), buckets [S,S] (relative positions only)
        -> (x, self-attention weights [B,H,S,S])."""
        h = self.norm1(x)
        position_bias = None if self.relative_bias is None else self.relative_bias(buckets)
        attended, weights = self.self_attn(h, h, h, key_padding_mask=src_mask, position_bias=position_bias)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.feed_forward(self.norm2(x)))
        return x, weights

    def rows_forward(
        self, x: Tensor, batch: int, length: int, src_bias: Tensor, buckets: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Inference on rows (see MultiHeadAttention.rows_self_attend): x [B*S, D], src_bias [B,1,1,S],
        buckets [S,S] (relative positions only) -> (x, self-attention weights [B,H,S,S])."""
        if self.relative_bias is not None:
            src_bias = src_bias + self.relative_bias(buckets)[None]
        attended, weights = self.self_attn.rows_self_attend(self.norm1(x), batch, length, src_bias)
        x = x + attended
        x = x + self.feed_forward(self.norm2(x))
        return x, weights


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.relative_bias = make_relative_bias(config)
        self.cross_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.norm3 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor, buckets: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Whole prefix: x [B,T,D], memory [B,S,D], src_mask [B,S], tgt_mask [T,T] or [B,T,T], buckets [T,T]
        (relative positions only) -> (x, self weights [B,H,T,T], cross weights [B,H,T,S])."""
        h = self.norm1(x)
        position_bias = None if self.relative_bias is None else self.relative_bias(buckets)
        attended, self_weights = self.self_attn(h, h, h, attn_mask=tgt_mask, position_bias=position_bias)
        x = x + self.dropout(attended)
        attended, cross_weights = self.cross_attn(self.norm2(x), memory, memory, key_padding_mask=src_mask)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.feed_forward(self.norm3(x)))
        return x, self_weights, cross_weights

    def step(
        self,
        x: Tensor,
        self_key: Tensor,
        self_value: Tensor,
        cross_key: Tensor,
        cross_value: Tensor,
        src_bias: Tensor,
        self_bias: Tensor | None = None,
        buckets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One new position (inference: no dropout): x [B,D], self cache [B,H,t,Dh], cross keys/values
        [B,H,S,Dh], src_bias [B,1,1,S] (padding_bias), self_bias [B,1,1,t+1] for left-padded caches (None:
        every cache entry is real), buckets [1,t+1] of the new position's distances (relative positions)
        -> (x, self_key [B,H,t+1,Dh], self_value, self weights [B,H,1,t+1], cross weights [B,H,1,S])."""
        query, key, value = self.self_attn.step_query_key_value(self.norm1(x))
        self_key = torch.cat([self_key, key], dim=2)
        self_value = torch.cat([self_value, value], dim=2)
        if self.relative_bias is not None:
            position_bias = self.relative_bias(buckets)[None]  # [1,H,1,t+1]
            self_bias = position_bias if self_bias is None else self_bias + position_bias
        # No causal mask needed: the cache holds only this and earlier positions.
        attended, self_weights = self.self_attn.step_attend(query, self_key, self_value, self_bias)
        x, cross_weights = self._step_cross_feed_forward(x + attended, cross_key, cross_value, src_bias)
        return x, self_key, self_value, self_weights, cross_weights

    def step_in_place(
        self,
        x: Tensor,
        cache_key: Tensor,
        cache_value: Tensor,
        cross_key: Tensor,
        cross_value: Tensor,
        src_bias: Tensor,
        self_bias: Tensor,
        slots: Tensor,
        buckets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``step`` on a cache of fixed capacity C: x [B,D], cache [B,H,C,Dh] (row b's entries 0..p_b - 1
        written), slots [B,H,3] (b, h, p_b: where the new entry goes), self_bias [B,1,1,C] (entries after
        p_b masked), buckets [B,C] of each entry's distance to p_b (relative positions)
        -> (x, cache_key and cache_value with the new entries written, self weights [B,H,1,C], cross
        weights [B,H,1,S]). Nothing else of the cache is copied when the caller lets the written cache be
        the one it passed (see write_entries)."""
        query, key, value = self.self_attn.step_query_key_value(self.norm1(x))
        entry_shape = (-1, self.self_attn.n_heads, self.self_attn.head_dim)  # constant: no shape arithmetic
        cache_key = write_entries(cache_key, slots, key.view(entry_shape))
        cache_value = write_entries(cache_value, slots, value.view(entry_shape))
        if self.relative_bias is not None:
            self_bias = self_bias + self.relative_bias.rows(buckets)
        attended, self_weights = self.self_attn.step_attend(query, cache_key, cache_value, self_bias)
        x, cross_weights = self._step_cross_feed_forward(x + attended, cross_key, cross_value, src_bias)
        return x, cache_key, cache_value, self_weights, cross_weights

    def _step_cross_feed_forward(
        self, x: Tensor, cross_key: Tensor, cross_value: Tensor, src_bias: Tensor
    ) -> tuple[Tensor, Tensor]:
        query = self.cross_attn.step_query(self.norm2(x))
        attended, cross_weights = self.cross_attn.step_attend(query, cross_key, cross_value, src_bias)
        x = x + attended
        return x + self.feed_forward(self.norm3(x)), cross_weights


class WriteEntries(torch.autograd.Function):
    """ONNX ScatterND of one new entry per row and head into a cache; inference only (no backward)."""

    @staticmethod
    def forward(ctx: Any, cache: Tensor, slots: Tensor, entries: Tensor) -> Tensor:  # noqa: ARG004
        written = cache.clone()
        written[slots[..., 0], slots[..., 1], slots[..., 2]] = entries
        return written

    @staticmethod
    def symbolic(g: Any, cache: Any, slots: Any, entries: Any) -> Any:
        return g.op("ScatterND", cache, slots, entries)


def write_entries(cache: Tensor, slots: Tensor, entries: Tensor) -> Tensor:
    """cache [B,H,C,Dh] with entries [B,H,Dh] written at slots [B,H,3] = (row, head, entry index).

    A new tensor here; in the exported graph a ScatterND, which onnxruntime runs in place when the caller
    binds its output to the cache it passed (the fixed-shape step of service/engine/fixed_step.py).
    """
    return WriteEntries.apply(cache, slots, entries)


def cache_padding_bias(positions: Tensor, past: int | Tensor, dtype: torch.dtype) -> Tensor:
    """Rows that joined a running batch later have shorter histories; their caches are left-padded.

    positions [B] (each row's own position, = its real cache entries), past = t, the shared cache length
    -> additive [B,1,1,t+1] over the cache plus the new entry (entry j is padding iff j < t - position).
    """
    entries = torch.arange(past + 1, device=positions.device)
    return padding_bias(entries[None, :] < (past - positions)[:, None], dtype)


def padding_bias(padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B,S] boolean (True = padding) -> additive [B,1,1,S]: 0 for real keys, the most negative finite value
    for padding, whose softmax weight is then exactly 0 (exp underflows) as long as one key is real, which
    every source is (it ends with </s>)."""
    return torch.where(padding_mask[:, None, None, :], torch.finfo(dtype).min, 0.0).to(dtype)


class SinusoidalPositions(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D))."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float32)[:, None]
        even = torch.arange(0, d_model, 2, dtype=torch.float32)
        frequency = torch.exp(even * -(math.log(10000.0) / d_model))  # 1 / 10000^(2i/D)
        table = torch.zeros(max_positions, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        # Not persistent: it is a pure function of the config, so checkpoints need not carry it.
        self.register_buffer("table", table, persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """[length, D] encodings of positions offset .. offset+length-1."""
        return self.table[offset : offset + length]


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.src_embed = nn.Embedding(config.src_vocab_size, config.d_model)
        self.tgt_embed = nn.Embedding(config.tgt_vocab_size, config.d_model)
        absolute = config.positions == "absolute"
        self.positions = SinusoidalPositions(config.d_model, config.max_positions) if absolute else None
        if config.positions == "relative":
            # The bucket of every key - query distance up to the longest text, looked up rather than computed
            # so that the exported graphs hold a Gather instead of the logarithm's arithmetic. Not persistent:
            # a pure function of the config.
            distance = torch.arange(-(config.max_positions - 1), config.max_positions)
            for name, bidirectional in (("encoder_buckets", True), ("decoder_buckets", False)):
                table = relative_position_buckets(
                    distance, bidirectional, config.relative_buckets, config.relative_max_distance
                )
                self.register_buffer(name, table, persistent=False)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(config.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(config.d_model)
        self.embed_scale = math.sqrt(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # std D^-1/2: after the sqrt(D) scale, embeddings have unit-size entries like the positions,
                # and the tied output starts with logits of order 1.
                nn.init.normal_(module.weight, std=self.config.d_model**-0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def generator(self, hidden: Tensor) -> Tensor:
        """Output projection tied to the target embedding, no bias: [..., D] -> logits [..., V].

        F.linear on the embedding matrix rather than a second nn.Linear sharing it, so that state_dict()
        holds no aliased tensors (safetensors refuses to save those).
        """
        return F.linear(hidden, self.tgt_embed.weight)

    def padding_mask(self, ids: Tensor) -> Tensor:
        return ids == self.config.pad_id

    def _embed(self, embedding: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        x = embedding(ids) * self.embed_scale
        if self.positions is not None:
            x = x + self.positions(ids.shape[1], offset)
        return self.embed_dropout(x)

    def _buckets(self, table_name: str, query: Tensor, key: Tensor) -> Tensor:
        """Relative positions only: the bucket of each (query, key) pair of positions [Tq], [Tk] -> [Tq,Tk]
        (query row, key column)."""
        table = getattr(self, table_name)
        return table[key[None, :] - query[:, None] + (self.config.max_positions - 1)]

    def _square_buckets(self, table_name: str, length: int, device: torch.device) -> Tensor | None:
        """Every position of a text of ``length`` against every other: [T,T] (see _buckets); None with
        absolute positions."""
        if self.positions is not None:
            return None
        positions = torch.arange(length, device=device)
        return self._buckets(table_name, positions, positions)

    # -- encoder ---------------------------------------------------------------------------------------

    def _encode(self, src_ids: Tensor, src_mask: Tensor, offset: int = 0) -> tuple[Tensor, list[Tensor]]:
        x = self._embed(self.src_embed, src_ids, offset)
        buckets = self._square_buckets("encoder_buckets", src_ids.shape[1], src_ids.device)
        weights = []
        for layer in self.encoder_layers:
            x, layer_weights = layer(x, src_mask, buckets)
            weights.append(layer_weights)
        return self.encoder_norm(x), weights

    def encode(self, src_ids: Tensor, src_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """src_ids [B,S] -> (memory [B,S,D], encoder self-attention [L,B,H,S,S]).

        ``src_padding_mask`` [B,S] (True = padding) defaults to ``src_ids == pad_id``; the ONNX encoder graph
        takes it as an input so that callers own it, as in the decoder-step graph.
        """
        memory, weights = self.encode_layers(src_ids, src_padding_mask)
        return memory, torch.stack(weights)

    def encode_layers(
        self, src_ids: Tensor, src_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """``encode`` with one self-attention map [B,H,S,S] per layer (what the ONNX encoder graph
        outputs)."""
        if src_padding_mask is None:
            src_padding_mask = self.padding_mask(src_ids)
        return self._encode(src_ids, src_padding_mask)

    def cross_keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory [B,S,D] -> (cross_key, cross_value) each [L,B,H,S,Dh]: the source side of every
        decoder layer's cross-attention, projected once per source instead of once per step."""
        keys, values = self.cross_keys_values_layers(memory)
        return torch.stack(keys), torch.stack(values)

    def cross_keys_values_layers(self, memory: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``cross_keys_values`` as one [B,H,S,Dh] tensor per layer (what the ONNX encoder graph outputs)."""
        projected = [layer.cross_attn.project_key_value(memory, memory) for layer in self.decoder_layers]
        return [key for key, _ in projected], [value for _, value in projected]

    def encode_rows(
        self, src_ids: Tensor, src_padding_mask: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """What the ONNX encoder graph computes (inference only): ``encode_layers`` followed by
        ``cross_keys_values_layers``, with the encoder on rows (EncoderLayer.rows_forward) and every decoder
        layer's cross keys and values as one matrix product.

        -> (memory [B,S,D], L cross keys [B,H,S,Dh], L cross values, L encoder self-attention [B,H,S,S]).
        """
        batch, length = src_ids.shape
        x = self._embed(self.src_embed, src_ids).reshape(batch * length, self.config.d_model)
        src_bias = padding_bias(src_padding_mask, x.dtype)
        buckets = self._square_buckets("encoder_buckets", length, src_ids.device)
        weights = []
        for layer in self.encoder_layers:
            x, layer_weights = layer.rows_forward(x, batch, length, src_bias, buckets)
            weights.append(layer_weights)
        memory = self.encoder_norm(x)
        cross = [layer.cross_attn for layer in self.decoder_layers]
        projections = [linear for attention in cross for linear in (attention.key, attention.value)]
        weight = torch.cat([linear.weight for linear in projections])
        packed = F.linear(memory, weight, torch.cat([linear.bias for linear in projections]))
        heads = packed.view(batch, length, len(projections) * self.config.n_heads, self.config.head_dim)
        keys_values = heads.transpose(1, 2).split(self.config.n_heads, dim=1)
        return memory.view(batch, length, -1), list(keys_values[0::2]), list(keys_values[1::2]), weights

    # -- decoder ---------------------------------------------------------------------------------------

    def _decode(
        self, tgt_in_ids: Tensor, memory: Tensor, src_mask: Tensor, offset: int = 0
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Whole prefix without cache -> (hidden [B,T,D], self weights, cross weights) per layer."""
        x = self._embed(self.tgt_embed, tgt_in_ids, offset)
        # Causal mask only: target padding is on the right, so a real position never sees a pad anyway,
        # and the pad positions' outputs are ignored by the loss.
        tgt_mask = causal_mask(tgt_in_ids.shape[1], tgt_in_ids.device)
        buckets = self._square_buckets("decoder_buckets", tgt_in_ids.shape[1], tgt_in_ids.device)
        self_weights, cross_weights = [], []
        for layer in self.decoder_layers:
            x, layer_self, layer_cross = layer(x, memory, src_mask, tgt_mask, buckets)
            self_weights.append(layer_self)
            cross_weights.append(layer_cross)
        return self.decoder_norm(x), self_weights, cross_weights

    def forward(
        self, src_ids: Tensor, tgt_in_ids: Tensor, src_offset: int = 0, tgt_offset: int = 0
    ) -> Tensor:
        """Training: src_ids [B,S], tgt_in_ids [B,T] (starting with <s>) -> logits [B,T,V].

        The offsets shift the positions of a batch's source and target (training only: inference always
        starts at 0). Random shifts teach the model that only distances between positions matter, so that
        positions past the longest training sentence hold up (docs/decisions/long-sentences.md)."""
        src_mask = self.padding_mask(src_ids)
        memory, _ = self._encode(src_ids, src_mask, src_offset)
        hidden, _, _ = self._decode(tgt_in_ids, memory, src_mask, tgt_offset)
        return self.generator(hidden)

    def decode_full(
        self, tgt_in_ids: Tensor, memory: Tensor, src_padding_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder over a whole prefix, no cache (the eager no-cache baseline; also the test reference).

        tgt_in_ids [B,T], memory [B,S,D], src_padding_mask [B,S]
        -> (log_probs [B,T,V], cross_attention [L,B,H,T,S], self_attention [L,B,H,T,T]).
        Generating with it means calling it again on the prefix grown by one token every step.
        """
        hidden, self_weights, cross_weights = self._decode(tgt_in_ids, memory, src_padding_mask)
        log_probs = F.log_softmax(self.generator(hidden), dim=-1)
        return log_probs, torch.stack(cross_weights), torch.stack(self_weights)

    def decode_step(
        self,
        tokens: Tensor,
        self_key: Tensor,
        self_value: Tensor,
        cross_key: Tensor,
        cross_value: Tensor,
        src_padding_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One decoding step with a key/value cache.

        tokens [B] (the previous output, <s> first), self_key/self_value [L,B,H,t,Dh] (t may be 0),
        cross_key/cross_value [L,B,H,S,Dh], src_padding_mask [B,S]
        -> (log_probs [B,V], self_key [L,B,H,t+1,Dh], self_value, cross_attention [L,B,H,1,S],
            self_attention [L,B,H,1,t+1]). The position of ``tokens`` is t.
        """
        log_probs, keys, values, cross_weights, self_weights = self.decode_step_layers(
            tokens,
            list(self_key.unbind(0)),
            list(self_value.unbind(0)),
            list(cross_key.unbind(0)),
            list(cross_value.unbind(0)),
            src_padding_mask,
        )
        return (
            log_probs,
            torch.stack(keys),
            torch.stack(values),
            torch.stack(cross_weights),
            torch.stack(self_weights),
        )

    def decode_step_layers(
        self,
        tokens: Tensor,
        self_keys: list[Tensor],
        self_values: list[Tensor],
        cross_keys: list[Tensor],
        cross_values: list[Tensor],
        src_padding_mask: Tensor,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``decode_step`` with one tensor per layer instead of stacked ones (what the ONNX decoder-step
        graph takes, so that it neither splits nor stacks the caches every step).

        self_keys/self_values: L tensors [B,H,t,Dh]; cross_keys/cross_values: L tensors [B,H,S,Dh];
        positions [B] int64: each row's own position when rows joined the batch at different steps (their
        caches left-padded to the shared length t, see cache_padding_bias); None: every row is at t.
        -> (log_probs [B,V], L self keys [B,H,t+1,Dh], L self values, L cross-attention maps [B,H,1,S],
            L self-attention maps [B,H,1,t+1]).
        """
        # Inference only (no dropout); rows are [B, D] throughout (see MultiHeadAttention.step_attend).
        past = self_keys[0].shape[2]
        x = self.tgt_embed(tokens) * self.embed_scale
        if self.positions is not None:
            x = x + self.positions.table[past if positions is None else positions]
        self_bias = None if positions is None else cache_padding_bias(positions, past, x.dtype)
        # Relative positions: the new entry t against cache entries 0..t is the distance j - t for every row,
        # whether or not its cache is left-padded (its entries are consecutive and end at t).
        buckets = None
        if self.positions is None:
            entries = torch.arange(past + 1, device=tokens.device)
            buckets = self._buckets("decoder_buckets", entries[-1:], entries)
        src_bias = padding_bias(src_padding_mask, x.dtype)
        return self._step_layers(x, lambda i, layer, x: layer.step(
            x, self_keys[i], self_values[i], cross_keys[i], cross_values[i], src_bias, self_bias, buckets
        ))

    def _step_layers(
        self, x: Tensor, step: Callable[[int, DecoderLayer, Tensor], tuple[Tensor, ...]]
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """x through every decoder layer's `step(i, layer, x)` -> (x, key, value, self weights, cross
        weights), then the output distribution -> (log_probs, keys, values, cross weights, self weights)."""
        keys, values, self_weights, cross_weights = [], [], [], []
        for i, layer in enumerate(self.decoder_layers):
            x, key, value, layer_self, layer_cross = step(i, layer, x)
            keys.append(key)
            values.append(value)
            self_weights.append(layer_self)
            cross_weights.append(layer_cross)
        log_probs = F.log_softmax(self.generator(self.decoder_norm(x)), dim=-1)
        return log_probs, keys, values, cross_weights, self_weights

    def decode_step_in_place_layers(
        self,
        tokens: Tensor,
        cache_keys: list[Tensor],
        cache_values: list[Tensor],
        cross_keys: list[Tensor],
        cross_values: list[Tensor],
        src_padding_mask: Tensor,
        positions: Tensor,
        cache_entries: Tensor,
        cache_slots: Tensor,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``decode_step_layers`` on caches of a fixed capacity C, every shape fixed for a batch.

        Row b's entry for position p is at index p of its cache whatever the other rows' positions (no left
        padding); the new entry of step p_b = positions[b] is written at p_b, and entries after it are
        masked. cache_keys/cache_values: L tensors [B,H,C,Dh]; cache_entries [C] = 0..C-1 and cache_slots
        [B,H,3] = (b, h, p_b) are inputs rather than computed from shapes, so that the graph holds no
        shape arithmetic (a GPU's captured graph cannot have it).
        -> (log_probs [B,V], L caches [B,H,C,Dh] with the new entries, L values, L cross-attention maps
            [B,H,1,S], L self-attention maps [B,H,1,C] whose entries after p_b are 0).
        """
        x = self.tgt_embed(tokens) * self.embed_scale
        if self.positions is not None:
            x = x + self.positions.table[positions]
        distance = cache_entries[None, :] - positions[:, None]  # [B,C]: key entry - query position
        self_bias = padding_bias(distance > 0, x.dtype)
        buckets = None
        if self.positions is None:
            # No clamp: C <= max_positions keeps every distance inside the table, and entries after p_b
            # (masked anyway) read its future side.
            buckets = self.decoder_buckets[distance + (self.config.max_positions - 1)]
        src_bias = padding_bias(src_padding_mask, x.dtype)
        return self._step_layers(x, lambda i, layer, x: layer.step_in_place(
            x, cache_keys[i], cache_values[i], cross_keys[i], cross_values[i], src_bias, self_bias,
            cache_slots, buckets,
        ))

    def empty_cache(self, batch_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The (self_key, self_value) cache before the first step: [L,B,H,0,Dh] each."""
        config = self.config
        shape = (config.n_decoder_layers, batch_size, config.n_heads, 0, config.head_dim)
        empty = torch.zeros(shape, dtype=self.tgt_embed.weight.dtype, device=device)
        return empty, empty
