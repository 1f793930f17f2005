"""Text as people type it <-> the tokens the model reads and writes.

One set of rules, used by the training data, the reference's surface forms, evaluation, the engine and the
server, so that none of them can disagree:

* Words and the marks `. , ! ? ¿ ¡` are separate tokens; an apostrophe inside a word stays ("don't"), and the
  curly apostrophe is the straight one.
* The model reads and writes lowercase. Case comes back from the source, sentence by sentence: an answer's
  sentence starts with a capital when the source's sentence does, and is in capitals when the source's is.
* The model writes no `¿ ¡`: a sentence of the answer that ends with `?` or `!` gets its opening mark here.
  Where it goes is decided by how the sentence ends, which the model would have to foresee from its start.
* Names and numbers are copied, not translated: a capitalised word the model's vocabulary does not know, and
  a number written in digits (other than "1", which the grammar treats as a word), become slot tokens
  (`<name1>`, `<num1>`, ...), numbered by first appearance in the text. The model copies slots; the answer
  puts the text back. A text with more names or numbers than slots keeps the rest as (unknown) words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

MARKS = frozenset(".,!?¿¡")
SENTENCE_ENDS = frozenset(".!?")
OPENING_MARKS = frozenset("¿¡")
OPENING = {"?": "¿", "!": "¡"}  # the opening mark of a sentence that ends with the key
SLOTS_PER_KIND = 8
NAME_SLOTS = tuple(f"<name{i}>" for i in range(1, SLOTS_PER_KIND + 1))
NUMBER_SLOTS = tuple(f"<num{i}>" for i in range(1, SLOTS_PER_KIND + 1))
SLOT_TOKENS = frozenset(NAME_SLOTS + NUMBER_SLOTS)
# Digits that the grammar reads as a word: "1" decides singular agreement, so it is not a slot.
LITERAL_NUMBERS = frozenset({"1"})

_TOKEN = re.compile(r"[.,!?¿¡]|[^\s.,!?¿¡]+")
_DIGITS = re.compile(r"[0-9]+")


class Case(Enum):
    LOWER = "lower"  # as the model writes it
    CAPITAL = "capital"  # first letter of the sentence upper case
    UPPER = "upper"  # every letter upper case


def split_words(text: str) -> list[str]:
    """Words and marks, as typed."""
    return _TOKEN.findall(text)


def normal_word(word: str) -> str:
    """The form the vocabulary holds: NFKC (full-width letters are letters), lowercase, straight
    apostrophe."""
    if word.isascii():  # NFKC leaves ASCII as it is, and ASCII has no curly apostrophe
        return word.lower()
    return unicodedata.normalize("NFKC", word).replace("\u2019", "'").lower()


def is_number(word: str) -> bool:
    return _DIGITS.fullmatch(word) is not None


def is_name(word: str, known: Callable[[str], bool]) -> bool:
    """A capitalised word the vocabulary does not know ("Maria", "MARIA"); "The" and "I" are words."""
    return word[:1].isupper() and not known(normal_word(word))


def sentence_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) of each sentence: a sentence ends after `.`, `!` or `?` (several marks stay together)."""
    spans, start = [], 0
    for index, token in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token in SENTENCE_ENDS and following not in SENTENCE_ENDS:
            spans.append((start, index + 1))
            start = index + 1
    if start < len(tokens):
        spans.append((start, len(tokens)))
    return spans


def sentence_case(words: Sequence[str]) -> Case:
    """How a sentence (its tokens as typed) is written: capitals throughout need two letters or more in it."""
    lettered = [w for w in words if w.isalpha() or any(map(str.isalpha, w))]
    if not lettered:
        return Case.LOWER
    letters = "".join(filter(str.isalpha, "".join(lettered)))  # some cased characters are not letters (Ⓐ)
    if len(letters) >= 2 and letters.isupper():
        return Case.UPPER
    return Case.CAPITAL if lettered[0][:1].isupper() else Case.LOWER


