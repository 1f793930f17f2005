"""Texts near the longest training length, for `translator-eval --tsv`: how a model does on the sentences
just inside what it was trained on (the `test` split holds only 17 of 31-40 tokens).

    .venv/bin/python docs/experiments/near_limit_texts.py --out /tmp/near.tsv [--split test] [--count 300]
    .venv/bin/translator-eval --checkpoint checkpoints/toy-en-es --tsv /tmp/near.tsv

`count` texts of 31-40 tokens (words and marks) drawn from a split's sampler (`test`: plain and user-typed
text, names and numbers; `user`; `names`: names and numbers absent from training) with their reference
translations; texts of the held-out splits are left out.
"""

from __future__ import annotations

import argparse
import random

from model.toy_language import (
    _SPLIT_SAMPLERS,
    DEFAULT_SPLIT_SIZES,
    TRAIN_MAX_WORDS,
    _held_out_sources,
    _sample,
)
from service.core.text import split_words

SHORTEST = 31


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--split", choices=("test", "user", "names"), default="test")
    args = parser.parse_args()
    held_out = set().union(*(_held_out_sources(name) for name in DEFAULT_SPLIT_SIZES if name != "train"))
    rng = random.Random(args.seed)
    kept: dict[str, str] = {}
    drawn = 0
    while len(kept) < args.count:
        pair = _sample(rng, _SPLIT_SAMPLERS[args.split])
        drawn += 1
        if SHORTEST <= len(split_words(pair.source)) <= TRAIN_MAX_WORDS and pair.source not in held_out:
            kept.setdefault(pair.source, pair.target)
    with open(args.out, "w", encoding="utf-8") as file:
        file.writelines(f"{source}\t{target}\n" for source, target in kept.items())
    print(f"{len(kept)} texts of {SHORTEST}-{TRAIN_MAX_WORDS} tokens (of {drawn} drawn) -> {args.out}")


if __name__ == "__main__":
    main()
