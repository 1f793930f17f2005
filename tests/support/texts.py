"""Random sentences made of the tiny test model's words (tests.conftest.WORDS)."""

from __future__ import annotations

import random

from tests.conftest import WORDS


def sentences(count: int, seed: int = 0, longest: int = 10) -> list[str]:
    """`count` sentences of 1 to `longest` words, the same ones for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(count)]
