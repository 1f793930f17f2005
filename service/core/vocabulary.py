"""Text <-> token ids for the model, shared by training, evaluation and serving (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


# Zero-width space, byte-order mark, soft hyphen, word joiner: they carry no letter of a word. Other invisible
# format characters do (zero-width joiners inside emoji and Persian words, tag characters) and stay.
INVISIBLE = str.maketrans("", "", "\u200b\ufeff\u00ad\u2060")


def without_invisible(text: str) -> str:
    return text.translate(INVISIBLE)


class EmptyTextError(ValueError):
    """Raised for a text with no words in it."""


@dataclass
class EncodedText:
    """A source text as the model sees it, with what the vocabulary could not represent."""

    ids: list[int]  # word ids followed by </s>
    tokens: list[str]  # vocabulary tokens, </s> included (unknown words show as <unk>)
    pieces: list[str]  # the text each token came from, as the user wrote it (</s> for the end)
    unknown_words: list[str] = field(default_factory=list)  # words that became <unk>, in order


class Vocabulary:
    """A Hugging Face tokenizer plus the special ids the model was trained with."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids
        self._special_ids = frozenset(ids)

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({error})") from error
        return cls(tokenizer)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_source(self, text: str) -> EncodedText:
        """Ids of a source text, </s> appended; raises EmptyTextError when nothing is left to translate.

        Invisible characters that only mark where a line may break (`without_invisible`) are dropped first:
        pasted into a word they would make it unknown, and alone they are no text."""
        text = without_invisible(text)  # the offsets below are into this text
        encoding = self.tokenizer.encode(text)
        if not encoding.ids:
            raise EmptyTextError("the text is empty: there is nothing to translate")
        pieces = [text[start:end] for start, end in encoding.offsets]
        ids = self._word_ids(encoding.ids)
        unknown = [piece for i, piece in zip(ids, pieces, strict=True) if i == self.unk_id]
        tokens = [UNK if i == self.unk_id else token for i, token in zip(ids, encoding.tokens, strict=True)]
        return EncodedText(
            ids=[*ids, self.eos_id],
            tokens=[*tokens, EOS],
            pieces=[*pieces, EOS],
            unknown_words=unknown,
        )

    def encode_target(self, text: str) -> list[int]:
        """Decoder ids of a reference: <s> words </s> (teacher forcing splits it into input and output)."""
        return [self.bos_id, *self._word_ids(self.tokenizer.encode(text).ids), self.eos_id]

    def _word_ids(self, ids: list[int]) -> list[int]:
        """A word of a text is never a special token: "<pad>" or "</s>" typed by a user is an unknown word
        (as a pad or end id it would shorten the source the model sees, and its attention columns with it)."""
        return [self.unk_id if i in self._special_ids else i for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids; special tokens other than <unk> are dropped."""
        return self.tokenizer.decode(
            [i for i in ids if i not in self._special_ids or i == self.unk_id], skip_special_tokens=False
        )

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or UNK

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.id_to_token(i) for i in ids]
