"""Building the joint source/target tokenizer: word-level for the toy language, BPE for user corpora."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from service.core.text import MARKS, NAME_SLOTS, NUMBER_SLOTS
from service.core.vocabulary import SPECIAL_TOKENS, UNK, Vocabulary


def build_word_level(texts: Iterable[str], min_frequency: int = 1, *, text_rules: bool = False) -> Vocabulary:
    """One id per whitespace-separated word; words are ordered by frequency so ids are stable for a corpus.

    `text_rules`: the texts are model tokens of service.core.text (lowercase, marks, slots), and every slot
    and mark gets an id whether the texts hold it or not: the vocabulary then turns the text rules on."""
    counts = Counter(word for text in texts for word in text.split())
    words = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
    if text_rules:
        words += [token for token in (*sorted(MARKS), *NAME_SLOTS, *NUMBER_SLOTS) if token not in counts]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return Vocabulary(tokenizer)


def build_bpe(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> Vocabulary:
    """Subwords for open-vocabulary corpora; Metaspace keeps word boundaries so decoding restores spaces."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return Vocabulary(tokenizer)
