from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from bench import cli as bench
from bench.ctranslate2_convert import convert_to_ctranslate2, source_tokens
from bench.engine import ENGINES, Batch, first_difference, load_translator, main, make_batches
from model.checkpoint import load_model
from model.decoding import translate_ids
from service.core.options import TranslateOptions
from service.engine.backend import encoder_groups
from service.engine.engine import Engine
from tests.support.texts import sentences


@pytest.fixture(scope="module")
def ct2_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_to_ctranslate2(tiny_checkpoint, tmp_path_factory.mktemp("ct2") / "tiny")


def ct2_greedy(translator, vocabulary, sources: list[list[int]], max_length: int) -> list[list[int]]:
    results = translator.translate_batch([source_tokens(vocabulary, ids) for ids in sources], beam_size=1,
                                         max_decoding_length=max_length, min_decoding_length=0,
                                         suppress_sequences=[["<pad>"], ["<s>"]])
    return [[vocabulary.tokenizer.token_to_id(t) for t in r.hypotheses[0]] for r in results]


@pytest.mark.parametrize("cap", [None, 6])
def test_ctranslate2_conversion_decodes_our_greedy_tokens(each_tiny_model: tuple[Path, Path], tmp_path: Path,
                                                           cap: int | None) -> None:
    """Token for token against PyTorch and our engine, one cap per batch, for absolute and relative
    positions; the random tiny model mostly runs to the cap, so finished and cut-off hypotheses are both
    compared (cap 6 cuts nearly everything)."""
    tiny_checkpoint, tiny_repository = each_tiny_model
    model, vocabulary, _ = load_model(tiny_checkpoint)
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    translator = load_translator(convert_to_ctranslate2(tiny_checkpoint, tmp_path / "ct2"), threads=1,
                                 compute_type="float32")
    sources = [vocabulary.encode_source(text).ids for text in sentences(24, seed=5, longest=14)]
    for start in range(0, len(sources), 8):
        batch = sources[start:start + 8]
        max_length = cap or 2 * max(map(len, batch)) + 10
        ours = [h.tokens for h in engine.search_ids(batch, TranslateOptions(max_length=max_length))]
        assert [h.tokens for h in translate_ids(model, batch, max_length=max_length)] == ours
        assert ct2_greedy(translator, vocabulary, batch, max_length) == ours
        assert max(len(t) for t in ours) == max_length  # the cap itself was exercised


def test_batches_carry_our_engines_per_sentence_caps() -> None:
    batches = make_batches([[5, 2], [5, 6, 7, 2], [4] * 200 + [2]], 2, max_positions=512)
    assert [b.max_lengths for b in batches] == [[14, 18], [256]]
    assert isinstance(batches[0], Batch) and len(batches[1].ids) == 1


def test_conversion_records_the_layer_norm_epsilon(ct2_model: Path) -> None:
    summary = json.loads((ct2_model / "translator_conversion.json").read_text())
    epsilon = summary["layer_norm_epsilon"]
    assert epsilon["ours"] == epsilon["ctranslate2_default"] == 1e-5
    config = json.loads((ct2_model / "config.json").read_text())
    assert config["layer_norm_epsilon"] == 1e-5 and config["add_source_eos"] is False


def test_encoder_groups_partition_rows_at_least_cost() -> None:
    lengths = np.array([3, 30, 3, 4, 29, 12, 3, 30])
    groups = encoder_groups(lengths, run_cost=8)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    spans = [(lengths[g].min(), lengths[g].max()) for g in groups]
    assert spans == sorted(spans) and all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert [sorted(lengths[g].tolist()) for g in groups] == [[3, 3, 3, 4], [12], [29, 30, 30]]
    assert len(encoder_groups(lengths, run_cost=1000)) == 1  # a run costing more than all padding
    assert len(encoder_groups(np.array([7, 7, 7]))) == 1


