"""The serving vocabulary alone (service.core.vocabulary): a corrupt tokenizer file, invisible characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.vocabulary import EmptyTextError, Vocabulary
from tests.conftest import DEFAULT_MODEL, DEFAULT_REPOSITORY


def test_corrupt_tokenizer_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Vocabulary.from_file(path)


def test_invisible_characters_are_dropped_but_joiners_stay() -> None:
    """Zero-width spaces, byte-order marks, soft hyphens and word joiners carry no letter; zero-width joiners
    do (inside emoji and Persian words), so they stay part of the word the user wrote."""
    vocabulary = Vocabulary.from_file(DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "tokenizer.json")
    pasted = "\ufeffthe d\u200bog\u2060 se\u00ades zqx"
    encoded = vocabulary.encode_source(pasted)
    assert encoded.tokens == ["the", "dog", "sees", "<unk>", "</s>"]
    assert encoded.pieces == ["the", "dog", "sees", "zqx", "</s>"] and encoded.unknown_words == ["zqx"]
    for word in ("\U0001f469\u200d\U0001f4bb", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"):
        assert vocabulary.encode_source(f"the {word}").unknown_words == [word]
    with pytest.raises(EmptyTextError):
        vocabulary.encode_source("\u200b \ufeff")
