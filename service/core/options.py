"""What a caller may ask of a translation, and the rules every layer applies to it the same way.

One definition each of: the attention kinds, the options that must match for sentences to share a search,
and the length rule (how many decoding steps a sentence may take). Evaluation, the engine, the scheduler
and the server all read them from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

# The attention maps a translation can carry, in the engine's names (the wire enums map onto these).
ATTENTION_KINDS = ("cross", "decoder_self", "encoder_self")

# Without a max_length of its own a sentence may take 2 x its source tokens (</s> included) + 10 steps:
# enough for any translation of the toy language (targets are at most 1.6x their source), small enough that
# a model that never emits </s> stops soon.
AUTOMATIC_LENGTH_FACTOR = 2
AUTOMATIC_LENGTH_MARGIN = 10


def max_steps(source_length: int, requested: int | None, limit: int) -> int:
    """The length rule: the decoding steps (</s> included) a sentence of `source_length` source ids may take.

    Per sentence, so that a translation does not depend on the batch it shares; `requested` (a caller's
    max_length) replaces the automatic length; `limit` (the server's or the model's positions) caps both.
    """
    automatic = AUTOMATIC_LENGTH_FACTOR * source_length + AUTOMATIC_LENGTH_MARGIN
    return max(1, min(requested or automatic, limit))


@dataclass(frozen=True)
class TranslateOptions:
    beam_size: int = 1
    max_length: int | None = None  # decoding steps; None: the automatic length of `max_steps`
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
        """The search must record attention: maps were asked for, or <unk> is replaced through them."""
        return bool(self.attention) or self.replace_unknowns

    @property
    def joins_running_batch(self) -> bool:
        """Whether a sentence with these options may join a running batch (iteration-level batching):
        greedy search without attention only, since beams and maps need the whole batch's history."""
        return self.beam_size == 1 and not self.needs_attention

    def search_key(self) -> tuple:
        """Options that must be equal for sentences to share one search (each keeps its own max_length)."""
        return (self.beam_size, self.length_penalty, self.needs_attention)
