"""Vocabularies built by model.tokenizer (word level, BPE) and the training data: TSV files, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import EncodedPair, encode_examples, read_tsv, token_batches, toy_model_texts, toy_split
from model.tokenizer import build_bpe, build_word_level
from model.toy_language import lexicon_words
from service.core.text import SLOT_TOKENS
from service.core.vocabulary import EmptyTextError, Vocabulary

CORPUS = ["the big dog sees the cat", "el perro grande ve el gato", "i see her", "yo la veo"]


def test_word_level_round_trips_and_has_the_special_tokens(tmp_path: Path) -> None:
    vocabulary = build_word_level(CORPUS)
    assert [vocabulary.pad_id, vocabulary.bos_id, vocabulary.eos_id, vocabulary.unk_id] == [0, 1, 2, 3]
    vocabulary.save(tmp_path / "tokenizer.json")
    reloaded = Vocabulary.from_file(tmp_path / "tokenizer.json")
    for text in CORPUS:
        encoded = reloaded.encode_source(text)
        assert encoded.ids[-1] == reloaded.eos_id
        assert encoded.unknown_words == []
        assert reloaded.decode(encoded.ids) == text
    target = reloaded.encode_target("el perro grande")
    assert target[0] == reloaded.bos_id and target[-1] == reloaded.eos_id
    assert reloaded.decode(target) == "el perro grande"


def test_unknown_words_become_unk_and_are_reported() -> None:
    vocabulary = build_word_level(CORPUS)
    encoded = vocabulary.encode_source("the  Zebra sees  the xylophone")
    assert encoded.ids.count(vocabulary.unk_id) == 2
    assert encoded.unknown_words == ["Zebra", "xylophone"]
    assert encoded.tokens == ["the", "<unk>", "sees", "the", "<unk>", "</s>"]


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_input_is_a_clear_error(text: str) -> None:
    vocabulary = build_word_level(CORPUS)
    with pytest.raises(EmptyTextError, match="empty"):
        vocabulary.encode_source(text)


def test_bpe_round_trips_text_it_never_saw_whole() -> None:
    vocabulary = build_bpe(CORPUS * 20 + ["the cats see the dogs"] * 5, vocab_size=120, min_frequency=1)
    text = "the dogs see her"
    encoded = vocabulary.encode_source(text)
    assert vocabulary.decode(encoded.ids) == text


def test_tsv_reader_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.tsv"
    good.write_text("a b\tc d\n\ne f\tg\n")
    assert [(e.source, e.target) for e in read_tsv(good)] == [("a b", "c d"), ("e f", "g")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a b\tc d\nno tab here\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2"):
        read_tsv(bad)


def test_token_batches_respect_the_budget_and_cover_every_pair_once() -> None:
    rng = np.random.default_rng(0)
    pairs = [EncodedPair(rng.integers(4, 50, rng.integers(2, 40)), rng.integers(4, 50, rng.integers(3, 45)))
             for _ in range(2000)]
    batches = token_batches(pairs, max_tokens=600, pad_id=0, seed=1, epoch=0)
    assert all(b.src_ids.size <= 600 and b.tgt_ids.size <= 600 for b in batches)
    assert sum(len(b.src_ids) for b in batches) == len(pairs)
    # Bucketing: padding is a small share of the batch.
    real = sum(len(p.source) for p in pairs)
    padded = sum(b.src_ids.size for b in batches)
    assert real / padded > 0.8
    # A new epoch reshuffles; the same epoch is reproducible.
    again = token_batches(pairs, max_tokens=600, pad_id=0, seed=1, epoch=0)
    other = token_batches(pairs, max_tokens=600, pad_id=0, seed=1, epoch=1)
    assert all(np.array_equal(a.src_ids, b.src_ids) for a, b in zip(batches, again, strict=True))
    assert not all(np.array_equal(a.src_ids, b.src_ids) for a, b in zip(batches, other, strict=False))


def test_token_batches_split_evenly_across_ranks() -> None:
    pairs = [EncodedPair(np.arange(2, 2 + n % 17 + 2), np.arange(2, 2 + n % 13 + 3)) for n in range(999)]
    shards = [token_batches(pairs, 200, 0, seed=3, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1


def test_a_source_of_invisible_characters_is_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("the dog\tel perro\n\u200b\tla vaca\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.tsv:2: expected 'source<TAB>target'"):
        read_tsv(path)


@pytest.mark.parametrize("split", ["test", "user", "names", "long"])
def test_text_rules_round_trip_every_reference(split: str) -> None:
    """Model tokens of a reference, turned back into text against its source, give the reference again:
    training, evaluation and serving read and write text the same way."""
    english, spanish = lexicon_words()
    vocabulary = build_word_level([" ".join(sorted(english | spanish)), "1"], text_rules=True)
    assert vocabulary.text_rules
    for example in toy_split(split, 300):
        source = vocabulary.encode_source(example.source)
        ids = vocabulary.encode_target(example.target, source)
        assert vocabulary.unk_id not in ids and not source.unknown_words, example
        assert vocabulary.decode(ids, source) == example.target


def test_slot_renumbering_is_the_same_on_both_sides() -> None:
    examples = toy_split("names", 200)
    vocabulary = build_word_level(toy_model_texts(examples), text_rules=True)
    plain, shuffled = encode_examples(vocabulary, examples), encode_examples(vocabulary, examples, seed=3)
    slot_ids = {vocabulary.tokenizer.token_to_id(t) for t in SLOT_TOKENS}
    moved = 0
    for before, after in zip(plain, shuffled, strict=True):
        mapping: dict[int, int] = {}
        for row_before, row_after in ((before.source, after.source), (before.target, after.target)):
            for a, b in zip(row_before.tolist(), row_after.tolist(), strict=True):
                assert (a in slot_ids) == (b in slot_ids) and (a in slot_ids or a == b)
                assert mapping.setdefault(a, b) == b  # one renumbering per pair, on both sides
        moved += any(a != b for a, b in mapping.items())
    assert moved > 100
