"""Text <-> token ids for the model, shared by training, evaluation and serving (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from service.core.text import NAME_SLOTS, SLOT_TOKENS, PreparedText, prepare_source, prepare_target, restore

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
    prepared: PreparedText | None = None  # the text rules' view (case, names, numbers); None without them


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
        # A vocabulary with name slots was trained on text as people type it (service.core.text): its model
        # reads lowercase tokens with names and numbers in slots, and answers get case and names back.
        self.text_rules = all(tokenizer.token_to_id(slot) is not None for slot in NAME_SLOTS)

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
        if self.text_rules:
            return self._encode_prepared(prepare_source(text, self.knows))
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

    def knows(self, word: str) -> bool:
        return self.tokenizer.token_to_id(word) is not None

    def _encode_prepared(self, prepared: PreparedText) -> EncodedText:
        if not prepared.tokens:
            raise EmptyTextError("the text is empty: there is nothing to translate")
        ids = [self._token_id(token, prepared) for token in prepared.tokens]
        unknown = [piece for i, piece in zip(ids, prepared.pieces, strict=True) if i == self.unk_id]
        return EncodedText(
            ids=[*ids, self.eos_id],
            tokens=[*(UNK if i == self.unk_id else t for i, t in zip(ids, prepared.tokens, strict=True)),
                    EOS],
            pieces=[*prepared.pieces, EOS],
            unknown_words=unknown,
            prepared=prepared,
        )

    def _token_id(self, token: str, prepared: PreparedText) -> int:
        """A slot's id only where the rules made one: "<name1>" or "</s>" typed by a user is an unknown
        word."""
        token_id = self.tokenizer.token_to_id(token)
        invented = token in SLOT_TOKENS and token not in prepared.slots
        if token_id is None or token_id in self._special_ids or invented:
            return self.unk_id
        return token_id

    def encode_target(self, text: str, source: EncodedText | None = None) -> list[int]:
        """Decoder ids of a reference: <s> words </s> (teacher forcing splits it into input and output).

        With text rules, the source's names and numbers become its slots in the target too."""
        if self.text_rules:
            prepared = source.prepared if source is not None and source.prepared is not None else None
            prepared = prepared or PreparedText([], [])
            tokens = prepare_target(without_invisible(text), prepared)
            return [self.bos_id, *(self._token_id(t, prepared) for t in tokens), self.eos_id]
        return [self.bos_id, *self._word_ids(self.tokenizer.encode(text).ids), self.eos_id]

    def _word_ids(self, ids: list[int]) -> list[int]:
        """A word of a text is never a special token: "<pad>" or "</s>" typed by a user is an unknown word
        (as a pad or end id it would shorten the source the model sees, and its attention columns with it)."""
        return [self.unk_id if i in self._special_ids else i for i in ids]

    def decode(
        self, ids: list[int], source: EncodedText | None = None, words: list[str] | None = None
    ) -> str:
        """Text of generated ids; special tokens other than <unk> are dropped.

        With text rules and the `source` the ids answer, slots become the source's names and numbers and
        case comes from the source; `words` (one per id) replaces the tokens, e.g. <unk> by a source word."""
        kept = [index for index, i in enumerate(ids) if i not in self._special_ids or i == self.unk_id]
        if self.text_rules and source is not None and source.prepared is not None:
            tokens = [words[index] if words is not None else self.id_to_token(ids[index]) for index in kept]
            return restore(tokens, source.prepared)
        if words is not None:
            return " ".join(word for word in (words[index] for index in kept) if word)
        return self.tokenizer.decode([ids[index] for index in kept], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or UNK

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.id_to_token(i) for i in ids]
