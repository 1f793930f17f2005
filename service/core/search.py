"""The one search (greedy and beam) shared by the onnxruntime engine, the PyTorch evaluation and the service.

numpy only: the model is reached through a :class:`StepBackend`, so the very same search runs over
onnxruntime at serve time and over PyTorch during evaluation.

Conventions (docs/CONTRACTS.md):

* A "step" feeds one token per running row and yields the log-probabilities of the next token. Step ``k``
  (0-based) produces output token ``k``; ``n_steps`` counts steps taken, ``</s>`` included.
* ``score = log_prob / n_steps ** length_penalty``, the same formula for greedy and beam search.
* ``<pad>`` and ``<s>`` are never produced: their log-probabilities are set to ``-inf`` before choosing.
* Rows that are done (finished, hit ``max_length`` or abandoned) leave the running batch through
  ``backend.select`` so no more compute is spent on them: in beam search at once, in greedy search once at
  least ``GREEDY_COMPACT_FRACTION`` of the rows are done (the copy costs more than a few wasted rows); until
  then the done rows are stepped along and their outputs ignored.

Beam search early stopping (sound: it never changes the result compared with running to ``max_length``).
Only the single best hypothesis per sentence is returned, so a sentence is done as soon as no running beam
can still beat its best finished hypothesis. Log-probabilities are <= 0, so extending a beam with current
sum ``s`` gives a final sum ``s' <= s`` over ``n`` steps with ``k + 2 <= n <= max_length`` (after step
``k``), and ``s' / n**lp <= s / max(n**lp)``. ``n**lp`` is monotonic in ``n``, so the maximum is at an end of
that range: ``max_length`` for ``lp > 0`` (the usual bound), ``k + 2`` for ``lp < 0``, 1 for ``lp == 0``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Protocol

import numpy as np

__all__ = ["Hypothesis", "Maps", "StepBackend", "greedy_choice", "layers_stacked", "score", "search"]


Maps = np.ndarray | Sequence[np.ndarray]  # one step's maps: [N,L,H,K], or L arrays [N,H,1,K] (one per layer)


def layers_stacked(maps: Maps) -> np.ndarray:
    """One step's maps as [N,L,H,K], from either form a backend's step may give them in."""
    if isinstance(maps, np.ndarray):
        return maps
    first = maps[0]
    stacked = np.empty((first.shape[0], len(maps), first.shape[1], first.shape[3]), dtype=first.dtype)
    for layer, weights in enumerate(maps):
        stacked[:, layer] = weights[:, :, 0]
    return stacked


def _per_layer(maps: Maps) -> Sequence[np.ndarray]:
    """One step's maps as L arrays [N,H,1,K] (views of a stacked [N,L,H,K])."""
    if isinstance(maps, np.ndarray):
        return [maps[:, layer, :, None] for layer in range(maps.shape[1])]
    return maps