def test_grouped_encoder_changes_nothing_but_speed(tiny_repository: Path) -> None:
    """The CPU engine runs the encoder per group of similar lengths; tokens, scores and every attention map
    must be those of one whole-batch run."""
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    assert engine.runner.backend.group_encoder_by_length
    texts = sentences(48, seed=11, longest=14)  # 1 to 14 words: several groups
    sources = [engine.vocabulary.encode_source(text).ids for text in texts]
    assert len(encoder_groups(np.array([len(s) for s in sources]))) > 1
    options = TranslateOptions(max_length=12, attention=frozenset({"cross", "decoder_self", "encoder_self"}))
    grouped = engine.search_ids(sources, options)
    engine.runner.backend.group_encoder_by_length = False
    whole = engine.search_ids(sources, options)
    for a, b in zip(grouped, whole, strict=True):
        assert a is not None and b is not None
        assert a.tokens == b.tokens and a.score == pytest.approx(b.score, abs=1e-6)
        for name in ("cross_attention", "self_attention", "encoder_attention"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-6)


def test_first_difference_names_the_sentence_and_token() -> None:
    count, example = first_difference([[5, 6, 7], [8]], [[5, 6, 9], [8]], [[1, 2], [3, 2]], str)
    assert count == 1 and example is not None
    assert example["sentence"] == 0 and example["first_differing_token"] == 2
    assert first_difference([[5]], [[5]], [[1, 2]], str) == (0, None)


def test_bench_runs_end_to_end(tiny_checkpoint: Path, tiny_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    main(["--checkpoint", str(tiny_checkpoint), "--repository", str(tiny_repository), "--model", "tiny",
          "--batch-sizes", "1,4", "--sentences", "6", "--rounds", "1", "--min-seconds", "0", "--threads", "1",
          "--parity-sentences", "9", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(ENGINES)
    for engine in ENGINES:
        for size in ("1", "4"):
            entry = report["results"][engine][size]
            assert entry["sentences_per_s"] > 0 and entry["tokens_per_s"] > 0
    for engine, parity in report["parity"].items():
        assert parity["compared"] == 9
        if parity["enforced"]:
            assert parity["mismatches"] == 0, (engine, parity["first_difference"])
    assert not report["parity"]["ours_int8"]["enforced"]
    # Quality against the test split's references: the untrained tiny model translates nothing right.
    for engine in ENGINES:
        quality = report["quality"][engine]
        assert quality["pairs"] == 9 and quality["exact_match"] == 0.0 and 0 <= quality["bleu"] < 5
    for size in ("1", "4"):
        ratios = report["ratios"][size]
        assert set(ratios) >= {"ours/best ct2_f32", "ours/ct2_f32", "ours/ct2_f32_workers",
                               "ours/torch_nocache", "ours/torch_cache", "attention_on/off",
                               "ours_int8/ct2_int8", "ours_int8/ct2_int8_workers", "ours_int8/best ct2_int8",
                               "ours_int8/best ct2_f32"}
        assert all(value > 0 for value in ratios.values())
        # The target ratio is against the faster CTranslate2 float32 configuration.
        assert ratios["ours/best ct2_f32"] == pytest.approx(min(ratios["ours/ct2_f32"],
                                                                ratios["ours/ct2_f32_workers"]))
        assert ratios["ours_int8/best ct2_int8"] == pytest.approx(min(ratios["ours_int8/ct2_int8"],
                                                                      ratios["ours_int8/ct2_int8_workers"]))
    machine = report["machine"]
    assert machine["threads"] == 1 and machine["cpu_model"]
    assert set(machine["versions"]) >= {"onnxruntime", "ctranslate2", "torch"}
    assert len(report["rounds"]) == len(ENGINES)


def test_bench_dispatches_load_to_service_bench_load(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("bench.load")
    fake.__spec__ = importlib.machinery.ModuleSpec("bench.load", None)
    fake.main = calls.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.load", fake)
    bench.main(["load", "--rate", "5", "-h"])
    assert calls == [["--rate", "5", "-h"]]


def test_bench_load_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_available", lambda module: module != "bench.load")
    with pytest.raises(SystemExit) as raised:
        bench.main(["load"])
    assert raised.value.code == 2
