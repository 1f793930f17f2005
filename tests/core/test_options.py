"""The rules every layer reads from service.core.options: the length rule and which requests may share a
search or join a running batch."""

from __future__ import annotations

import pytest

from service.core.options import ATTENTION_KINDS, TranslateOptions, max_steps


@pytest.mark.parametrize(
    ("source_length", "requested", "limit", "expected"),
    [
        (5, None, 256, 20),  # 2 x 5 + 10
        (1, None, 256, 12),
        (200, None, 256, 256),  # capped by the limit
        (5, 7, 256, 7),  # the caller's max_length replaces the automatic one
        (5, 300, 256, 256),  # and is capped too
        (5, None, 0, 1),  # never below one step
    ],
)
def test_the_length_rule(source_length: int, requested: int | None, limit: int, expected: int) -> None:
    assert max_steps(source_length, requested, limit) == expected


def test_only_greedy_requests_without_attention_join_a_running_batch() -> None:
    assert TranslateOptions().joins_running_batch
    assert TranslateOptions(max_length=5, length_penalty=0.5).joins_running_batch
    assert not TranslateOptions(beam_size=2).joins_running_batch
    assert not TranslateOptions(replace_unknowns=True).joins_running_batch
    for kind in ATTENTION_KINDS:
        assert not TranslateOptions(attention=frozenset({kind})).joins_running_batch


def test_sentences_share_a_search_only_with_the_same_search_options() -> None:
    assert TranslateOptions(max_length=5).search_key() == TranslateOptions(max_length=9).search_key()
    assert TranslateOptions().search_key() != TranslateOptions(beam_size=4).search_key()
    assert TranslateOptions().search_key() != TranslateOptions(length_penalty=0.6).search_key()
    cross = TranslateOptions(attention=frozenset({"cross"}))
    unknowns = TranslateOptions(replace_unknowns=True)
    assert cross.search_key() == unknowns.search_key() != TranslateOptions().search_key()


def test_options_refuse_what_no_search_can_do() -> None:
    with pytest.raises(ValueError, match="unknown attention kinds"):
        TranslateOptions(attention=frozenset({"sideways"}))
    with pytest.raises(ValueError, match="beam_size"):
        TranslateOptions(beam_size=0)
    with pytest.raises(ValueError, match="max_length"):
        TranslateOptions(max_length=0)