def apply_case(words: Sequence[str], case: Case, keep: Callable[[int], bool] = lambda _: False) -> list[str]:
    """One sentence's words in `case`; words for which `keep(index)` holds (copied names) stay as they are."""
    out = list(words)
    if case is Case.UPPER:
        return [w if keep(i) else w.upper() for i, w in enumerate(out)]
    if case is Case.CAPITAL:
        for index, word in enumerate(out):
            if any(c.isalpha() for c in word):
                if not keep(index):
                    out[index] = word[:1].upper() + word[1:]
                break
    return out


def join_tokens(tokens: Sequence[str]) -> str:
    """Tokens as written: no space before `. , ! ?`, none after `¿ ¡`."""
    out: list[str] = []
    glue = True
    for token in tokens:
        if not token:
            continue
        if out and not glue and not (token in MARKS and token not in OPENING_MARKS):
            out.append(" ")
        out.append(token)
        glue = token in OPENING_MARKS
    return "".join(out)


@dataclass
class PreparedText:
    """A source text as the model reads it."""

    tokens: list[str]  # model tokens: lowercase words, marks, slots
    pieces: list[str]  # the text each token came from, as typed
    slots: dict[str, str] = field(default_factory=dict)  # slot token -> the name or number it stands for
    cases: list[Case] = field(default_factory=list)  # one per sentence of the source


def prepare_source(text: str, known: Callable[[str], bool]) -> PreparedText:
    """Model tokens of a text; `known(word)` says whether the vocabulary holds a (normal) word."""
    typed = split_words(text)
    tokens: list[str] = []
    slots: dict[str, str] = {}
    by_text: dict[str, str] = {}
    free = {"name": list(NAME_SLOTS), "num": list(NUMBER_SLOTS)}
    for word in typed:
        kind = None
        if word in MARKS:
            tokens.append(word)
            continue
        if is_number(word) and word not in LITERAL_NUMBERS:
            kind = "num"
        elif is_name(word, known):
            kind = "name"
        slot = by_text.get(word)
        if kind is not None and slot is None and free[kind]:
            slot = free[kind].pop(0)
            by_text[word] = slot
            slots[slot] = word
        tokens.append(slot if kind is not None and slot is not None else normal_word(word))
    cases = [sentence_case(typed[start:end]) for start, end in sentence_spans(typed)]
    return PreparedText(tokens, typed, slots, cases)


def prepare_target(text: str, source: PreparedText) -> list[str]:
    """Model tokens of a reference translation: the source's names and numbers become its slots, and opening
    marks are left to `restore`."""
    by_text = {value: slot for slot, value in source.slots.items()}
    return [by_text.get(word, normal_word(word)) for word in split_words(text) if word not in OPENING_MARKS]


def model_target_positions(text: str) -> list[int]:
    """Which tokens of a reference translation the model writes (all but the opening marks), by index."""
    return [index for index, word in enumerate(split_words(text)) if word not in OPENING_MARKS]


def restore(words: Sequence[str], source: PreparedText) -> str:
    """The answer's text from the model's output tokens: slots filled, case from the source, marks glued.

    A slot the source does not have (the model invented it) is dropped rather than shown as `<name3>`."""
    filled = [source.slots.get(word, "" if word in SLOT_TOKENS else word) for word in words]
    copied = [word in source.slots for word in words]
    out: list[str] = []
    for number, (start, end) in enumerate(sentence_spans(filled)):
        case = source.cases[min(number, len(source.cases) - 1)] if source.cases else Case.LOWER
        sentence = apply_case(filled[start:end], case, keep=lambda i, start=start: copied[start + i])
        opening = OPENING.get(sentence[-1]) if sentence else None
        if opening is not None and sentence[0] not in OPENING_MARKS:
            sentence.insert(0, opening)
        out.extend(sentence)
    return join_tokens(out)
