"""Request checks shared by both APIs: texts, decoding options and attention selections against the limits.

Every violation is INVALID_ARGUMENT with a message that names the field, the limit and the offending value,
so a client can fix its request without reading server logs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from service.core.model_format import Architecture
from service.core.options import ATTENTION_KINDS, TranslateOptions
from service.core.vocabulary import EmptyTextError, EncodedText
from service.engine.engine import Engine
from service.scheduler.status import invalid

# steps ** length_penalty must stay a finite float for every step count (a larger penalty overflows the score
# formula); 100 keeps it finite up to 1000 steps, far beyond any useful penalty.
MAX_LENGTH_PENALTY = 100.0
# Tokenizing is linear in the text but not free: a text longer than this many characters per allowed token is
# refused before the tokenizer sees it, so that a multi-megabyte text cannot hold the server only to be
# refused for its token count afterwards. No real token is anywhere near this long.
CHARACTERS_PER_TOKEN = 64


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_tokens_per_text: int
    max_beam_size: int
    max_length: int  # decoding steps; also what the engine caps the automatic length at
    default_beam_size: int = 1
    default_length_penalty: float = 1.0

    @property
    def max_characters_per_text(self) -> int:
        return self.max_tokens_per_text * CHARACTERS_PER_TOKEN


@dataclass(frozen=True)
class AttentionSelection:
    kinds: tuple[str, ...] = ()  # engine kind names (ATTENTION_KINDS), in the order they were asked for
    layers: tuple[int, ...] = ()  # empty: all layers
    heads: tuple[int, ...] = ()  # empty: all heads


NO_SELECTION = AttentionSelection()


def encode_texts(
    engine: Engine, texts: Sequence[str], limits: Limits, field: str = "texts"
) -> list[EncodedText]:
    if not texts:
        raise invalid(f"{field} is empty: give at least one text to translate")
    if len(texts) > limits.max_texts_per_request:
        raise invalid(
            f"{field} has {len(texts)} texts, more than max_texts_per_request={limits.max_texts_per_request}"
        )
    sources = []
    for index, text in enumerate(texts):
        name = f"{field}[{index}]" if len(texts) > 1 or field.endswith("s") else field
        if len(text) > limits.max_characters_per_text:
            raise invalid(
                f"{name} has {len(text)} characters, more than the {limits.max_characters_per_text} allowed "
                f"({CHARACTERS_PER_TOKEN} per token of max_tokens_per_text={limits.max_tokens_per_text})"
            )
        try:
            source = engine.vocabulary.encode_source(text)
        except EmptyTextError as error:
            raise invalid(f"{name}: {error}") from error
        tokens = len(source.ids) - 1  # </s> does not count against the limit
        if tokens > limits.max_tokens_per_text:
            raise invalid(
                f"{name} has {tokens} tokens, more than max_tokens_per_text={limits.max_tokens_per_text}"
            )
        sources.append(source)
    return sources


def make_options(
    limits: Limits,
    *,
    beam_size: int | None = None,
    max_length: int | None = None,
    length_penalty: float | None = None,
    replace_unknowns: bool = False,
    attention: Sequence[str] = (),
    where: str = "options",
) -> TranslateOptions:
    """TranslateOptions from optional request values; None takes the server default."""
    beam = limits.default_beam_size if beam_size is None else beam_size
    if not 1 <= beam <= limits.max_beam_size:
        raise invalid(
            f"{where}.beam_size must be between 1 and max_beam_size={limits.max_beam_size}, got {beam}"
        )
    if max_length is not None and not 1 <= max_length <= limits.max_length:
        raise invalid(
            f"{where}.max_length must be between 1 and max_length={limits.max_length}, got {max_length}"
        )
    penalty = limits.default_length_penalty if length_penalty is None else float(length_penalty)
    if not math.isfinite(penalty) or not 0 <= penalty <= MAX_LENGTH_PENALTY:
        raise invalid(
            f"{where}.length_penalty must be a finite number between 0 and {MAX_LENGTH_PENALTY:g}, "
            f"got {penalty}"
        )
    return TranslateOptions(
        beam_size=beam,
        max_length=max_length,
        length_penalty=penalty,
        replace_unknowns=bool(replace_unknowns),
        attention=frozenset(attention),
    )


def check_selection_sizes(
    kinds: int, layers: int, heads: int, architecture: Architecture, where: str = "attention"
) -> None:
    """Selections are client-controlled lists: refuse one longer than the model could ever need before any
    other check looks at its elements."""
    most_layers = max(architecture.n_encoder_layers, architecture.n_decoder_layers)
    for name, count, most, what in (
        ("kinds", kinds, len(ATTENTION_KINDS), "attention kinds"),
        ("layers", layers, most_layers, "layers"),
        ("heads", heads, architecture.n_heads, "heads"),
    ):
        if count > most:
            raise invalid(
                f"{where}.{name} has {count} entries, more than the model's {most} {what} (each may be asked "
                "for once)"
            )


def check_selection(
    selection: AttentionSelection, architecture: Architecture, where: str = "attention"
) -> None:
    """Kinds once each; layer and head indices within the model (encoder layers for encoder_self)."""
    check_selection_sizes(
        len(selection.kinds), len(selection.layers), len(selection.heads), architecture, where
    )
    for kind in selection.kinds:
        if kind not in ATTENTION_KINDS:
            raise invalid(f"{where}.kinds: {kind!r} is not an attention kind")
    repeated = repeated_values(selection.kinds)
    if repeated:
        raise invalid(f"{where}.kinds: each kind may be asked for once, got {repeated} more than once")
    for name, values in (("layers", selection.layers), ("heads", selection.heads)):
        duplicates = repeated_values(values)
        if duplicates:
            raise invalid(f"{where}.{name}: indices {duplicates} appear more than once")
        if values and not selection.kinds:
            raise invalid(f"{where}.{name} given without any attention kind")
    for kind in selection.kinds:
        layers = architecture.n_encoder_layers if kind == "encoder_self" else architecture.n_decoder_layers
        which = "encoder" if kind == "encoder_self" else "decoder"
        bad = [layer for layer in selection.layers if not 0 <= layer < layers]
        if bad:
            raise invalid(
                f"{where}.layers {bad} out of range: the model has {layers} {which} layers "
                f"(0-{layers - 1}), needed by {kind}"
            )
    bad = [head for head in selection.heads if not 0 <= head < architecture.n_heads]
    if bad:
        raise invalid(
            f"{where}.heads {bad} out of range: the model has {architecture.n_heads} heads "
            f"(0-{architecture.n_heads - 1})"
        )


def repeated_values(values: Sequence[str] | Sequence[int]) -> list:
    """The values that occur more than once, sorted (one pass: client lists may be long)."""
    return sorted(value for value, count in Counter(values).items() if count > 1)


def longer_than_training(engine: Engine, source_tokens: int) -> bool:
    """Whether a source of `source_tokens` ids (</s> included) is longer than any the model was trained on
    (False when the model does not record it)."""
    longest = engine.model.max_training_source_tokens
    return longest is not None and source_tokens > longest
