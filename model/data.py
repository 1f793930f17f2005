"""Parallel corpora (the toy language or a user TSV) and token-count batches bucketed by length."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import toy_language
from service.core.text import NAME_SLOTS, NUMBER_SLOTS, prepare_source, prepare_target
from service.core.vocabulary import Vocabulary, without_invisible


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    alignment: tuple[tuple[int, ...], ...] | None = None  # gold word alignment, toy language only


def read_tsv(path: str | Path) -> list[Example]:
    """`source<TAB>target` lines; blank lines are skipped, malformed lines are errors naming the line."""
    examples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not without_invisible(parts[0]).strip() or not parts[1].strip():
                raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line[:80]!r}")
            examples.append(Example(parts[0].strip(), parts[1].strip()))
    if not examples:
        raise ValueError(f"{path}: no sentence pairs")
    return examples


def toy_split(name: str, size: int | None = None, seed: int | None = None) -> list[Example]:
    pairs = toy_language.generate_split(name, size=size, seed=seed)
    return [Example(p.source, p.target, p.alignment) for p in pairs]


def toy_model_texts(examples: list[Example]) -> Iterator[str]:
    """Sources and targets as the model reads and writes them (service.core.text), names told apart from
    words by the toy lexicon: what a word-level vocabulary with text rules is built from."""
    english, target = toy_language.lexicon_words()
    known = (english | target).__contains__
    for example in examples:
        source = prepare_source(example.source, known)
        yield " ".join(source.tokens)
        yield " ".join(prepare_target(example.target, source))


@dataclass
class EncodedPair:
    source: np.ndarray  # int64 word ids + </s>
    target: np.ndarray  # int64 <s> word ids </s>


def encode_examples(
    vocabulary: Vocabulary, examples: list[Example], seed: int | None = None
) -> list[EncodedPair]:
    """Ids of each pair. With a `seed`, each pair's slots are renumbered at random (the same way on both
    sides): texts mostly hold one or two names, so without it the model would only learn to copy the first
    slots, while a text may use them all."""
    rng = random.Random(seed)
    kinds = [[vocabulary.tokenizer.token_to_id(t) for t in slots]
             for slots in (NAME_SLOTS, NUMBER_SLOTS)] if vocabulary.text_rules else []
    pairs = []
    for example in examples:
        source = vocabulary.encode_source(example.source)
        pair = EncodedPair(np.asarray(source.ids, dtype=np.int64),
                           np.asarray(vocabulary.encode_target(example.target, source), dtype=np.int64))
        if seed is not None and source.prepared is not None and source.prepared.slots:
            for ids in kinds:
                mapping = dict(zip(ids, rng.sample(ids, len(ids)), strict=True))
                for row in (pair.source, pair.target):
                    row[:] = [mapping.get(int(i), int(i)) for i in row]
        pairs.append(pair)
    return pairs


@dataclass
class Batch:
    src_ids: np.ndarray  # [B, S]
    tgt_ids: np.ndarray  # [B, T + 1]: decoder input is [:, :-1], labels are [:, 1:]
    n_target_tokens: int


def pad(rows: list[np.ndarray], pad_id: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def token_batches(
    pairs: list[EncodedPair],
    max_tokens: int,
    pad_id: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch]:
    """Batches holding at most `max_tokens` padded tokens per side, of sentences of similar length.

    Sorting within large shuffled pools keeps padding low while the epoch order stays random; the batch
    order is shuffled again so lengths do not drift through the epoch. Every rank gets the same number of
    batches so that DistributedDataParallel steps stay in lockstep.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    pool = max_tokens * 4
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(
            order[start : start + pool], key=lambda i: (len(pairs[i].source), len(pairs[i].target))
        )
        current: list[int] = []
        longest = 0
        for i in chunk:
            length = max(len(pairs[i].source), len(pairs[i].target))
            if current and max(longest, length) * (len(current) + 1) > max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, length)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    per_rank = len(batches) // world_size if world_size > 1 else len(batches)
    mine = batches[rank::world_size][:per_rank]
    return [
        Batch(
            pad([pairs[i].source for i in b], pad_id),
            pad([pairs[i].target for i in b], pad_id),
            sum(len(pairs[i].target) - 1 for i in b),
        )
        for b in mine
    ]
