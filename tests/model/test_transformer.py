"""The hand-written Transformer: attention against torch's reference, masking, padding invariance, cached
incremental decoding against full recomputation, and translation through the shared numpy search."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.transformer import (
    MultiHeadAttention,
    Transformer,
    TransformerConfig,
    causal_mask,
    relative_position_buckets,
)
from tests.conftest import ROOT

PAD, BOS, EOS = 0, 1, 2
VOCAB = 16
WORDS = range(4, VOCAB)  # ids 0-3 are special
ATOL = 1e-5

# Relative positions with a short maximum distance, so that short texts reach the far buckets too.
RELATIVE: dict = dict(positions="relative", relative_buckets=16, relative_max_distance=12)

torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine


def tiny_config(**overrides: object) -> TransformerConfig:
    values: dict = dict(
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=32, n_heads=4, n_encoder_layers=2,
        n_decoder_layers=2, d_ff=64, dropout=0.1, max_positions=64,
    )
    values.update(overrides)
    return TransformerConfig(**values)


@pytest.fixture(scope="module", params=["absolute", "relative"])
def model(request: pytest.FixtureRequest) -> Transformer:
    """Every property below holds for both kinds of positions."""
    torch.manual_seed(0)
    return Transformer(tiny_config(**(RELATIVE if request.param == "relative" else {}))).eval()


@pytest.fixture(scope="module")
def absolute_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


def source(rng: random.Random, length: int) -> list[int]:
    return [rng.choice(WORDS) for _ in range(length)] + [EOS]


def padded(rows: list[list[int]]) -> torch.Tensor:
    batch = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    return batch


# -- configuration ------------------------------------------------------------------------------------


def test_config_round_trip_and_defaults() -> None:
    config = TransformerConfig(src_vocab_size=100, tgt_vocab_size=100)
    assert TransformerConfig.from_dict(config.to_dict()) == config
    assert (config.d_model, config.n_heads, config.n_encoder_layers, config.d_ff) == (256, 4, 3, 1024)
    assert (config.pad_id, config.bos_id, config.eos_id, config.unk_id) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"positions": "rotary"}, "positions must be one of absolute, relative, got 'rotary'"),
        ({"relative_buckets": 30}, "relative_buckets must be a multiple of 4"),
        ({"relative_max_distance": 16}, "relative_max_distance must exceed relative_buckets / 2 (16)"),
    ],
)
def test_config_refuses_impossible_positions(overrides: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        TransformerConfig(src_vocab_size=100, tgt_vocab_size=100, **overrides)


def test_state_dict_has_no_aliased_tensors_and_output_is_tied(model: Transformer) -> None:
    state = model.state_dict()
    pointers = [t.data_ptr() for t in state.values()]
    assert len(pointers) == len(set(pointers))  # safetensors can save it
    hidden = torch.randn(3, model.config.d_model)
    assert torch.equal(model.generator(hidden), hidden @ model.tgt_embed.weight.T)


def test_model_code_uses_its_own_attention() -> None:
    code = ROOT.joinpath("model", "transformer.py").read_text()
    for name in ("nn.MultiheadAttention", "nn.Transformer", "scaled_dot_product_attention"):
        assert name not in code


# -- MultiHeadAttention against nn.MultiheadAttention --------------------------------------------------


def reference_attention(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    d_model = mha.query.in_features
    reference = nn.MultiheadAttention(d_model, mha.n_heads, dropout=0.0, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([mha.query.weight, mha.key.weight, mha.value.weight]))
        reference.in_proj_bias.copy_(torch.cat([mha.query.bias, mha.key.bias, mha.value.bias]))
        reference.out_proj.weight.copy_(mha.output.weight)
        reference.out_proj.bias.copy_(mha.output.bias)
    return reference.eval()


@pytest.mark.parametrize("case", ["self_causal_padding", "cross_padding", "per_sentence_mask", "no_mask"])
def test_attention_matches_torch_reference(case: str) -> None:
    torch.manual_seed(1)
    d_model, n_heads, batch = 32, 4, 3
    mha = MultiHeadAttention(d_model, n_heads).eval()
    reference = reference_attention(mha)
    tq, tk = (5, 5) if case in ("self_causal_padding", "no_mask") else (4, 7)
    query = torch.randn(batch, tq, d_model)
    key = query if tq == tk else torch.randn(batch, tk, d_model)
    value = key if tq == tk else torch.randn(batch, tk, d_model)
    lengths = torch.tensor([tk, tk - 2, 2])
    key_padding_mask = torch.arange(tk)[None, :] >= lengths[:, None]
    attn_mask = None
    if case == "self_causal_padding":
        attn_mask = causal_mask(tq)
    elif case == "per_sentence_mask":
        attn_mask = torch.rand(batch, tq, tk) < 0.3
        attn_mask[..., 0] = False  # keep every row attendable so the reference has no NaN
    if case == "no_mask":
        key_padding_mask = None

    output, weights = mha(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    # nn.MultiheadAttention wants a per-sentence mask repeated for every head: [B*H, Tq, Tk].
    reference_mask = attn_mask.repeat_interleave(n_heads, 0) if case == "per_sentence_mask" else attn_mask
    with torch.no_grad():
        expected, expected_weights = reference(
            query, key, value, key_padding_mask=key_padding_mask, attn_mask=reference_mask,
            need_weights=True, average_attn_weights=False,
        )
    assert weights.shape == (batch, n_heads, tq, tk)
    torch.testing.assert_close(output, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, expected_weights, atol=ATOL, rtol=0)


def test_fully_masked_row_is_zero_not_nan() -> None:
    torch.manual_seed(2)
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(2, 3, 16, requires_grad=True)
    key_padding_mask = torch.tensor([[False, False, True], [True, True, True]])
    output, weights = mha(x, x, x, key_padding_mask=key_padding_mask)
    output.sum().backward()
    assert torch.isfinite(output).all() and torch.isfinite(x.grad).all()
    assert (weights[1] == 0).all()
    assert (weights[0, :, :, 2] == 0).all()
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 3))


# -- the model: masks, padding, attention rows ---------------------------------------------------------


def test_causal_mask_hides_later_target_tokens(model: Transformer) -> None:
    rng = random.Random(3)
    src = padded([source(rng, 6), source(rng, 3)])
    tgt = torch.tensor([[BOS, 5, 6, 7, 8, 9], [BOS, 9, 8, 7, 6, 5]])
    changed = tgt.clone()
    changed[:, 3:] = torch.tensor([11, 12, 13])
    with torch.no_grad():
        logits, changed_logits = model(src, tgt), model(src, changed)
    torch.testing.assert_close(changed_logits[:, :3], logits[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(changed_logits[:, 4:], logits[:, 4:])


def test_padding_changes_no_real_position(model: Transformer) -> None:
    rng = random.Random(4)
    short_src, long_src = source(rng, 3), source(rng, 9)
    short_tgt, long_tgt = [BOS, 5, 6], [BOS, 7, 8, 9, 10, 11, 12]
    with torch.no_grad():
        memory_alone, encoder_alone = model.encode(torch.tensor([short_src]))
        logits_alone = model(torch.tensor([short_src]), torch.tensor([short_tgt]))
        src_batch, tgt_batch = padded([long_src, short_src]), padded([long_tgt, short_tgt])
        memory_batch, encoder_batch = model.encode(src_batch)
        explicit_mask, _ = model.encode(src_batch, src_batch == PAD)
        logits_batch = model(src_batch, tgt_batch)
    s, t = len(short_src), len(short_tgt)
    assert torch.equal(explicit_mask, memory_batch)
    torch.testing.assert_close(memory_batch[1, :s], memory_alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(encoder_batch[:, 1, :, :s, :s], encoder_alone[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_batch[1, :t], logits_alone[0], atol=ATOL, rtol=0)


def test_encoder_on_rows_equals_the_encoder_and_cross_projections(model: Transformer) -> None:
    """encode_rows (what the exported encoder graph computes) gives the memory, every layer's cross keys and
    values and every encoder self-attention map of encode_layers + cross_keys_values_layers, padding
    included."""
    rng = random.Random(5)
    src = padded([source(rng, 9), source(rng, 2), source(rng, 5)])
    with torch.no_grad():
        memory, weights = model.encode_layers(src)
        keys, values = model.cross_keys_values_layers(memory)
        rows_memory, rows_keys, rows_values, rows_weights = model.encode_rows(src, src == PAD)
    torch.testing.assert_close(rows_memory, memory, atol=ATOL, rtol=0)
    expected_all, got_all = [*keys, *values, *weights], [*rows_keys, *rows_values, *rows_weights]
    for expected, got in zip(expected_all, got_all, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_attention_rows_sum_to_one_and_padding_gets_zero(model: Transformer) -> None:
    rng = random.Random(5)
    src = padded([source(rng, 7), source(rng, 2), source(rng, 4)])
    tgt = torch.tensor([[BOS, 4, 5, 6, 7]] * 3)
    padding = src == PAD
    with torch.no_grad():
        memory, encoder = model.encode(src)
        _, cross, self_attention = model.decode_full(tgt, memory, padding)
    L, H = model.config.n_decoder_layers, model.config.n_heads  # noqa: N806
    assert encoder.shape == (model.config.n_encoder_layers, 3, H, 8, 8)
    assert cross.shape == (L, 3, H, 5, 8) and self_attention.shape == (L, 3, H, 5, 5)
    for weights in (encoder, cross, self_attention):
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    key_padding = padding[None, :, None, None, :]
    assert (encoder.masked_select(key_padding) == 0).all()
    assert (cross.masked_select(key_padding) == 0).all()
    assert (self_attention.masked_select(causal_mask(5)) == 0).all()


# -- incremental decoding ------------------------------------------------------------------------------


def test_cached_steps_equal_full_recomputation(model: Transformer) -> None:
    rng = random.Random(6)
    src = padded([source(rng, 5), source(rng, 2), source(rng, 8)])
    tgt = torch.tensor([[BOS, *rng.choices(WORDS, k=6)] for _ in range(3)])
    padding = src == PAD
    config = model.config
    with torch.no_grad():
        memory, _ = model.encode(src)
        full_log_probs, full_cross, full_self = model.decode_full(tgt, memory, padding)
        torch.testing.assert_close(full_log_probs, F.log_softmax(model(src, tgt), -1), atol=ATOL, rtol=0)
        cross_key, cross_value = model.cross_keys_values(memory)
        assert cross_key.shape == (config.n_decoder_layers, 3, config.n_heads, src.shape[1], config.head_dim)
        self_key, self_value = model.empty_cache(3)
        for t in range(tgt.shape[1]):
            inputs = (tgt[:, t], self_key, self_value, cross_key, cross_value, padding)
            before = [x.clone() for x in inputs]
            log_probs, self_key, self_value, cross, self_attention = model.decode_step(*inputs)
            assert all(torch.equal(x, y) for x, y in zip(inputs, before, strict=True))  # inputs untouched
            assert self_key.shape[3] == self_value.shape[3] == t + 1
            assert self_attention.shape == (config.n_decoder_layers, 3, config.n_heads, 1, t + 1)
            torch.testing.assert_close(log_probs, full_log_probs[:, t], atol=ATOL, rtol=0)
            torch.testing.assert_close(cross[:, :, :, 0], full_cross[:, :, :, t], atol=ATOL, rtol=0)
            torch.testing.assert_close(
                self_attention[:, :, :, 0], full_self[:, :, :, t, : t + 1], atol=ATOL, rtol=0
            )


# -- translation through TorchBackend and the shared search --------------------------------------------


def reverse_task(rng: random.Random, n: int) -> tuple[list[list[int]], list[list[int]]]:
    sources = [source(rng, rng.randint(2, 7)) for _ in range(n)]
    return sources, [list(reversed(s[:-1])) + [EOS] for s in sources]


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A tiny model trained for a few seconds to reverse its input: peaked, mostly finished outputs,
    so greedy and beam results are not decided by near-ties."""
    torch.manual_seed(7)
    rng = random.Random(7)
    model = Transformer(tiny_config(dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        sources, targets = reverse_task(rng, 48)
        tgt = padded(targets)
        tgt_in = torch.cat([torch.full((len(targets), 1), BOS), tgt[:, :-1]], dim=1)
        logits = model(padded(sources), tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def eval_sources() -> list[list[int]]:
    return reverse_task(random.Random(8), 6)[0]


def greedy_reference(model: Transformer, src: list[int], max_length: int) -> tuple[list[int], float, bool]:
    """Greedy decoding by full recomputation of the prefix every step (no cache, no search code).
    -> (tokens without <s>/</s>, summed log-prob, finished)."""
    with torch.no_grad():
        memory, _ = model.encode(torch.tensor([src]))
        padding = torch.zeros(1, len(src), dtype=torch.bool)
        prefix, log_prob = [BOS], 0.0
        for _ in range(max_length):
            log_probs, _, _ = model.decode_full(torch.tensor([prefix]), memory, padding)
            candidates = log_probs[0, -1].clone()
            candidates[[PAD, BOS]] = -torch.inf  # the search never produces these
            token = int(candidates.argmax())
            log_prob += float(log_probs[0, -1, token])
            prefix.append(token)
            if token == EOS:
                return prefix[1:-1], log_prob, True
    return prefix[1:], log_prob, False


@pytest.mark.parametrize("max_length", [12, 3])  # 3: the longer sentences stop unfinished
def test_beam_one_is_greedy_and_beam_scores_no_worse(trained: Transformer, max_length: int) -> None:
    from model.decoding import translate_ids

    sources = eval_sources()
    greedy = translate_ids(trained, sources, beam_size=1, max_length=max_length)
    beam = translate_ids(trained, sources, beam_size=4, max_length=max_length)
    assert len(greedy) == len(beam) == len(sources)
    assert any(h.finished for h in greedy) == (max_length == 12)
    for src, hyp, beam_hyp in zip(sources, greedy, beam, strict=True):
        tokens, log_prob, finished = greedy_reference(trained, src, max_length)
        assert (hyp.tokens, hyp.finished) == (tokens, finished)
        assert hyp.log_prob == pytest.approx(log_prob, abs=1e-4)
        n_steps = len(tokens) + finished
        assert hyp.score == pytest.approx(log_prob / n_steps, abs=1e-4)  # length_penalty=1.0
        assert beam_hyp.score >= hyp.score - 1e-5


@pytest.mark.parametrize("max_length", [12, 3])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_attention_maps_of_chosen_hypothesis_match_recomputation(
    trained: Transformer, beam_size: int, max_length: int
) -> None:
    from model.decoding import translate_ids

    sources = eval_sources()
    config = trained.config
    L, H = config.n_decoder_layers, config.n_heads  # noqa: N806
    hypotheses = translate_ids(
        trained, sources, beam_size=beam_size, max_length=max_length, with_attention=True
    )
    for src, hyp in zip(sources, hypotheses, strict=True):
        S, T = len(src), len(hyp.tokens) + hyp.finished  # noqa: N806
        assert hyp.cross_attention is not None and hyp.self_attention is not None
        assert hyp.encoder_attention is not None
        assert hyp.cross_attention.shape == (L, H, T, S)
        assert hyp.self_attention.shape == (L, H, T, T)
        assert hyp.encoder_attention.shape == (config.n_encoder_layers, H, S, S)
        with torch.no_grad():
            memory, encoder = trained.encode(torch.tensor([src]))
            decoder_input = torch.tensor([([BOS] + hyp.tokens)[:T]])
            log_probs, cross, self_attention = trained.decode_full(
                decoder_input, memory, torch.zeros(1, S, dtype=torch.bool)
            )
        np.testing.assert_allclose(hyp.encoder_attention, encoder[:, 0].numpy(), atol=ATOL)
        np.testing.assert_allclose(hyp.cross_attention, cross[:, 0].numpy(), atol=ATOL)
        np.testing.assert_allclose(hyp.self_attention, self_attention[:, 0].numpy(), atol=ATOL)
        produced = torch.tensor(hyp.tokens + [EOS] * hyp.finished)
        recomputed = log_probs[0, torch.arange(T), produced].sum()
        assert hyp.log_prob == pytest.approx(float(recomputed), abs=1e-4)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_same_translation_alone_and_in_padded_batch(trained: Transformer, beam_size: int) -> None:
    from model.decoding import translate_ids

    sources = eval_sources()
    assert len({len(s) for s in sources}) > 1  # mixed lengths, so the batch is padded
    trained.train()
    batched = translate_ids(trained, sources, beam_size=beam_size, max_length=12)
    assert trained.training  # translate_ids restores the mode it found
    trained.eval()
    for src, in_batch in zip(sources, batched, strict=True):
        (alone,) = translate_ids(trained, [src], beam_size=beam_size, max_length=12)
        assert alone.tokens == in_batch.tokens
        assert alone.score == pytest.approx(in_batch.score, abs=1e-4)


def test_position_shift_moves_source_and_target_positions(absolute_model: Transformer) -> None:
    """`forward(..., src_offset, tgt_offset)` reads rows offset.. of the position table (training's
    --position-shift); offset 0 is what inference and the exported graphs use."""
    model = absolute_model
    rng = random.Random(4)
    src = padded([source(rng, 6)])
    tgt = torch.tensor([[1, *[rng.choice(WORDS) for _ in range(4)]]])
    with torch.no_grad():
        plain = model(src, tgt)
        assert torch.equal(model(src, tgt, 0, 0), plain)
        shifted = model(src, tgt, 5, 5)
        assert not torch.allclose(shifted, plain)
        # the same as a model whose table starts 5 rows later
        table = model.positions.table.clone()
        try:
            model.positions.table = table[5:]
            assert torch.allclose(model(src, tgt), shifted, atol=1e-6)
        finally:
            model.positions.table = table


# -- relative positions ----------------------------------------------------------------------------------


def t5_bucket(distance: int, bidirectional: bool, buckets: int, max_distance: int) -> float:
    """T5's bucket of key - query distance before truncation, in float64 (the unclipped real value)."""
    offset = 0
    if bidirectional:
        buckets //= 2
        offset = buckets if distance > 0 else 0
        distance = abs(distance)
    else:
        distance = max(-distance, 0)
    exact = buckets // 2
    if distance < exact:
        return offset + distance
    far = exact + math.log(distance / exact) / math.log(max_distance / exact) * (buckets - exact)
    return offset + min(far, buckets - 1)


# translator-train's default, TransformerConfig's default, the tests' tiny models, the model shipped before
@pytest.mark.parametrize(("buckets", "max_distance"), [(16, 10), (32, 24), (16, 12), (24, 13)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_are_t5s_with_no_distance_near_a_boundary(
    buckets: int, max_distance: int, bidirectional: bool
) -> None:
    """Our table is T5's (CTranslate2's) function, and no distance up to 512 lies within 0.02 of a bucket
    boundary, so float32 logarithms in any library truncate to the same bucket (the CTranslate2 parity test
    in tests/bench relies on it)."""
    distance = torch.arange(-511, 512)
    ours = relative_position_buckets(distance, bidirectional, buckets, max_distance)
    for d, bucket in zip(distance.tolist(), ours.tolist(), strict=True):
        real = t5_bucket(d, bidirectional, buckets, max_distance)
        assert bucket == int(real), d
        if real < buckets - 1 and real != int(real):
            assert min(real - int(real), int(real) + 1 - real) > 0.02, d
    far = buckets - 1  # everything beyond the maximum distance shares the last bucket (of its direction)
    assert ours[: 512 - max_distance].unique().tolist() == [far // 2 if bidirectional else far]
    if bidirectional:
        assert ours[511 + max_distance :].unique().tolist() == [far]
    else:
        assert ours[511:].unique().tolist() == [0]  # the decoder never sees later keys


def test_relative_positions_clip_beyond_the_maximum_distance() -> None:
    """A relative model has no position table and one bias per self-attention layer; the bias of the last
    bucket reaches only texts longer than the maximum distance, so a long text reads distances it was never
    trained on through a bucket that shorter training texts did train."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**RELATIVE)).eval()
    assert model.positions is None
    biases = [name for name, _ in model.named_parameters() if "relative_bias" in name]
    assert len(biases) == model.config.n_encoder_layers + model.config.n_decoder_layers
    rng = random.Random(9)
    short, long = padded([source(rng, 6)]), padded([source(rng, 30)])
    with torch.no_grad():
        before = [model.encode(src)[0] for src in (short, long)]
        for layer in model.encoder_layers:
            layer.relative_bias.bias.weight[[7, 15]] += 3.0  # the last bucket of each direction
        after = [model.encode(src)[0] for src in (short, long)]
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_relative_positions_attend_to_distances_not_places() -> None:
    """With relative positions a text's encoding does not depend on where it starts: the same six tokens
    after four others encode (attention restricted to themselves) as they do alone."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(positions="relative")).eval()
    rng = random.Random(10)
    text = source(rng, 5)
    prefix = [rng.choice(WORDS) for _ in range(4)]
    src = torch.tensor([prefix + text])
    mask = torch.zeros(1, len(src[0]), dtype=torch.bool)
    mask[0, :4] = True  # the prefix is there but not attended to
    with torch.no_grad():
        alone, _ = model.encode(torch.tensor([text]))
        shifted, _ = model.encode(src, mask)
    torch.testing.assert_close(shifted[0, 4:], alone[0], atol=ATOL, rtol=0)
