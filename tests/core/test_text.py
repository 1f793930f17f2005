"""The text rules shared by training, evaluation, the engine and the server (service.core.text)."""

from __future__ import annotations

import pytest

from service.core.text import (
    Case,
    join_tokens,
    normal_word,
    prepare_source,
    prepare_target,
    restore,
    sentence_case,
    sentence_spans,
    split_words,
)

LEXICON = {"the", "dog", "sees", "i", "see", "her", "runs", "and", "but", "1", "dogs", "don't", "el", "perro"}


def known(word: str) -> bool:
    return word in LEXICON


def test_tokens_separate_marks_and_keep_apostrophes() -> None:
    text = "¿The dog, Maria's dog, doesn’t run?! Then..."
    words = split_words(text)
    assert words == ["¿", "The", "dog", ",", "Maria's", "dog", ",", "doesn’t", "run", "?", "!", "Then",
                     ".", ".", "."]
    assert join_tokens(words) == "¿The dog, Maria's dog, doesn’t run?! Then..."
    assert sentence_spans(["a", "b", "?", "!", "c", ".", "d"]) == [(0, 4), (4, 6), (6, 7)]


@pytest.mark.parametrize(("words", "case"), [
    (["The", "dog", "."], Case.CAPITAL),
    (["the", "Dog"], Case.LOWER),
    (["THE", "DOG", "RUNS", "."], Case.UPPER),
    (["I", "see", "her"], Case.CAPITAL),
    (["I"], Case.CAPITAL),  # one letter is no evidence of capitals throughout
    (["3", "."], Case.LOWER),
    # Cased characters that are not letters (circled letters, Roman numerals, the iota subscript) do not
    # decide anything: only letters do.
    (["HOLAⓐ"], Case.UPPER),
    (["HOLA\u0345"], Case.UPPER),
    (["É", "Ⓐ"], Case.CAPITAL),
])
def test_sentence_case(words: list[str], case: Case) -> None:
    assert sentence_case(words) is case


@pytest.mark.parametrize(("word", "normal"), [
    ("Dog", "dog"),
    ("DON'T", "don't"),
    ("Doesn\u2019t", "doesn't"),  # curly apostrophe
    ("ＤＯＧ", "dog"),  # full-width letters are letters
    ("Ärger", "ärger"),
    ("ﬁsh", "fish"),  # a ligature NFKC splits
])
def test_normal_word(word: str, normal: str) -> None:
    assert normal_word(word) == normal


def test_names_and_numbers_become_slots_numbered_by_first_appearance() -> None:
    prepared = prepare_source("Maria sees 12 dogs and John, and Maria sees 1 dog. THE DOG SEES ZOE", known)
    assert prepared.tokens == ["<name1>", "sees", "<num1>", "dogs", "and", "<name2>", ",", "and", "<name1>",
                               "sees", "1", "dog", ".", "the", "dog", "sees", "<name3>"]
    assert prepared.slots == {"<name1>": "Maria", "<num1>": "12", "<name2>": "John", "<name3>": "ZOE"}
    assert prepared.cases == [Case.CAPITAL, Case.UPPER]
    # lowercase unknown words and known capitalised words are words, not names
    assert prepare_source("The zorblax sees Dog", known).tokens == ["the", "zorblax", "sees", "dog"]
    # full-width letters are letters; a slot typed by the user is only a word
    assert prepare_source("ｔｈｅ ｄｏｇ ｓｅｅｓ", known).tokens == ["the", "dog", "sees"]
    assert prepare_source("<name1> sees", known).slots == {}


def test_slots_run_out_gracefully() -> None:
    text = " ".join(f"Name{chr(65 + i)}" for i in range(10))
    prepared = prepare_source(text, known)
    assert prepared.tokens[:8] == [f"<name{i}>" for i in range(1, 9)]
    assert prepared.tokens[8:] == ["namei", "namej"]  # unknown words from here on


def test_restore_fills_slots_and_takes_case_from_each_source_sentence() -> None:
    source = prepare_source("Maria sees 12 dogs? the dog runs. THE DOG SEES ZOE!", known)
    target = prepare_target("¿Maria ve 12 perros? el perro corre. ¡EL PERRO VE ZOE!", source)
    # the model writes no opening marks: restore puts them where the sentence's end says
    assert target == ["<name1>", "ve", "<num1>", "perros", "?", "el", "perro", "corre", ".", "el",
                      "perro", "ve", "<name2>", "!"]
    assert restore(target, source) == "¿Maria ve 12 perros? el perro corre. ¡EL PERRO VE ZOE!"
    # a slot the source lacks is dropped, not shown; names keep their case in a capitalised sentence
    source = prepare_source("maria sees. Zoe sees", known)
    assert restore(["<name1>", "ve", "<name7>", "."], source) == "Zoe ve."
    assert restore(["zoe", "ve"], prepare_source("Zoe sees", known)) == "Zoe ve"
    assert restore(["<name1>", "ve"], prepare_source("the dog sees van", known)) == "ve"