class StepBackend(Protocol):
    """The model, seen one decoder step at a time.

    The search owns the arrays returned by ``step``: it masks ``log_probs`` in place and keeps references to
    the attention arrays until it returns, so a backend must hand out fresh arrays (not reused buffers).
    """

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[object, np.ndarray | None]:
        """src_ids int64 [B,S] right-padded -> (decoder state, encoder attention [B,L,H,S,S] or None)."""
        ...

    def step(
        self, state: object, tokens: np.ndarray, with_attention: bool
    ) -> tuple[object, np.ndarray, Maps | None, Maps | None]:
        """tokens int64 [N] -> (state, log_probs float32 [N,V], cross [N,L,H,S], self [N,L,H,t+1]); the
        maps either stacked or one array [N,H,1,*] per layer (Maps)."""
        ...

    def select(self, state: object, rows: np.ndarray) -> object:
        """Keep / reorder / repeat rows of the state (rows int64 indices into the current rows)."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, no <s>, no </s>
    log_prob: float  # sum of token log-probs, </s> included when produced
    score: float  # log_prob / (n_steps ** length_penalty)
    finished: bool  # ended with </s> (False: hit max_length)
    cross_attention: np.ndarray | None = None  # [L,H,T,S_real], T = steps taken (</s> step included)
    self_attention: np.ndarray | None = None  # [L,H,T,T]
    encoder_attention: np.ndarray | None = None  # [L,H,S_real,S_real]
    # time.monotonic() when its batch's encoder finished (one clock for every process of the machine): where
    # its trace's encode span ends and its decode span begins.
    encoded_at: float | None = None


OnToken = Callable[[int, int], object]
IsAbandoned = Callable[[int], bool]
OnDone = Callable[[int, "Hypothesis"], object]


def search(
    backend: StepBackend,
    src_ids: np.ndarray,
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    beam_size: int = 1,
    max_length: int | Sequence[int] | np.ndarray = 256,
    length_penalty: float = 1.0,
    with_attention: bool = False,
    on_token: OnToken | None = None,
    is_abandoned: IsAbandoned | None = None,
    on_done: OnDone | None = None,
) -> list[Hypothesis | None]:
    """Translate a batch: one result per row of ``src_ids``, ``None`` for rows dropped by ``is_abandoned``.

    ``src_ids`` int [B,S], right-padded with ``pad_id``; a row's real source length is its count of non-pad
    ids. ``beam_size == 1`` is greedy search. ``max_length`` bounds the steps taken (``</s>`` included), for
    all rows or per row (so that a sentence's limit does not depend on the batch it shares).
    ``on_token(row, token_id)`` streams generated tokens (never ``</s>``): step by step in greedy search;
    in beam search all tokens of the chosen hypothesis at once, when its sentence is done, since beams can
    still change before that. ``is_abandoned(row)`` is asked before every step for every running row.
    ``on_done(row, hypothesis)`` hands over each row's result as soon as it is final (the rest of the batch
    may decode on), so a caller can answer short sentences before the batch's longest is done.
    """
    for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if len({pad_id, bos_id, eos_id}) != 3:
        raise ValueError(f"pad_id, bos_id and eos_id must differ, got {pad_id}, {bos_id}, {eos_id}")
    if not _is_int(beam_size) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    max_lengths = np.asarray(max_length)
    if (max_lengths.ndim > 1 or not np.issubdtype(max_lengths.dtype, np.integer) or max_lengths.size == 0
            or max_lengths.min() < 1):
        raise ValueError(f"max_length must be an integer >= 1 or one per row, got {max_length!r}")
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, Real)
        or not np.isfinite(length_penalty)
    ):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    src = np.asarray(src_ids)
    if src.ndim != 2 or not np.issubdtype(src.dtype, np.integer):
        raise ValueError(f"src_ids must be a 2-D integer array, got shape {src.shape} dtype {src.dtype}")
    if src.shape[0] == 0:
        return []
    src = np.ascontiguousarray(src, dtype=np.int64)
    if max_lengths.ndim == 1 and max_lengths.shape[0] != src.shape[0]:
        raise ValueError(f"max_length has {max_lengths.shape[0]} entries for {src.shape[0]} rows")
    run = _Run(
        backend=backend,
        src_lengths=(src != pad_id).sum(axis=1),
        pad_id=int(pad_id),
        bos_id=int(bos_id),
        eos_id=int(eos_id),
        max_lengths=np.broadcast_to(max_lengths.astype(np.int64), (src.shape[0],)),
        length_penalty=float(length_penalty),
        with_attention=bool(with_attention),
        on_token=on_token,
        is_abandoned=is_abandoned,
        on_done=on_done,
    )
    if beam_size == 1:
        return run.greedy(src)
    return run.beam(src, int(beam_size))


def never_specials(log_probs: np.ndarray, pad_id: int, bos_id: int) -> np.ndarray:
    """log_probs [N,V] with <pad> and <s> at -inf (they are never produced); a writable float copy when the
    backend handed out a read-only or non-float array."""
    if not log_probs.flags.writeable or not np.issubdtype(log_probs.dtype, np.floating):
        log_probs = log_probs.astype(np.float32)
    log_probs[:, pad_id] = -np.inf
    log_probs[:, bos_id] = -np.inf
    return log_probs


def length_norm(n_steps: int, length_penalty: float) -> float:
    return float(n_steps) ** length_penalty


def score(log_prob: float, n_steps: int, length_penalty: float) -> float:
    """The one score formula of greedy and beam search: log_prob / n_steps ** length_penalty."""
    return log_prob / length_norm(n_steps, length_penalty)


def greedy_choice(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One greedy step's decision for every row of `log_probs` (special tokens already masked by
    `never_specials`): (chosen token [N], its log-probability [N]). Shared by `search` and the running
    batch, so a sentence gets the same tokens whichever way it is decoded."""
    chosen = log_probs.argmax(axis=1)
    return chosen, log_probs[np.arange(len(chosen)), chosen]


