"""The messages between the engine and its lane processes (pickled over a socket pair), one class each.

Parent to lane: `Load` once, then `Search` (and `Abandon` while it runs), or a running batch: `OpenBatch`,
then `Join` and `Step` until `CloseBatch`; `Stop` at the end.
Lane to parent: `Ready` (or `Failed`) once; per search each step's `Tokens` (when asked for) and the rows'
`Done` messages, then `SearchEnd` or `Failed`; per `Join` a `Joined`, per `Step` its `Tokens` and the rows'
`Done` messages, then `Stepped`. A step's tokens always come before its rows' `Done`.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.core.model_format import ModelVersion
from service.core.options import TranslateOptions
from service.core.search import Hypothesis

# How often a running search hears of abandoned rows: the parent tells a lane at most this often, and a lane
# looks at its socket at most this often (each look is a system call).
ABANDON_POLL_S = 0.002

# -- parent to lane ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    model: ModelVersion
    device: str  # "cpu", "cuda" or "auto" (the lane reports what it got in `Ready`)
    threads: int
    spinning: bool
    io_binding: bool | None
    step_graph: str = "dynamic"


@dataclass(frozen=True, slots=True)
class Search:
    sources: list[list[int]]
    options: TranslateOptions
    max_length_limit: int
    token_rows: list[int]  # the rows whose tokens the parent wants as they come
    abandoned: list[int]  # rows given up before the search started: none of them takes a step


@dataclass(frozen=True, slots=True)
class Abandon:
    rows: list[int]


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class OpenBatch:
    """Start a running batch (iteration-level batching) with these options."""

    options: TranslateOptions


@dataclass(frozen=True, slots=True)
class Join:
    rows: list[int]
    sources: list[list[int]]
    max_lengths: list[int]
    token_rows: list[int]  # the rows whose tokens the parent wants as they come


@dataclass(frozen=True, slots=True)
class Step:
    abandoned: list[int]  # rows dropped before this step; the lane never answers for them


@dataclass(frozen=True, slots=True)
class CloseBatch:
    pass


# -- lane to parent ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    provider: str
    io_binding: bool


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class Tokens:
    """One step's new tokens of the rows whose tokens the parent wants (one message per step, not per row:
    pickling a message costs microseconds of each side's interpreter)."""

    rows: list[int]
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class Done:
    row: int
    hypothesis: Hypothesis


@dataclass(frozen=True, slots=True)
class SearchEnd:
    encode_s: float
    decode_s: float


@dataclass(frozen=True, slots=True)
class Joined:
    encode_s: float


@dataclass(frozen=True, slots=True)
class Stepped:
    running: int
    decode_s: float
