"""service.core.search over a small real numpy model: a deterministic random-weight recurrent decoder with
attention over the source and over its own past states (so its outputs depend on the whole history and
every step's attention differs per row and per step)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

import service.core.search as search_module
from service.core.search import Hypothesis, search

PAD, BOS, EOS = 0, 1, 2
SPECIALS = {"pad_id": PAD, "bos_id": BOS, "eos_id": EOS}


@dataclass
class RecurrentState:
    hidden: np.ndarray  # [N,D]
    memory: np.ndarray  # [N,S,D]
    src_mask: np.ndarray  # [N,S], True for real source positions
    history: np.ndarray  # [N,t,D], the decoder inputs so far (self-attention keys)
    tag: np.ndarray  # [N], original batch row: lets the test see which rows get computed


def _softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


class RecurrentBackend:
    """A real (tiny) StepBackend; records every step's rows and every select."""

    def __init__(
        self,
        vocab: int = 10,
        dim: int = 8,
        layers: int = 2,
        heads: int = 2,
        seed: int = 0,
        eos_bias: float = -1.0,
        eos_growth: float = 0.35,
        special_bias: float = 0.0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.layers, self.heads = layers, heads
        self.src_embedding = rng.normal(size=(vocab, dim))
        self.positions = 0.5 * rng.normal(size=(64, dim))
        self.tgt_embedding = rng.normal(size=(vocab, dim))
        self.w_hidden = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        self.w_encoder = rng.normal(size=(layers, heads, dim, dim)) / np.sqrt(dim)
        self.w_cross = rng.normal(size=(layers, heads, dim, dim)) / np.sqrt(dim)
        self.w_self = rng.normal(size=(layers, heads, dim, dim)) / np.sqrt(dim)
        self.w_out = 2.0 * rng.normal(size=(dim, vocab)) / np.sqrt(dim)
        self.bias = np.zeros(vocab)
        self.bias[EOS] = eos_bias
        self.bias[[PAD, BOS]] = special_bias
        self.eos_growth = eos_growth  # </s> gets likelier with every step: outputs of varied lengths
        self.steps: list[np.ndarray] = []  # tags of the rows of each step call
        self.selects: list[np.ndarray] = []

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[RecurrentState, np.ndarray | None]:
        src_mask = src_ids != PAD
        memory = np.tanh(self.src_embedding[src_ids] + self.positions[: src_ids.shape[1]])
        scores = np.einsum("bsd,lhde,bte->blhst", memory, self.w_encoder, memory)
        attention = _softmax(np.where(src_mask[:, None, None, None, :], scores, -np.inf))
        hidden = (memory * src_mask[..., None]).sum(axis=1) / src_mask.sum(axis=1, keepdims=True)
        batch = src_ids.shape[0]
        state = RecurrentState(
            hidden, memory, src_mask, np.zeros((batch, 0, memory.shape[2])), np.arange(batch)
        )
        return state, attention.astype(np.float32) if with_attention else None

    def step(
        self, state: RecurrentState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[RecurrentState, np.ndarray, np.ndarray | None, np.ndarray | None]:
        self.steps.append(state.tag.copy())
        x = np.tanh(state.hidden @ self.w_hidden + self.tgt_embedding[tokens])
        history = np.concatenate([state.history, x[:, None]], axis=1)
        cross_scores = np.einsum("nd,lhde,nse->nlhs", x, self.w_cross, state.memory)
        cross = _softmax(np.where(state.src_mask[:, None, None, :], cross_scores, -np.inf))
        self_att = _softmax(np.einsum("nd,lhde,nte->nlht", x, self.w_self, history))
        scale = self.layers * self.heads
        context = np.einsum("nlhs,nsd->nd", cross, state.memory) / scale
        self_context = np.einsum("nlht,ntd->nd", self_att, history) / scale
        hidden = np.tanh(x + context + self_context)
        logits = hidden @ self.w_out + self.bias
        logits[:, EOS] += self.eos_growth * history.shape[1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        new_state = RecurrentState(hidden, state.memory, state.src_mask, history, state.tag)
        if not with_attention:
            return new_state, log_probs.astype(np.float32), None, None
        return new_state, log_probs.astype(np.float32), cross.astype(np.float32), self_att.astype(np.float32)

    def select(self, state: RecurrentState, rows: np.ndarray) -> RecurrentState:
        self.selects.append(np.asarray(rows).copy())
        return RecurrentState(
            state.hidden[rows], state.memory[rows], state.src_mask[rows], state.history[rows], state.tag[rows]
        )


def make_batch(lengths: list[int], vocab: int, seed: int = 1) -> np.ndarray:
    """Right-padded sources of real words ending with </s>."""
    rng = np.random.default_rng(seed)
    batch = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    for row, length in enumerate(lengths):
        batch[row, : length - 1] = rng.integers(3, vocab, size=length - 1)
        batch[row, length - 1] = EOS
    return batch


def trimmed(src_row: np.ndarray) -> np.ndarray:
    return src_row[src_row != PAD][None]


@dataclass
class Forced:
    log_prob: float
    cross: np.ndarray  # [L,H,T,S_real]
    self_att: np.ndarray  # [L,H,T,T]
    encoder: np.ndarray  # [L,H,S_real,S_real]


def teacher_force(
    backend: RecurrentBackend, src_row: np.ndarray, tokens: list[int], finished: bool
) -> Forced:
    """Score one output sequence by feeding it to a fresh single-row run on the unpadded source."""
    state, encoder = backend.encode(trimmed(src_row), True)
    outputs = [*tokens, EOS] if finished else list(tokens)
    fed = [BOS, *outputs[:-1]]
    total = 0.0
    crosses, selfs = [], []
    for token, output in zip(fed, outputs, strict=True):
        state, log_probs, cross, self_att = backend.step(state, np.array([token]), True)
        total += float(log_probs[0, output])
        crosses.append(cross[0])
        selfs.append(self_att[0])
    steps = len(outputs)
    self_matrix = np.zeros((backend.layers, backend.heads, steps, steps), dtype=np.float32)
    for k, row in enumerate(selfs):
        self_matrix[:, :, k, : k + 1] = row
    return Forced(total, np.stack(crosses, axis=2), self_matrix, encoder[0])


def reference_greedy(
    backend: RecurrentBackend, src_row: np.ndarray, max_length: int
) -> tuple[list[int], float, bool]:
    """Brute-force greedy on one row: argmax over the non-special tokens at every step."""
    state, _ = backend.encode(trimmed(src_row), False)
    token, tokens, total = BOS, [], 0.0
    for _ in range(max_length):
        state, log_probs, _, _ = backend.step(state, np.array([token]), False)
        scores = log_probs[0].astype(np.float64)
        scores[[PAD, BOS]] = -np.inf
        token = int(scores.argmax())
        total += float(log_probs[0, token])
        if token == EOS:
            return tokens, total, True
        tokens.append(token)
    return tokens, total, False


def check_close(hypothesis: Hypothesis, log_prob: float, length_penalty: float) -> None:
    n_steps = len(hypothesis.tokens) + int(hypothesis.finished)
    assert hypothesis.log_prob == pytest.approx(log_prob, rel=1e-5, abs=1e-5)
    assert hypothesis.score == pytest.approx(hypothesis.log_prob / n_steps**length_penalty, rel=1e-12)


def done(result: Hypothesis | None) -> Hypothesis:
    assert result is not None
    return result


LENGTHS = [5, 2, 7, 3, 6]


def test_greedy_matches_brute_force_argmax() -> None:
    backend = RecurrentBackend(vocab=12, seed=3)
    src = make_batch(LENGTHS, 12)
    results = search(backend, src, **SPECIALS, max_length=12, length_penalty=0.7)
    for row, result in enumerate(results):
        tokens, log_prob, finished = reference_greedy(backend, src[row], 12)
        hypothesis = done(result)
        assert (hypothesis.tokens, hypothesis.finished) == (tokens, finished)
        check_close(hypothesis, log_prob, 0.7)
        assert hypothesis.cross_attention is None and hypothesis.encoder_attention is None
    assert sum(done(r).finished for r in results) >= 3  # the test exercises rows ending with </s>


@pytest.mark.parametrize("beam_size", [1, 3])
def test_sentence_alone_equals_sentence_in_padded_batch(beam_size: int) -> None:
    backend = RecurrentBackend(vocab=12, seed=4)
    src = make_batch(LENGTHS, 12)
    batched = search(backend, src, **SPECIALS, beam_size=beam_size, max_length=10)
    for row in range(len(LENGTHS)):
        alone = done(search(backend, trimmed(src[row]), **SPECIALS, beam_size=beam_size, max_length=10)[0])
        together = done(batched[row])
        assert (alone.tokens, alone.finished) == (together.tokens, together.finished)
        assert alone.score == pytest.approx(together.score, rel=1e-5)


def test_finished_rows_leave_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compacting after every finished row (greedy search waits for GREEDY_COMPACT_FRACTION, tested below).
    monkeypatch.setattr(search_module, "GREEDY_COMPACT_FRACTION", 0.0)
    backend = RecurrentBackend(vocab=12, seed=5)
    src = make_batch(LENGTHS, 12)
    results = search(backend, src, **SPECIALS, max_length=15)
    sizes = [tags.size for tags in backend.steps]
    assert sizes[0] == len(LENGTHS)
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    stepped = np.concatenate(backend.steps)
    for row, result in enumerate(results):
        hypothesis = done(result)
        # Each row is computed exactly once per step it took, and never after its </s>.
        assert np.count_nonzero(stepped == row) == len(hypothesis.tokens) + int(hypothesis.finished)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_greedy_drops_done_rows_once_enough_are_done(
    monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    src = make_batch(LENGTHS, 12)
    immediate_backend = RecurrentBackend(vocab=12, seed=5)
    monkeypatch.setattr(search_module, "GREEDY_COMPACT_FRACTION", 0.0)
    immediate = search(immediate_backend, src, **SPECIALS, max_length=15, with_attention=True)
    monkeypatch.setattr(search_module, "GREEDY_COMPACT_FRACTION", fraction)
    backend = RecurrentBackend(vocab=12, seed=5)
    results = search(backend, src, **SPECIALS, max_length=15, with_attention=True)
    for result, reference in zip(results, immediate, strict=True):
        hypothesis, expected = done(result), done(reference)
        assert (hypothesis.tokens, hypothesis.finished) == (expected.tokens, expected.finished)
        assert hypothesis.log_prob == expected.log_prob
        np.testing.assert_array_equal(hypothesis.cross_attention, expected.cross_attention)
        np.testing.assert_array_equal(hypothesis.self_attention, expected.self_attention)
    steps_taken = {row: len(done(r).tokens) + int(done(r).finished) for row, r in enumerate(results)}
    assert len(backend.steps) == max(steps_taken.values())
    for k, tags in enumerate(backend.steps):
        finished = [tag for tag in tags.tolist() if steps_taken[tag] <= k]  # stepped after its last step
        # Done rows stay only while they are fewer than the fraction of the rows stepped.
        assert len(finished) < max(fraction * tags.size, 1)
    if fraction < 1.0:
        assert len(backend.steps[-1]) < len(LENGTHS) and backend.selects
    else:
        assert not backend.selects  # nothing is ever dropped: the batch runs whole until every row is done


def test_beam_size_one_is_greedy() -> None:
    backend = RecurrentBackend(vocab=12, seed=6)
    src = make_batch(LENGTHS, 12)
    for length_penalty in (0.0, 1.0):
        results = search(backend, src, **SPECIALS, beam_size=1, max_length=9, length_penalty=length_penalty)
        for row, result in enumerate(results):
            tokens, log_prob, finished = reference_greedy(backend, src[row], 9)
            hypothesis = done(result)
            assert (hypothesis.tokens, hypothesis.finished) == (tokens, finished)
            check_close(hypothesis, log_prob, length_penalty)


def all_hypotheses(real_tokens: list[int], max_length: int) -> list[tuple[list[int], bool]]:
    """Every output search may produce: </s> after 0..max_length-1 tokens, or max_length tokens unfinished."""
    outputs: list[tuple[list[int], bool]] = []
    for length in range(max_length):
        outputs += [(list(seq), True) for seq in itertools.product(real_tokens, repeat=length)]
    outputs += [(list(seq), False) for seq in itertools.product(real_tokens, repeat=max_length)]
    return outputs


@pytest.mark.parametrize(
    ("vocab", "max_length", "seed"),
    [
        (5, 4, 7),
        (5, 4, 1),
        (5, 5, 7),
        (6, 3, 8),
        (4, 4, 9),
    ],  # vocab 4 has one real word: most beams are dead fillers
)
def test_beam_search_finds_the_exact_best_sequence(vocab: int, max_length: int, seed: int) -> None:
    real = list(range(3, vocab))
    # With a beam as wide as the number of prefixes nothing is pruned, so beam search must return the
    # exhaustive optimum: this checks candidate bookkeeping, scoring and that early stopping is sound.
    beam_size = max(3, len(real) ** (max_length - 1))
    backend = RecurrentBackend(vocab=vocab, seed=seed)
    src = make_batch([4, 2, 3], vocab, seed=seed)
    optimal_lengths = set()
    stopped_early = False
    for length_penalty in (0.0, 0.6, 1.0, 2.0, -0.5):
        backend.steps.clear()
        results = search(
            backend,
            src,
            **SPECIALS,
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
        )
        stopped_early |= len(backend.steps) < max_length
        for row, result in enumerate(results):
            scored = []
            for tokens, finished in all_hypotheses(real, max_length):
                log_prob = teacher_force(backend, src[row], tokens, finished).log_prob
                scored.append(
                    (log_prob / (len(tokens) + finished) ** length_penalty, tokens, finished, log_prob)
                )
            best_score, best_tokens, best_finished, best_log_prob = max(scored, key=lambda item: item[0])
            hypothesis = done(result)
            assert (hypothesis.tokens, hypothesis.finished) == (best_tokens, best_finished)
            assert hypothesis.score == pytest.approx(best_score, rel=1e-5, abs=1e-6)
            check_close(hypothesis, best_log_prob, length_penalty)
            optimal_lengths.add((len(best_tokens), best_finished))
    assert len(optimal_lengths) >= 2  # the optimum is not always the same shape of sequence
    assert stopped_early  # the early-stopping bound was exercised, not only max_length


def test_beam_score_at_least_greedy_score() -> None:
    # Not a theorem for every model, but for this fixed one beam search must not lose to greedy.
    backend = RecurrentBackend(vocab=16, seed=10)
    src = make_batch([6, 3, 8, 4, 5, 7], 16, seed=10)
    for length_penalty in (0.0, 1.0):
        greedy = search(backend, src, **SPECIALS, max_length=10, length_penalty=length_penalty)
        beam = search(backend, src, **SPECIALS, beam_size=4, max_length=10, length_penalty=length_penalty)
        improved = 0
        for greedy_result, beam_result in zip(greedy, beam, strict=True):
            assert done(beam_result).score >= done(greedy_result).score - 1e-9
            improved += done(beam_result).score > done(greedy_result).score + 1e-6
        assert improved >= 1


@pytest.mark.parametrize(
    ("beam_size", "max_length", "eos_bias"),
    # The long greedy case runs 20-odd steps with rows finishing and leaving the state (compaction), so a
    # map taken from the wrong row after a compaction would show.
    [(1, 8, -1.0), (3, 8, -1.0), (1, 40, -3.0)],
)
def test_attention_maps_follow_the_chosen_hypothesis(
    beam_size: int, max_length: int, eos_bias: float
) -> None:
    backend = RecurrentBackend(vocab=10, seed=11, eos_bias=eos_bias)
    src = make_batch(LENGTHS, 10, seed=11)
    results = search(
        backend, src, **SPECIALS, beam_size=beam_size, max_length=max_length, with_attention=True
    )
    if max_length > 16:
        lengths = [len(done(result).tokens) for result in results]
        assert max(lengths) > 16 and min(lengths) < max(lengths) and backend.selects, lengths
    if beam_size > 1:
        # The beams really were reordered, so a history copied along the wrong path would show.
        assert any(np.any(np.diff(rows) < 0) for rows in backend.selects)
    for row, result in enumerate(results):
        hypothesis = done(result)
        steps = len(hypothesis.tokens) + int(hypothesis.finished)
        s_real = int(np.count_nonzero(src[row] != PAD))
        assert hypothesis.cross_attention is not None and hypothesis.self_attention is not None
        assert hypothesis.encoder_attention is not None
        assert hypothesis.cross_attention.shape == (2, 2, steps, s_real)
        assert hypothesis.self_attention.shape == (2, 2, steps, steps)
        assert hypothesis.encoder_attention.shape == (2, 2, s_real, s_real)
        assert np.all(np.triu(hypothesis.self_attention, k=1) == 0)
        np.testing.assert_allclose(hypothesis.cross_attention.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(hypothesis.self_attention.sum(-1), 1.0, rtol=1e-5)
        # What the model produces when fed exactly this hypothesis, alone and unpadded.
        forced = teacher_force(backend, src[row], hypothesis.tokens, hypothesis.finished)
        np.testing.assert_allclose(hypothesis.cross_attention, forced.cross, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hypothesis.self_attention, forced.self_att, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hypothesis.encoder_attention, forced.encoder, rtol=1e-5, atol=1e-6)
        assert hypothesis.log_prob == pytest.approx(forced.log_prob, rel=1e-5)


@pytest.mark.parametrize("beam_size", [1, 2])
def test_abandoned_rows_are_dropped(beam_size: int) -> None:
    backend = RecurrentBackend(vocab=12, seed=12, eos_bias=-8.0, eos_growth=0.0)  # nobody finishes early
    src = make_batch(LENGTHS, 12)
    steps_seen = {row: 0 for row in range(len(LENGTHS))}

    def is_abandoned(row: int) -> bool:
        steps_seen[row] += 1
        return row == 3 or (row == 1 and steps_seen[row] > 2)  # row 3 at once, row 1 after two steps

    results = search(backend, src, **SPECIALS, beam_size=beam_size, max_length=6, is_abandoned=is_abandoned)
    assert results[1] is None and results[3] is None
    assert all(results[row] is not None for row in (0, 2, 4))
    stepped = np.concatenate(backend.steps)
    assert np.count_nonzero(stepped == 3) == 0
    assert np.count_nonzero(stepped == 1) == 2 * beam_size - (beam_size > 1)  # step 0 has one row
    assert np.count_nonzero(stepped == 0) == beam_size * 6 - (beam_size - 1)


@pytest.mark.parametrize("beam_size", [1, 2])
def test_abandoning_every_row_steps_nothing(beam_size: int) -> None:
    backend = RecurrentBackend(vocab=12, seed=12)
    results = search(
        backend, make_batch(LENGTHS, 12), **SPECIALS, beam_size=beam_size, is_abandoned=lambda row: True
    )
    assert results == [None] * len(LENGTHS)
    assert backend.steps == []


def test_on_token_streams_the_greedy_tokens_in_order() -> None:
    backend = RecurrentBackend(vocab=12, seed=13)
    src = make_batch(LENGTHS, 12)
    streamed: dict[int, list[int]] = {row: [] for row in range(len(LENGTHS))}
    results = search(backend, src, **SPECIALS, max_length=10, on_token=lambda r, t: streamed[r].append(t))
    for row, result in enumerate(results):
        assert streamed[row] == done(result).tokens
    assert EOS not in itertools.chain.from_iterable(streamed.values())


def test_on_token_gets_the_final_beam_tokens() -> None:
    backend = RecurrentBackend(vocab=12, seed=13)
    src = make_batch(LENGTHS, 12)
    streamed: dict[int, list[int]] = {row: [] for row in range(len(LENGTHS))}
    results = search(
        backend, src, **SPECIALS, beam_size=3, max_length=10, on_token=lambda r, t: streamed[r].append(t)
    )
    for row, result in enumerate(results):
        assert streamed[row] == done(result).tokens


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("max_length", [1, 4])
def test_max_length_is_respected(beam_size: int, max_length: int) -> None:
    backend = RecurrentBackend(vocab=12, seed=14, eos_bias=-20.0, eos_growth=0.0)  # </s> is never worth it
    src = make_batch(LENGTHS, 12)
    results = search(
        backend, src, **SPECIALS, beam_size=beam_size, max_length=max_length, with_attention=True
    )
    assert len(backend.steps) == max_length
    for row, result in enumerate(results):
        hypothesis = done(result)
        assert len(hypothesis.tokens) == max_length and not hypothesis.finished
        assert hypothesis.score == pytest.approx(hypothesis.log_prob / max_length)
        assert hypothesis.cross_attention is not None and hypothesis.cross_attention.shape[2] == max_length
        forced = teacher_force(backend, src[row], hypothesis.tokens, False)
        assert hypothesis.log_prob == pytest.approx(forced.log_prob, rel=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_per_row_max_length_does_not_depend_on_the_batch(beam_size: int) -> None:
    backend = RecurrentBackend(vocab=12, seed=14, eos_bias=-20.0, eos_growth=0.0)  # </s> is never worth it
    src = make_batch(LENGTHS, 12)
    limits = np.array([2 + row for row in range(len(LENGTHS))])
    batched = search(backend, src, **SPECIALS, beam_size=beam_size, max_length=limits)
    for row, limit in enumerate(limits.tolist()):
        together = done(batched[row])
        assert len(together.tokens) == limit and not together.finished
        alone = done(search(backend, trimmed(src[row]), **SPECIALS, beam_size=beam_size, max_length=limit)[0])
        assert alone.tokens == together.tokens
    with pytest.raises(ValueError, match="max_length has 2 entries"):
        search(backend, src, **SPECIALS, max_length=np.array([3, 4]))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_pad_and_bos_are_never_produced(beam_size: int) -> None:
    backend = RecurrentBackend(vocab=8, seed=15, special_bias=30.0)  # the model loves <pad> and <s>
    src = make_batch(LENGTHS, 8)
    for result in search(backend, src, **SPECIALS, beam_size=beam_size, max_length=6):
        hypothesis = done(result)
        assert PAD not in hypothesis.tokens and BOS not in hypothesis.tokens
        assert np.isfinite(hypothesis.score)


def brute_force_top(log_probs: np.ndarray, beams: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    n, width = beams.shape
    flat = (log_probs.reshape(n, width, -1).astype(np.float64) + beams[:, :, None]).reshape(n, -1)
    indices, sums = [], []
    for row in flat:
        best = sorted(range(row.size), key=lambda i: (-row[i], i))[:count]  # ties: lower flat index first
        indices.append(best)
        sums.append(row[best])
    return np.array(indices), np.array(sums)


@pytest.mark.parametrize("case", ["peaked", "ties", "dead_beams", "small_vocab", "one_beam"])
@pytest.mark.parametrize("fast_from", [0, 10**9])  # force the thresholding path, then the plain one
def test_top_candidates_match_a_full_sort(case: str, fast_from: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "_FAST_TOP_MIN", fast_from)
    rng = np.random.default_rng(16)
    n, width, vocab, count = 5, 4, 300, 8
    log_probs = np.log(rng.dirichlet(np.full(vocab, 0.3), size=n * width)).astype(np.float32)
    beams = rng.normal(-10.0, 3.0, size=(n, width))
    if case == "ties":  # a uniform distribution: thresholding keeps everything, ties decide
        log_probs[:] = np.float32(-np.log(vocab))
        beams[:] = -2.0
    elif case == "dead_beams":
        beams[:, 1:] = -np.inf
        beams[0, :] = -np.inf
        beams[0, 2] = -1.0
    elif case == "small_vocab":
        vocab = 5
        log_probs = log_probs[:, :vocab].copy()
    elif case == "one_beam":
        width = 1
        log_probs, beams = log_probs[:n], beams[:, :1]
    log_probs[:, [PAD, BOS]] = -np.inf
    with np.errstate(all="raise"):
        top, sums = search_module._top_candidates(log_probs, beams, count)
    expected_top, expected_sums = brute_force_top(log_probs, beams, count)
    np.testing.assert_array_equal(top, expected_top)
    np.testing.assert_array_equal(sums, expected_sums)


def test_large_vocabulary_beam_search_takes_the_same_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RecurrentBackend(vocab=40, seed=17)
    src = make_batch(LENGTHS, 40, seed=17)
    runs = []
    for fast_from in (0, 10**9):
        monkeypatch.setattr(search_module, "_FAST_TOP_MIN", fast_from)
        runs.append(search(backend, src, **SPECIALS, beam_size=4, max_length=12))
    for fast, plain in zip(*runs, strict=True):
        assert (done(fast).tokens, done(fast).score) == (done(plain).tokens, done(plain).score)


def test_empty_batch() -> None:
    backend = RecurrentBackend()
    assert search(backend, np.zeros((0, 3), dtype=np.int64), **SPECIALS) == []
    assert backend.steps == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2.5}, "beam_size"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": True}, "max_length"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"src_ids": np.array([3, 4, 2])}, "src_ids"),
        ({"src_ids": np.array([[3.0, 2.0]])}, "src_ids"),
        ({"eos_id": PAD}, "eos_id"),
        ({"bos_id": -1}, "bos_id"),
    ],
)
def test_argument_validation(kwargs: dict[str, object], name: str) -> None:
    arguments: dict[str, object] = {"src_ids": make_batch([3], 10), **SPECIALS, **kwargs}
    with pytest.raises(ValueError, match=name):
        search(RecurrentBackend(), **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_on_done_hands_over_each_result_when_it_is_final(beam_size: int) -> None:
    backend = RecurrentBackend(vocab=12, seed=13)
    src = make_batch(LENGTHS, 12)
    handed: list[tuple[int, Hypothesis, int]] = []  # row, result, steps the backend had taken by then
    abandoned = 2

    def on_done(row: int, hypothesis: Hypothesis) -> None:
        handed.append((row, hypothesis, len(backend.steps)))

    results = search(backend, src, **SPECIALS, beam_size=beam_size, max_length=10, on_done=on_done,
                     is_abandoned=lambda row: row == abandoned)
    assert results[abandoned] is None
    assert sorted(row for row, _, _ in handed) == [r for r in range(len(LENGTHS)) if r != abandoned]
    for row, hypothesis, steps_then in handed:
        assert hypothesis is results[row]  # the very result search returns, handed over once
        # Handed over at the step that made it final, not at the end of the batch: in greedy search the
        # step that produced its last token; in beam search the one where no running beam could beat it.
        produced = len(hypothesis.tokens) + (1 if hypothesis.finished else 0)
        assert steps_then == produced if beam_size == 1 else produced <= steps_then <= 10
    assert len({steps for _, _, steps in handed}) > 1  # rows of this batch finish at different steps