def padded(sources: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """Source ids of different lengths as one right-padded int64 [B, S] array."""
    src = np.full((len(sources), max(len(source) for source in sources)), pad_id, dtype=np.int64)
    for row, source in enumerate(sources):
        src[row, : len(source)] = source
    return src


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass
class _History:
    """What each step of a beam search produced, for tracing a hypothesis back once it is done.

    Rows are only ever kept, reordered or repeated by ``select``, so a back-pointer per row and step
    (``parents[k][i]``: row of step ``k-1`` that row ``i`` of step ``k`` continues) recovers any path in
    O(steps) at the end instead of copying histories on every reorder.
    """

    parents: list[np.ndarray | None] = field(default_factory=list)  # None: same rows as the step before
    fed: list[np.ndarray] = field(default_factory=list)  # token fed at step k
    cross: list[np.ndarray] = field(default_factory=list)  # [N_k,L,H,S]
    self_: list[np.ndarray] = field(default_factory=list)  # [N_k,L,H,k+1]

    def path(self, last_step: int, row: int) -> list[int]:
        """Row index of the hypothesis at each step 0..last_step."""
        rows = [0] * (last_step + 1)
        rows[last_step] = row
        for k in range(last_step, 0, -1):
            parents = self.parents[k]
            if parents is not None:
                row = int(parents[row])
            rows[k - 1] = row
        return rows

    def attention(self, rows: list[int], src_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(cross [L,H,T,S_real], self [L,H,T,T]) along a path; self is zero above the diagonal."""
        steps = len(rows)
        first = self.self_[0]
        cross = np.empty((*first.shape[1:3], steps, src_length), dtype=self.cross[0].dtype)
        self_att = np.zeros((*first.shape[1:3], steps, steps), dtype=first.dtype)
        for k, i in enumerate(rows):
            cross[:, :, k] = self.cross[k][i, :, :, :src_length]
            self_att[:, :, k, : k + 1] = self.self_[k][i]
        return cross, self_att


@dataclass
class _Segment:
    """Steps of a greedy search between two compactions, whose state rows stay the same: their maps in one
    buffer per kind, laid out by row as a finished row's maps are ([L,H,steps,*] per row)."""

    first: int  # the first step
    alive: np.ndarray  # [N] original row of each state row
    position: dict[int, int]  # state row of each original row in `alive`
    cross: np.ndarray  # [N, L, H, capacity, S]
    self_: np.ndarray  # [N, L, H, capacity, W], zero past each step's own entries
    steps: int = 0


class _GreedyMaps:
    """Greedy search's attention maps. A greedy row continues itself, and its state row changes only when
    the state is compacted; so each stretch between compactions keeps its steps' maps together, and a
    finished row's maps are one slice per stretch instead of a copy per step along a path (what beam search
    needs, _History). A step's maps are written layer by layer as the backend gives them, without stacking
    them first. Buffers grow by doubling."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []

    def add(self, step: int, alive: np.ndarray, cross: Maps, self_att: Maps) -> None:
        """Step `step`'s maps for the state's rows (`alive`: their original rows; a new array after every
        compaction): cross [N,L,H,S], self [N,L,H,step+1], each stacked or per layer (Maps)."""
        cross, self_att = _per_layer(cross), _per_layer(self_att)
        rows, heads, _, width = cross[0].shape
        layers, dtype = len(cross), cross[0].dtype
        segment = self.segments[-1] if self.segments else None
        if segment is None or segment.alive is not alive or segment.cross.shape[4] != width:
            position = {row: i for i, row in enumerate(alive.tolist())}
            segment = _Segment(step, alive, position, np.empty((rows, layers, heads, 16, width), dtype),
                               np.zeros((rows, layers, heads, 16, max(32, step + 1)), dtype))
            self.segments.append(segment)
        if segment.steps == segment.cross.shape[3] or step + 1 > segment.self_.shape[4]:
            self._grow(segment, step)
        at = segment.steps
        for layer, weights in enumerate(cross):
            segment.cross[:, layer, :, at] = weights[:, :, 0]
        for layer, weights in enumerate(self_att):
            segment.self_[:, layer, :, at, : step + 1] = weights[:, :, 0]
        segment.steps += 1

    @staticmethod
    def _grow(segment: _Segment, step: int) -> None:
        held = segment.steps
        capacity = segment.cross.shape[3] * (2 if held == segment.cross.shape[3] else 1)
        width = max(segment.self_.shape[4], 2 * (step + 1))
        cross = np.empty((*segment.cross.shape[:3], capacity, segment.cross.shape[4]), segment.cross.dtype)
        cross[:, :, :, :held] = segment.cross[:, :, :, :held]
        self_att = np.zeros((*segment.self_.shape[:3], capacity, width), segment.self_.dtype)
        self_att[:, :, :, :held, : segment.self_.shape[4]] = segment.self_[:, :, :, :held]
        segment.cross, segment.self_ = cross, self_att

    def of(self, row: int, steps: int, src_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Original row `row`'s maps over steps 0..steps-1, new arrays: (cross [L,H,steps,src_length], self
        [L,H,steps,steps], zero above the diagonal)."""
        first = self.segments[0]
        if first.first + first.steps >= steps:  # all in one stretch: one slice of each
            position = first.position[row]
            return (first.cross[position, :, :, :steps, :src_length].copy(),
                    first.self_[position, :, :, :steps, :steps].copy())
        layers, heads = first.cross.shape[1:3]
        cross = np.empty((layers, heads, steps, src_length), first.cross.dtype)
        self_att = np.zeros((layers, heads, steps, steps), first.self_.dtype)
        for segment in self.segments:
            if segment.first >= steps:
                break
            taken = min(segment.steps, steps - segment.first)
            position = segment.position[row]
            span = slice(segment.first, segment.first + taken)
            cross[:, :, span] = segment.cross[position, :, :, :taken, :src_length]
            width = min(steps, segment.self_.shape[4])
            self_att[:, :, span, :width] = segment.self_[position, :, :, :taken, :width]
        return cross, self_att


@dataclass
class _Run:
    backend: StepBackend
    src_lengths: np.ndarray
    pad_id: int
    bos_id: int
    eos_id: int
    max_lengths: np.ndarray  # [B] steps allowed per original row
    length_penalty: float
    with_attention: bool
    on_token: OnToken | None
    is_abandoned: IsAbandoned | None
    on_done: OnDone | None
    encoded_at: float | None = None

    def _denominator(self, n_steps: int) -> float:
        return length_norm(n_steps, self.length_penalty)

    def _denominators(self, n_steps: np.ndarray) -> np.ndarray:
        return n_steps.astype(np.float64) ** self.length_penalty

    def _step(
        self, state: object, tokens: np.ndarray
    ) -> tuple[object, np.ndarray, np.ndarray | None, np.ndarray | None]:
        state, log_probs, cross, self_att = self.backend.step(state, tokens, self.with_attention)
        log_probs = np.asarray(log_probs)
        if log_probs.ndim != 2 or log_probs.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"backend.step returned log_probs of shape {log_probs.shape} for {tokens.shape[0]} rows"
            )
        log_probs = never_specials(log_probs, self.pad_id, self.bos_id)
        if self.with_attention and (cross is None or self_att is None):
            raise ValueError("backend.step returned no attention although with_attention=True")
        return state, log_probs, cross, self_att

    def _done(self, row: int, hypothesis: Hypothesis | None) -> None:
        if self.on_done is not None and hypothesis is not None:
            self.on_done(row, hypothesis)

    def _drop_abandoned(self, rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """keep with the still-kept rows that the caller gave up on turned off."""
        if self.is_abandoned is not None:
            for position in np.flatnonzero(keep).tolist():
                if self.is_abandoned(int(rows[position])):
                    keep[position] = False
        return keep

    def _hypothesis(
        self,
        row: int,
        tokens: list[int],
        log_prob: float,
        finished: bool,
        n_steps: int,
        maps: tuple[np.ndarray, np.ndarray] | None,
        encoder_attention: np.ndarray | None,
    ) -> Hypothesis:
        """`maps`: the row's (cross [L,H,T,S_real], self [L,H,T,T]) attention along its path; None without."""
        hypothesis = Hypothesis(
            tokens=tokens,
            log_prob=log_prob,
            score=score(log_prob, n_steps, self.length_penalty),
            finished=finished,
            encoded_at=self.encoded_at,
        )
        if maps is not None:
            src_length = int(self.src_lengths[row])
            hypothesis.cross_attention, hypothesis.self_attention = maps
            if encoder_attention is not None:
                # A copy, so a kept result does not pin the whole batch's encoder attention in memory.
                hypothesis.encoder_attention = encoder_attention[row, :, :, :src_length, :src_length].copy()
        return hypothesis

    def _encode(self, src: np.ndarray) -> tuple[object, np.ndarray | None]:
        state, encoder_attention = self.backend.encode(src, self.with_attention)
        self.encoded_at = time.monotonic()
        if self.with_attention and encoder_attention is None:
            raise ValueError("backend.encode returned no attention although with_attention=True")
        return state, (np.asarray(encoder_attention) if self.with_attention else None)

    def greedy(self, src: np.ndarray) -> list[Hypothesis | None]:
        batch = src.shape[0]
        results: list[Hypothesis | None] = [None] * batch
        state, encoder_attention = self._encode(src)
        maps = _GreedyMaps() if self.with_attention else None
        alive = np.arange(batch, dtype=np.int64)  # original row of each row of the state
        # Rows of the state still decoding. A done row stays in the state, its outputs ignored, until
        # compacting pays (see GREEDY_COMPACT_FRACTION).
        running = np.ones(batch, dtype=bool)
        tokens = np.full(batch, self.bos_id, dtype=np.int64)
        log_prob_sum = np.zeros(batch, dtype=np.float64)  # by original row
        # Output tokens by original row and step; grown on demand so a huge max_length costs nothing.
        generated = np.zeros((batch, min(int(self.max_lengths.max()), 64)), dtype=np.int64)

        keep = self._drop_abandoned(alive, np.ones(batch, dtype=bool))
        if not keep.all():
            kept = np.flatnonzero(keep)
            alive, tokens, running = alive[kept], tokens[kept], running[kept]
            if kept.size:
                state = self.backend.select(state, kept)

        for k in range(int(self.max_lengths.max())):
            if not running.any():
                break
            state, log_probs, cross, self_att = self._step(state, tokens)
            chosen, chosen_log_probs = greedy_choice(log_probs)  # masked by _step
            live = np.flatnonzero(running)
            rows = alive[live]
            log_prob_sum[rows] += chosen_log_probs[live]
            if k >= generated.shape[1]:
                generated = np.concatenate([generated, np.zeros_like(generated)], axis=1)
            generated[rows, k] = chosen[live]
            if maps is not None:
                maps.add(k, alive, cross, self_att)
            is_eos = chosen == self.eos_id
            if self.on_token is not None:
                real = running & ~is_eos
                for row, token in zip(alive[real].tolist(), chosen[real].tolist(), strict=True):
                    self.on_token(row, token)

            done = running & (is_eos | (self.max_lengths[alive] <= k + 1))
            for position in np.flatnonzero(done).tolist():
                row = int(alive[position])
                finished = bool(is_eos[position])
                n_tokens = k if finished else k + 1
                results[row] = self._hypothesis(
                    row,
                    generated[row, :n_tokens].tolist(),
                    float(log_prob_sum[row]),
                    finished,
                    k + 1,
                    None if maps is None else maps.of(row, k + 1, int(self.src_lengths[row])),
                    encoder_attention,
                )
                self._done(row, results[row])
            running = self._drop_abandoned(alive, running & ~done)
            tokens = chosen
            n_running = int(running.sum())
            if n_running and n_running > (1 - GREEDY_COMPACT_FRACTION) * alive.size:
                continue
            kept = np.flatnonzero(running)
            alive, tokens, running = alive[kept], chosen[kept], running[kept]
            if kept.size:
                state = self.backend.select(state, kept)
        return results

    def beam(self, src: np.ndarray, beam_size: int) -> list[Hypothesis | None]:
        batch = src.shape[0]
        results: list[Hypothesis | None] = [None] * batch
        state, encoder_attention = self._encode(src)
        history = _History()
        sentences = np.arange(batch, dtype=np.int64)  # original row of each running sentence
        # Step 0 runs one row per sentence: all beams would be identical, so repeating them before it would
        # waste compute and produce duplicate candidates. The first reorder expands to beam_size rows.
        width = 1
        tokens = np.full(batch, self.bos_id, dtype=np.int64)
        beam_log_probs = np.zeros((batch, 1), dtype=np.float64)
        # Best hypothesis so far per sentence: a (step, row of that step, last token) reference to trace.
        best_score = np.full(batch, -np.inf)
        best_log_prob = np.full(batch, -np.inf)
        best_step = np.zeros(batch, dtype=np.int64)
        best_row = np.zeros(batch, dtype=np.int64)
        n_candidates = 2 * beam_size

        keep = self._drop_abandoned(sentences, np.ones(batch, dtype=bool))
        if not keep.all():
            kept = np.flatnonzero(keep)
            sentences, tokens, beam_log_probs = sentences[kept], tokens[kept], beam_log_probs[kept]
            if kept.size:
                state = self.backend.select(state, kept)
        parents: np.ndarray | None = None

        for k in range(int(self.max_lengths.max())):
            n = sentences.size
            if n == 0:
                break
            state, log_probs, cross, self_att = self._step(state, tokens)
            vocab = log_probs.shape[1]
            history.parents.append(parents)
            history.fed.append(tokens)
            if self.with_attention:
                history.cross.append(layers_stacked(cross))
                history.self_.append(layers_stacked(self_att))

            top, cand_log_probs = _top_candidates(log_probs, beam_log_probs, n_candidates)
            beam_of = top // vocab
            token_of = top % vocab
            first_row = (np.arange(n) * width)[:, None]
            row_of = first_row + beam_of  # row of this step each candidate extends
            if top.shape[1] < n_candidates:
                # Tiny vocabularies: fill up with dead candidates so there are always beam_size beams.
                missing = n_candidates - top.shape[1]
                row_of = np.concatenate([row_of, np.broadcast_to(first_row, (n, missing))], axis=1)
                token_of = np.concatenate([token_of, np.full((n, missing), self.pad_id)], axis=1)
                cand_log_probs = np.concatenate([cand_log_probs, np.full((n, missing), -np.inf)], axis=1)
            is_eos = token_of == self.eos_id

            # Candidates ending in </s> become finished hypotheses; keep only the best per sentence.
            finished_scores = np.where(is_eos, cand_log_probs, -np.inf) / self._denominator(k + 1)
            pick = finished_scores.argmax(axis=1)
            picked_scores = finished_scores[np.arange(n), pick]
            improved = np.flatnonzero(picked_scores > best_score[sentences])
            if improved.size:
                ids = sentences[improved]
                best_score[ids] = picked_scores[improved]
                best_log_prob[ids] = cand_log_probs[improved, pick[improved]]
                best_step[ids] = k
                best_row[ids] = row_of[improved, pick[improved]]

            # At most `width <= beam_size` candidates end in </s>, so the first beam_size others (in score
            # order, which a stable sort on is_eos keeps) always exist.
            survivors = np.argsort(is_eos, axis=1, kind="stable")[:, :beam_size]
            next_rows = np.take_along_axis(row_of, survivors, axis=1)
            next_tokens = np.take_along_axis(token_of, survivors, axis=1)
            next_log_probs = np.take_along_axis(cand_log_probs, survivors, axis=1)
            best_running = next_log_probs.max(axis=1)

            limits = self.max_lengths[sentences]
            last = limits <= k + 1
            with np.errstate(divide="ignore", invalid="ignore"):
                bound = best_running / np.maximum(self._denominator(k + 2), self._denominators(limits))
            done = last | (best_score[sentences] >= bound)
            for position in np.flatnonzero(done).tolist():
                sentence = int(sentences[position])
                # A running beam is the answer at max_length if it beats every finished one, or when none
                # finished at all (only possible if every continuation has probability 0). Before
                # max_length, running beams are unfinished prefixes and the bound has ruled them out.
                running_score = best_running[position] / self._denominator(k + 1)
                if (last[position] and running_score > best_score[sentence]) or not np.isfinite(
                    best_score[sentence]
                ):
                    beam = int(next_log_probs[position].argmax())
                    results[sentence] = self._beam_hypothesis(
                        sentence,
                        history,
                        k,
                        int(next_rows[position, beam]),
                        int(next_tokens[position, beam]),
                        float(next_log_probs[position, beam]),
                        encoder_attention,
                    )
                else:
                    results[sentence] = self._beam_hypothesis(
                        sentence,
                        history,
                        int(best_step[sentence]),
                        int(best_row[sentence]),
                        self.eos_id,
                        float(best_log_prob[sentence]),
                        encoder_attention,
                    )

            kept = np.flatnonzero(self._drop_abandoned(sentences, ~done))
            sentences = sentences[kept]
            parents = next_rows[kept].ravel()
            tokens = next_tokens[kept].ravel()
            beam_log_probs = next_log_probs[kept]
            previous_rows = n * width
            width = beam_size
            # Skipping an identity select saves copying the whole decoder cache.
            if parents.size and not (
                parents.size == previous_rows and np.array_equal(parents, np.arange(previous_rows))
            ):
                state = self.backend.select(state, parents)
        return results

    def _beam_hypothesis(
        self,
        sentence: int,
        history: _History,
        last_step: int,
        last_row: int,
        last_token: int,
        log_prob: float,
        encoder_attention: np.ndarray | None,
    ) -> Hypothesis:
        path = history.path(last_step, last_row)
        # The token fed at step k+1 is the one produced at step k.
        tokens = [int(history.fed[k][path[k]]) for k in range(1, last_step + 1)]
        finished = last_token == self.eos_id
        if not finished:
            tokens.append(last_token)
        hypothesis = self._hypothesis(
            sentence,
            tokens,
            log_prob,
            finished,
            last_step + 1,
            history.attention(path, int(self.src_lengths[sentence])) if self.with_attention else None,
            encoder_attention,
        )
        if self.on_token is not None:
            for token in tokens:
                self.on_token(sentence, token)
        self._done(sentence, hypothesis)
        return hypothesis


# Greedy search drops done rows from the state (backend.select, a copy of the whole cache) only once at
# least this fraction of its rows are done; until then they are decoded along, their outputs ignored. Copying
# the cache after every finished sentence cost more than the wasted rows (default model, batch 32-128 on CPU).
GREEDY_COMPACT_FRACTION = 0.25

# Below this many scores per sentence (W*V) a plain partition is cheaper than the thresholding of
# _top_candidates (measured: break-even around W*V = 200-400).
_FAST_TOP_MIN = 512


def _top_candidates(
    log_probs: np.ndarray, beam_log_probs: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``count`` extensions per sentence, best first: (flat index beam * V + token, float64 sum).

    log_probs [n*W, V] (rows sentence-major), beam_log_probs float64 [n, W]. Sums are float64 throughout,
    and ties go to the lower flat index on every path, so the result does not depend on the path taken.
    Returns fewer than ``count`` columns only when W*V < count.

    np.argpartition over [n, W*V] dominates a beam step with a large vocabulary, so the usual path first
    finds a floor that at least ``count`` candidates of each sentence reach: the count-th best of the
    maxima of ``count`` chunks of every row (distinct candidates; ``count`` chunks per row so that the
    floor stays tight even when one beam dominates). It then keeps the candidates above that floor with
    one float32 comparison pass and sorts only those few.
    """
    n, width = beam_log_probs.shape
    vocab = log_probs.shape[1]
    total = width * vocab
    chunks = count
    if total >= _FAST_TOP_MIN and vocab >= chunks:
        starts = (np.arange(chunks) * vocab) // chunks
        chunk_max = np.maximum.reduceat(log_probs, starts, axis=1).reshape(n, width, chunks)
        chunk_scores = (chunk_max.astype(np.float64) + beam_log_probs[:, :, None]).reshape(n, width * chunks)
        floor = np.partition(chunk_scores, width * chunks - count, axis=1)[:, width * chunks - count]
        if np.isfinite(floor).all():
            # Loosened so float32 rounding can only let extra candidates in, never keep one out. Dead
            # beams (-inf) contribute nothing: at least `count` finite candidates reach the floor.
            alive = np.isfinite(beam_log_probs)
            beams = np.where(alive, beam_log_probs, 0.0)
            margin = 1e-6 * (np.abs(floor)[:, None] + np.abs(beams)) + 1e-6
            threshold = np.where(alive, floor[:, None] - beams - margin, np.inf)
            threshold = threshold.astype(np.float32).reshape(-1, 1)
            # flatnonzero: np.nonzero on a 2-D mask is an order of magnitude slower.
            kept = np.flatnonzero(log_probs >= np.nextafter(threshold, np.float32(-np.inf)))
            rows, tokens = np.divmod(kept, vocab)
            per_sentence = np.bincount(rows // width, minlength=n)
            if per_sentence.min() >= count and kept.size <= 64 * count * n:
                sums = beam_log_probs.reshape(-1)[rows] + log_probs[rows, tokens]
                # kept is increasing, so is the flat index within a sentence: the stable sort keeps that
                # order for ties.
                order = np.lexsort((-sums, rows // width))
                first = np.cumsum(per_sentence) - per_sentence
                chosen = order[first[:, None] + np.arange(count)]
                return (rows[chosen] % width) * vocab + tokens[chosen], sums[chosen]
    # Small problems, dead beams (-inf) and massive ties (e.g. a uniform distribution).
    flat = (log_probs.reshape(n, width, vocab).astype(np.float64) + beam_log_probs[:, :, None]).reshape(
        n, total
    )
    if total > 8 * count:
        # argpartition alone would split ties at the count-th score arbitrarily: take everything above
        # it, then the lowest flat indices among those equal to it.
        kth = -np.partition(-flat, count - 1, axis=1)[:, count - 1 : count]
        above = flat > kth
        at = flat == kth
        needed = count - above.sum(axis=1, keepdims=True)
        keep = above | (at & (np.cumsum(at, axis=1) <= needed))
        top = np.nonzero(keep)[1].reshape(n, count)  # increasing flat index in each row
        order = np.argsort(-np.take_along_axis(flat, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
    else:
        top = np.argsort(-flat, axis=1, kind="stable")[:, :count]
    return top, np.take_along_axis(flat, top, axis=1)
