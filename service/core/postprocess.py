"""From a search's raw `Hypothesis` to the `Translation` a caller gets: text, tokens, trimmed maps.

Runs where the answer is built (the waiting call's thread in the server, the caller's in-process), never in
the engine's lanes, so that per-sentence text work does not hold a decoding lane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.core.options import TranslateOptions
from service.core.search import Hypothesis
from service.core.vocabulary import EOS, EncodedText, Vocabulary


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


def finish(
    vocabulary: Vocabulary, source: EncodedText, hypothesis: Hypothesis, options: TranslateOptions
) -> Translation:
    """Text, tokens and the attention maps the caller asked for (the search trimmed them to the real
    lengths); maps computed for another reason (replace_unknowns, the quality metrics) are left out."""
    ids = list(hypothesis.tokens)
    target_tokens = vocabulary.tokens(ids) + ([EOS] if hypothesis.finished else [])
    words = None
    if options.replace_unknowns and vocabulary.unk_id in ids and hypothesis.cross_attention is not None:
        words = replace_unknowns(vocabulary, ids, source, hypothesis.cross_attention)
    text = vocabulary.decode(ids, source, words)
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


def replace_unknowns(
    vocabulary: Vocabulary, ids: list[int], source: EncodedText, cross_attention: np.ndarray
) -> list[str]:
    """One word per id: each generated <unk> becomes the source word its mean cross-attention points to
    most."""
    mean = cross_attention.mean(axis=(0, 1))[:, :-1]  # the source </s> is not a word to copy
    words = []
    for position, token_id in enumerate(ids):
        if token_id == vocabulary.unk_id and mean.shape[1]:
            words.append(source.pieces[int(mean[position].argmax())])
        else:
            words.append(vocabulary.decode([token_id]))
    return words
