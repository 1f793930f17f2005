"""Iteration-level batching: greedy search over a batch that sentences join and leave between steps.

A `RunningBatch` is `search(..., beam_size=1)` cut into steps the caller drives, so that the scheduler can
let queued sentences join between two steps instead of waiting for the whole batch to end. A sentence gets
the tokens and score it would get from `search` whenever it joined (tested): both take their decision
from `greedy_choice` and their score from `score`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from service.core.search import (
    GREEDY_COMPACT_FRACTION,
    Hypothesis,
    StepBackend,
    greedy_choice,
    never_specials,
    padded,
    score,
)


class JoinableBackend(StepBackend, Protocol):
    """A StepBackend whose states can be joined: rows added to a running batch between steps."""

    def merge(self, first: object, second: object) -> object:
        """The rows of `first`, then those of `second` (which may be at earlier positions)."""
        ...


class RunningBatch:
    """Greedy search over a batch that rows join and leave between steps (iteration-level batching).

    A row is any hashable key of the caller's. ``add`` encodes new sentences and joins them to the running
    rows (their caches left-padded, see ``JoinableBackend.merge``); ``step`` decodes one position for every
    running row. Results leave through the callbacks as in ``search``: ``on_token(key, token)``,
    ``on_done(key, hypothesis)`` the step a row is done, ``is_abandoned(key)`` before every step. A sentence
    gets the tokens and score it gets from ``search(..., beam_size=1)``, whenever it joined (tested). No
    attention maps: requests for them run as whole batches.
    """

    def __init__(
        self,
        backend: JoinableBackend,
        *,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        length_penalty: float = 1.0,
        on_token: Callable[[object, int], object] | None = None,
        on_done: Callable[[object, Hypothesis], object] | None = None,
        is_abandoned: Callable[[object], bool] | None = None,
        max_positions: int | None = None,
    ) -> None:
        self.backend = backend
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        # The model's position table. A done row is decoded along until compaction; in a batch that rows keep
        # joining it could be carried past the table, which fails the whole batch: it leaves first.
        self.max_positions = max_positions
        self.length_penalty = float(length_penalty)
        self.on_token, self.on_done, self.is_abandoned = on_token, on_done, is_abandoned
        self.state: object | None = None
        self.keys: list[object] = []  # one per row of the state
        self.running = np.zeros(0, dtype=bool)  # rows still decoding (done rows wait for compaction)
        self.tokens = np.zeros(0, dtype=np.int64)  # the token each row feeds next
        self.steps = np.zeros(0, dtype=np.int64)  # steps each row has taken
        self.positions = np.zeros(0, dtype=np.int64)  # the position each row of the state is fed next
        self.max_lengths = np.zeros(0, dtype=np.int64)
        self.log_probs = np.zeros(0, dtype=np.float64)
        self.generated: list[list[int]] = []
        self.encoded_at: list[float] = []  # time.monotonic() when each row's encoder run finished

    @property
    def size(self) -> int:
        """Rows still decoding."""
        return int(self.running.sum())

    def close(self) -> None:
        """Nothing to give back (a running batch in a lane process gives back its lane)."""

    def add(
        self, keys: Sequence[object], sources: Sequence[Sequence[int]], max_lengths: Sequence[int]
    ) -> None:
        """Encode `sources` (ids ending with </s>) and join them to the running rows."""
        if not sources:
            return
        if min(max_lengths) < 1:
            raise ValueError(f"max_length must be at least 1, got {min(max_lengths)}")
        state, _ = self.backend.encode(padded(sources, self.pad_id), False)
        encoded_at = time.monotonic()
        self.state = state if self.state is None else self.backend.merge(self.state, state)
        count = len(sources)
        self.keys += list(keys)
        self.running = np.concatenate([self.running, np.ones(count, dtype=bool)])
        self.tokens = np.concatenate([self.tokens, np.full(count, self.bos_id, dtype=np.int64)])
        self.steps = np.concatenate([self.steps, np.zeros(count, dtype=np.int64)])
        self.positions = np.concatenate([self.positions, np.zeros(count, dtype=np.int64)])
        self.max_lengths = np.concatenate([self.max_lengths, np.asarray(max_lengths, dtype=np.int64)])
        self.log_probs = np.concatenate([self.log_probs, np.zeros(count)])
        self.generated += [[] for _ in range(count)]
        self.encoded_at += [encoded_at] * count

    def step(self) -> None:
        """One decoding step for the running rows; done and abandoned rows leave."""
        if self.is_abandoned is not None:
            for row in np.flatnonzero(self.running).tolist():
                if self.is_abandoned(self.keys[row]):
                    self.running[row] = False
        if self.running.any():
            self._decode()
        self._compact()

    def _decode(self) -> None:
        self.state, log_probs, _, _ = self.backend.step(self.state, self.tokens, False)
        masked = never_specials(np.asarray(log_probs), self.pad_id, self.bos_id)
        chosen, chosen_log_probs = greedy_choice(masked)
        live = np.flatnonzero(self.running)
        self.log_probs[live] += chosen_log_probs[live]
        self.steps[live] += 1
        self.positions += 1
        is_eos = chosen == self.eos_id
        for row in live.tolist():
            if not is_eos[row]:
                token = int(chosen[row])
                self.generated[row].append(token)
                if self.on_token is not None:
                    self.on_token(self.keys[row], token)
        done = self.running & (is_eos | (self.steps >= self.max_lengths))
        for row in np.flatnonzero(done).tolist():
            log_prob, steps = float(self.log_probs[row]), int(self.steps[row])
            hypothesis = Hypothesis(
                tokens=self.generated[row],
                log_prob=log_prob,
                score=score(log_prob, steps, self.length_penalty),
                finished=bool(is_eos[row]),
                encoded_at=self.encoded_at[row],
            )
            if self.on_done is not None:
                self.on_done(self.keys[row], hypothesis)
        self.running &= ~done
        self.tokens = chosen

    def _left_rows_at_the_end(self) -> bool:
        """Whether a row that left would be fed a position past the model's table at the next step."""
        if self.max_positions is None:
            return False
        return bool((~self.running & (self.positions >= self.max_positions)).any())

    def _compact(self) -> None:
        """Drop the rows that left once enough have (as greedy ``search`` does), or all when none runs, or
        before a row that left would be fed a position past the model's."""
        rows = len(self.keys)
        left = rows - self.size
        if left == 0:
            return
        if self.size and left < GREEDY_COMPACT_FRACTION * rows and not self._left_rows_at_the_end():
            return
        kept = np.flatnonzero(self.running)
        self.keys = [self.keys[row] for row in kept.tolist()]
        self.generated = [self.generated[row] for row in kept.tolist()]
        self.encoded_at = [self.encoded_at[row] for row in kept.tolist()]
        for name in ("running", "tokens", "steps", "positions", "max_lengths", "log_probs"):
            setattr(self, name, getattr(self, name)[kept])
        self.state = self.backend.select(self.state, kept) if kept.size else None

