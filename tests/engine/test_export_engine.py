from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.checkpoint import load_model
from model.decoding import translate_ids
from service.core.model_format import (
    MODEL_FORMAT,
    ModelLoadError,
    decoder_inputs,
    decoder_outputs,
    encoder_outputs,
    resolve,
    select_inputs,
    select_outputs,
)
from service.core.options import ATTENTION_KINDS, TranslateOptions
from service.core.postprocess import replace_unknowns
from service.core.search import Hypothesis
from service.engine.backend import DecoderState
from service.engine.engine import Engine
from tests.conftest import DEFAULT_REPOSITORY, ROOT
from tests.support.texts import sentences


def test_repository_layout_and_checker(tiny_repository: Path) -> None:
    folder = tiny_repository / "tiny" / "1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "decoder.float16.onnx",
        "decoder.int8.onnx",
        "decoder.onnx",
        "decoder_fixed.onnx",
        "encoder.float16.onnx",
        "encoder.int8.onnx",
        "encoder.onnx",
        "model.json",
        "select.onnx",
        "tokenizer.json",
    ]
    for graph in ("encoder.onnx", "decoder.onnx", "select.onnx"):
        onnx.checker.check_model(onnx.load(str(folder / graph)), full_check=True)
    # select.onnx is written node by node: it must carry the IR version of the exporter's graphs (the onnx
    # package's newest is newer than what released onnxruntime versions load).
    graphs = ("encoder.onnx", "decoder.onnx", "select.onnx")
    assert len({onnx.load(str(folder / g)).ir_version for g in graphs}) == 1
    description = json.loads((folder / "model.json").read_text())
    assert description["vocabulary_size"]["source"] == description["architecture"]["src_vocab_size"]
    assert set(description["checksums"]) == {
        "encoder.onnx", "decoder.onnx", "select.onnx", "tokenizer.json", "encoder.int8.onnx",
        "decoder.int8.onnx", "encoder.float16.onnx", "decoder.float16.onnx", "decoder_fixed.onnx",
    }
    assert description["format"] == MODEL_FORMAT
    # The longest training source (the server flags longer texts): this checkpoint has no training record.
    assert description["training"]["max_source_tokens"] is None
    architecture = description["architecture"]
    layers = architecture["n_decoder_layers"]
    assert description["graphs"]["decoder"]["inputs"] == list(decoder_inputs(layers))
    assert description["graphs"]["decoder"]["outputs"] == list(decoder_outputs(layers))
    assert description["graphs"]["encoder"]["outputs"] == list(
        encoder_outputs(architecture["n_encoder_layers"], layers)
    )
    assert description["graphs"]["select"]["inputs"] == list(select_inputs(layers))
    assert description["graphs"]["select"]["outputs"] == list(select_outputs(layers))


def test_graphs_match_pytorch_logits_and_attention(each_tiny_model: tuple[Path, Path]) -> None:
    tiny_checkpoint, tiny_repository = each_tiny_model
    model, vocabulary, _ = load_model(tiny_checkpoint)
    config = model.config
    layers = config.n_decoder_layers
    folder = tiny_repository / "tiny" / "1"
    encoder = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in decoder.get_inputs()] == list(decoder_inputs(layers))
    assert [o.name for o in decoder.get_outputs()] == list(decoder_outputs(layers))
    assert [o.name for o in encoder.get_outputs()] == list(encoder_outputs(config.n_encoder_layers, layers))
    rng = np.random.default_rng(0)
    src = rng.integers(4, vocabulary.size, (3, 9))
    src[1, 6:] = vocabulary.pad_id
    src_t = torch.from_numpy(src)
    with torch.inference_mode():
        memory, encoder_attention = model.encode(src_t)
        cross_key, cross_value = model.cross_keys_values(memory)
        names = [o.name for o in encoder.get_outputs()]
        feeds = {"src_ids": src, "src_padding_mask": src == vocabulary.pad_id}
        encoded = dict(zip(names, encoder.run(None, feeds), strict=True))
        np.testing.assert_allclose(encoded["memory"], memory.numpy(), atol=1e-4)
        for i in range(layers):
            np.testing.assert_allclose(encoded[f"cross_key.{i}"], cross_key[i].numpy(), atol=1e-4)
            np.testing.assert_allclose(encoded[f"cross_value.{i}"], cross_value[i].numpy(), atol=1e-4)
        for i in range(config.n_encoder_layers):
            np.testing.assert_allclose(
                encoded[f"encoder_attention.{i}"], encoder_attention[i].numpy(), atol=1e-5
            )
        key, value = model.empty_cache(3)
        past = {}
        for i in range(layers):
            past[f"past_self_key.{i}"], past[f"past_self_value.{i}"] = key[i].numpy(), value[i].numpy()
        padding = src_t == vocabulary.pad_id
        for step in range(6):  # past lengths 0..5: the empty past of the first step included
            tokens = rng.integers(4, vocabulary.size, 3)
            log_probs, key, value, cross, self_attention = model.decode_step(
                torch.from_numpy(tokens), key, value, cross_key, cross_value, padding
            )
            feeds = {"tokens": tokens, "src_padding_mask": padding.numpy(), "positions": np.full(3, step)}
            feeds.update(past)
            feeds.update({name: encoded[name] for name in encoded if name.startswith("cross_")})
            out = dict(zip(decoder_outputs(layers), decoder.run(None, feeds), strict=True))
            np.testing.assert_allclose(out["log_probs"], log_probs.numpy(), atol=1e-4, err_msg=f"step {step}")
            for i in range(layers):
                np.testing.assert_allclose(out[f"present_self_key.{i}"], key[i].numpy(), atol=1e-4)
                np.testing.assert_allclose(out[f"present_self_value.{i}"], value[i].numpy(), atol=1e-4)
                np.testing.assert_allclose(out[f"cross_attention.{i}"], cross[i].numpy(), atol=1e-5)
                np.testing.assert_allclose(out[f"self_attention.{i}"], self_attention[i].numpy(), atol=1e-5)
                assert out[f"present_self_key.{i}"].shape[2] == step + 1
                past[f"past_self_key.{i}"] = out[f"present_self_key.{i}"]
                past[f"past_self_value.{i}"] = out[f"present_self_value.{i}"]


def test_a_row_joining_a_running_batch_decodes_as_alone(each_tiny_model: tuple[Path, Path]) -> None:
    """Iteration-level batching: a row whose cache is left-padded to the batch's length (positions input)
    gets, in the graph, the log-probs and attention it gets decoded alone from the first step."""
    tiny_checkpoint, tiny_repository = each_tiny_model
    model, vocabulary, _ = load_model(tiny_checkpoint)
    layers = model.config.n_decoder_layers
    decoder = ort.InferenceSession(
        str(tiny_repository / "tiny" / "1" / "decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(5)
    src = rng.integers(4, vocabulary.size, (2, 7))
    src[1, 4:] = vocabulary.pad_id  # the joining row has a shorter source
    padding = torch.from_numpy(src == vocabulary.pad_id)
    tokens = rng.integers(4, vocabulary.size, (2, 7))
    with torch.inference_mode():
        memory, _ = model.encode(torch.from_numpy(src))
        cross_key, cross_value = model.cross_keys_values(memory)
        # The reference: row 1 alone, from its first step.
        key, value = model.empty_cache(1)
        alone = []
        for step in range(4):
            log_probs, key, value, _, self_attention = model.decode_step(
                torch.from_numpy(tokens[1, step : step + 1]), key, value,
                cross_key[:, 1:], cross_value[:, 1:], padding[1:],
            )
            alone.append((log_probs[0].numpy(), self_attention[:, 0].numpy()))
        # Row 0 runs 3 steps alone, then row 1 joins with a cache of 3 zero (padding) entries.
        key, value = model.empty_cache(1)
        for step in range(3):
            _, key, value, _, _ = model.decode_step(
                torch.from_numpy(tokens[0, step : step + 1]), key, value,
                cross_key[:, :1], cross_value[:, :1], padding[:1],
            )
    past_key = np.concatenate([key.numpy(), np.zeros_like(key.numpy())], axis=1)  # [L,2,H,3,Dh]
    past_value = np.concatenate([value.numpy(), np.zeros_like(value.numpy())], axis=1)
    positions = np.array([3, 0])
    for step in range(4):
        feeds = {"tokens": np.array([tokens[0, 3 + step], tokens[1, step]]), "positions": positions,
                 "src_padding_mask": padding.numpy()}
        for i in range(layers):
            feeds[f"past_self_key.{i}"], feeds[f"past_self_value.{i}"] = past_key[i], past_value[i]
            feeds[f"cross_key.{i}"], feeds[f"cross_value.{i}"] = cross_key[i].numpy(), cross_value[i].numpy()
        out = dict(zip(decoder_outputs(layers), decoder.run(None, feeds), strict=True))
        expected_log_probs, expected_self = alone[step]
        np.testing.assert_allclose(out["log_probs"][1], expected_log_probs, atol=1e-4, err_msg=f"step {step}")
        for i in range(layers):
            weights = out[f"self_attention.{i}"][1]  # [H, 1, 3 + step + 1]
            assert (weights[:, :, :3] == 0).all()  # the padding entries get exactly no weight
            np.testing.assert_allclose(weights[:, :, 3:], expected_self[i], atol=1e-5)
        past_key = np.stack([out[f"present_self_key.{i}"] for i in range(layers)])
        past_value = np.stack([out[f"present_self_value.{i}"] for i in range(layers)])
        positions = positions + 1


def test_a_stream_never_feeds_a_done_row_past_the_position_table() -> None:
    """Iteration-level batching: a done row stays in the running batch until enough rows are done; rows that
    joined later kept it there until its position passed the model's 512 (onnxruntime's Gather then failed
    the whole batch: INTERNAL for 20 rows in the probe that found it). Row A runs 300 steps; four rows join
    at step 250 and run 300 more, so A, done at 300 (1 of 5 done: no compaction), would reach 550."""
    engine = Engine.load(DEFAULT_REPOSITORY, "toy-en-es", threads=1, lanes=1, max_length_limit=512)
    assert engine.model.description["architecture"]["max_positions"] == 512
    # A text the model never ends with </s> within 300 steps, so that every row runs to its maximum: which
    # one depends on the trained weights, hence the candidates.
    candidates = [engine.vocabulary.encode_source(word * 60).ids for word in ("and ", "that ", "with ", ", ")]
    long_runs = TranslateOptions(max_length=300)
    source = next(ids for ids in candidates if not engine.search_ids([ids], long_runs)[0].finished)
    done: dict[object, Hypothesis] = {}
    stream = engine.running_batch(TranslateOptions(), on_done=lambda key, found: done.setdefault(key, found))
    try:
        stream.add(["A"], [source], [300])
        for _ in range(250):
            stream.step()
        stream.add(["B", "C", "D", "E"], [source] * 4, [300] * 4)
        while stream.size:
            stream.step()
    finally:
        stream.close()
    assert sorted(done) == ["A", "B", "C", "D", "E"]
    assert all(len(hypothesis.tokens) == 300 and not hypothesis.finished for hypothesis in done.values())


def test_decode_step_layers_is_decode_step_per_layer(each_tiny_model: tuple[Path, Path]) -> None:
    model, _, _ = load_model(each_tiny_model[0])
    config = model.config
    generator = torch.Generator().manual_seed(0)
    shape = (config.n_decoder_layers, 2, config.n_heads, 3, config.head_dim)
    cross_shape = (config.n_decoder_layers, 2, config.n_heads, 4, config.head_dim)
    key, value = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    cross_key = torch.randn(cross_shape, generator=generator)
    cross_value = torch.randn(cross_shape, generator=generator)
    padding = torch.tensor([[False] * 4, [False, False, True, True]])
    tokens = torch.tensor([5, 6])
    with torch.inference_mode():
        stacked = model.decode_step(tokens, key, value, cross_key, cross_value, padding)
        layered = model.decode_step_layers(
            tokens, list(key), list(value), list(cross_key), list(cross_value), padding
        )
    torch.testing.assert_close(layered[0], stacked[0], rtol=0, atol=0)
    for stacked_part, layered_part in zip(stacked[1:], layered[1:], strict=True):
        torch.testing.assert_close(torch.stack(layered_part), stacked_part, rtol=0, atol=0)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_engine_translates_like_pytorch(each_tiny_model: tuple[Path, Path], beam_size: int) -> None:
    tiny_checkpoint, tiny_repository = each_tiny_model
    model, vocabulary, _ = load_model(tiny_checkpoint)
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    texts = sentences(40, longest=14)
    options = TranslateOptions(
        beam_size=beam_size, max_length=12, attention=frozenset({"cross", "decoder_self"})
    )
    ours = engine.translate(texts, options, batch_size=16)
    reference = translate_ids(
        model,
        [vocabulary.encode_source(t).ids for t in texts],
        beam_size=beam_size,
        max_length=12,
        with_attention=True,
    )
    for translation, hypothesis in zip(ours, reference, strict=True):
        assert hypothesis is not None
        assert translation.token_ids == hypothesis.tokens
        assert translation.score == pytest.approx(hypothesis.score, abs=1e-4)
        np.testing.assert_allclose(translation.cross_attention, hypothesis.cross_attention, atol=1e-5)
        np.testing.assert_allclose(translation.decoder_self_attention, hypothesis.self_attention, atol=1e-5)


def test_alone_equals_inside_a_mixed_batch(tiny_repository: Path) -> None:
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    texts = sentences(64, seed=3, longest=14)
    options = TranslateOptions(max_length=15, attention=frozenset({"cross", "decoder_self", "encoder_self"}))
    batch = engine.translate(texts, options, batch_size=64)
    for index in (0, 17, 63):
        alone = engine.translate([texts[index]], options)[0]
        inside = batch[index]
        assert alone.token_ids == inside.token_ids
        S, T = len(alone.source_tokens), alone.cross_attention.shape[2]
        assert alone.cross_attention.shape[3] == S and alone.encoder_attention.shape[2:] == (S, S)
        assert alone.decoder_self_attention.shape[2:] == (T, T)
        for name in ("cross_attention", "decoder_self_attention", "encoder_attention"):
            np.testing.assert_allclose(getattr(alone, name), getattr(inside, name), atol=1e-5)


def test_attention_is_returned_only_when_asked(tiny_repository: Path) -> None:
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    plain = engine.translate(sentences(3, longest=14))
    assert all(t.cross_attention is None and t.encoder_attention is None for t in plain)
    cross_only = engine.translate(sentences(3, longest=14), TranslateOptions(attention=frozenset({"cross"})))
    assert all(t.cross_attention is not None and t.decoder_self_attention is None for t in cross_only)


def test_replace_unknowns_copies_the_attended_source_word(tiny_repository: Path) -> None:
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    unk = engine.vocabulary.unk_id
    source = engine.vocabulary.encode_source("the Zorblax dog")
    attention = np.zeros((2, 4, 2, len(source.ids)), dtype=np.float32)
    attention[:, :, 0, 1] = 1.0  # target 0 looks at "Zorblax"
    attention[:, :, 1, 2] = 1.0
    dog = engine.vocabulary.tokenizer.token_to_id("perro")
    words = replace_unknowns(engine.vocabulary, [unk, dog], source, attention)
    assert words == ["Zorblax", "perro"]
    assert engine.vocabulary.decode([unk, dog], source, words) == "Zorblax perro"


def test_engine_imports_no_torch() -> None:
    code = (
        "import sys, service.engine.engine, service.core.search, service.core.model_format; "
        "import service.core.vocabulary; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert not any(m == 'model' or m.startswith('model.') for m in sys.modules), 'model/ was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def copy_version(tiny_repository: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_repository / "tiny", tmp_path / "tiny")
    return tmp_path / "tiny" / "1"


@pytest.mark.parametrize("graph", ["decoder.onnx", "select.onnx"])
def test_missing_file_is_named(tiny_repository: Path, tmp_path: Path, graph: str) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    (folder / graph).unlink()
    with pytest.raises(ModelLoadError, match=rf"{graph}: missing"):
        Engine.load(tmp_path, "tiny")


def test_model_json_without_a_graph_entry_or_checksum_is_named(tiny_repository: Path, tmp_path: Path) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    description = json.loads((folder / "model.json").read_text())
    without_select = {**description, "graphs": {**description["graphs"], "select": None}}
    unchecked = {**description, "checksums": {k: v for k, v in description["checksums"].items()
                                              if k != "select.onnx"}}
    for broken, message in (
        (without_select, r"missing or malformed 'graphs\.select'"),
        (unchecked, r"'checksums' lacks \['select\.onnx'\]"),
    ):
        (folder / "model.json").write_text(json.dumps(broken))
        with pytest.raises(ModelLoadError, match=rf"model\.json: {message}"):
            Engine.load(tmp_path, "tiny")


def test_corrupt_graph_is_named(tiny_repository: Path, tmp_path: Path) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    (folder / "encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match=r"encoder\.onnx: checksum"):
        Engine.load(tmp_path, "tiny")
    with pytest.raises(ModelLoadError, match=r"encoder\.onnx: onnxruntime cannot load"):
        Engine(resolve(tmp_path, "tiny", verify_checksums=False))


def test_model_json_that_does_not_match_the_graphs(tiny_repository: Path, tmp_path: Path) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    description = json.loads((folder / "model.json").read_text())
    description["architecture"]["n_heads"] = 8
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelLoadError, match=r"encoder\.onnx: 'cross_key\.0' has dimensions"):
        Engine.load(tmp_path, "tiny")
    description["vocabulary_size"]["target"] = description["architecture"]["tgt_vocab_size"] = 5
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Engine.load(tmp_path, "tiny")
    (folder / "model.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"model\.json: not valid JSON"):
        Engine.load(tmp_path, "tiny")


def test_unknown_model_and_version_are_named(tiny_repository: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model"):
        Engine.load(tiny_repository, "nope")
    with pytest.raises(ModelLoadError, match="version 7 does not exist"):
        Engine.load(tiny_repository, "tiny", version=7)


def test_non_ascii_digit_folders_are_not_versions(tiny_repository: Path, tmp_path: Path) -> None:
    """'²' passes str.isdigit() but not int(): such a folder was a crash at start-up, naming no file."""
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository, repository)
    (repository / "tiny" / "\u00b2").mkdir()
    (repository / "tiny" / "draft").mkdir()
    assert resolve(repository, "tiny").version == 1


ALL_MAPS = ("cross_attention", "decoder_self_attention", "encoder_attention")


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-encoder", "bound-encoder"])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_io_binding_on_cpu_equals_plain_mode(tiny_repository: Path, beam_size: int, grouped: bool) -> None:
    """The IO-binding mode (automatic on CUDA) forced on CPU: same tokens, scores and maps as numpy feeds."""
    plain = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    bound = Engine.load(tiny_repository, "tiny", device="cpu", threads=1, io_binding=True)
    assert not plain.io_binding and not plain.runner.backend.io_binding and bound.runner.backend.io_binding
    # grouped: the CPU encoder's per-length runs, wrapped as OrtValues; else one encoder run with its
    # cross keys/values bound as device outputs (the CUDA path).
    bound.runner.backend.group_encoder_by_length = grouped
    # Mixed lengths (1-14 words) and per-sentence max lengths: rows finish at different steps, so
    # `select` drops and reorders rows of the device-side caches.
    texts = sentences(48, seed=5, longest=14)
    options = TranslateOptions(beam_size=beam_size, attention=frozenset(ATTENTION_KINDS))
    expected = plain.translate(texts, options, batch_size=48)
    ours = bound.translate(texts, options, batch_size=48)
    assert len({len(t.token_ids) for t in expected}) > 2  # rows did finish at different steps
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.token_ids == theirs.token_ids
        assert mine.score == pytest.approx(theirs.score, abs=1e-6)
        assert mine.log_prob == pytest.approx(theirs.log_prob, abs=1e-6)
        for name in ALL_MAPS:
            np.testing.assert_allclose(getattr(mine, name), getattr(theirs, name), rtol=0, atol=1e-6)
    # Without attention too (the decoder's attention outputs are then not bound at all).
    plain_ids = plain.search_ids(
        [plain.vocabulary.encode_source(t).ids for t in texts], TranslateOptions(beam_size=beam_size)
    )
    bound_ids = bound.search_ids(
        [bound.vocabulary.encode_source(t).ids for t in texts], TranslateOptions(beam_size=beam_size)
    )
    assert [h.tokens for h in bound_ids] == [h.tokens for h in plain_ids]
    np.testing.assert_allclose([h.score for h in bound_ids], [h.score for h in plain_ids], rtol=0, atol=1e-6)


def test_select_graph_keeps_rows_like_numpy(tiny_repository: Path) -> None:
    """select.onnx (device-side `select` in the IO-binding mode) against numpy's selection: rows dropped,
    reordered and repeated, leading cache padding (rows that joined later) and unused source columns cut."""
    plain = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    bound = Engine.load(tiny_repository, "tiny", device="cpu", threads=1, io_binding=True)
    # The graph must do the work: a host round trip (`_to_device`) would also return OrtValues.
    graph_runs: list[int] = []
    selector = bound.runner.backend.selector
    assert selector is not None
    real_run = selector.run_with_iobinding

    def counted_run(binding: ort.IOBinding) -> None:
        graph_runs.append(1)
        real_run(binding)

    selector.run_with_iobinding = counted_run  # type: ignore[method-assign]

    def no_round_trip(array: np.ndarray) -> ort.OrtValue:
        raise AssertionError("select copied a device cache through the host")

    bound.runner.backend._to_device = no_round_trip  # type: ignore[method-assign]
    architecture = plain.model.architecture
    layers, heads, head_dim = architecture.n_decoder_layers, architecture.n_heads, architecture.head_dim
    rng = np.random.default_rng(3)
    batch, past, source = 5, 7, 9

    def caches(length: int) -> list[np.ndarray]:
        shape = (batch, heads, length, head_dim)
        return [rng.standard_normal(shape).astype(np.float32) for _ in range(layers)]

    self_key, self_value, cross_key, cross_value = caches(past), caches(past), caches(source), caches(source)
    lengths = np.array([9, 3, 6, 4, 2])
    mask = np.arange(source)[None, :] >= lengths[:, None]
    positions = np.array([7, 2, 7, 5, 3])  # rows 1, 3 and 4 joined later: left-padded caches
    state = DecoderState(self_key, self_value, cross_key, cross_value, mask, positions)
    on_device = DecoderState(*[[ort.OrtValue.ortvalue_from_numpy(a) for a in part]
                               for part in (self_key, self_value, cross_key, cross_value)], mask, positions)
    # Step 0: the self-attention caches are still empty host arrays, the cross keys/values on the device.
    empty = [np.zeros((batch, heads, 0, head_dim), dtype=np.float32) for _ in range(layers)]
    at_start = DecoderState(empty, empty, cross_key, cross_value, mask, np.zeros(batch, dtype=np.int64))
    start_on_device = DecoderState(empty, empty, on_device.cross_key, on_device.cross_value, mask,
                                   at_start.positions)
    cases = [(state, on_device, rows) for rows in ([3, 1, 3, 4], [0, 2], [4])]
    for plain_state, device_state, rows in [*cases, (at_start, start_on_device, [2, 0])]:
        expected = plain.runner.backend.select(plain_state, np.array(rows))
        kept = bound.runner.backend.select(device_state, np.array(rows))
        np.testing.assert_array_equal(kept.src_padding_mask, expected.src_padding_mask)
        np.testing.assert_array_equal(kept.positions, expected.positions)
        for name in ("self_key", "self_value", "cross_key", "cross_value"):
            for ours, theirs in zip(getattr(kept, name), getattr(expected, name), strict=True):
                assert isinstance(ours, ort.OrtValue)
                np.testing.assert_array_equal(ours.numpy(), theirs)
    assert len(graph_runs) == 4
    # The cuts were exercised: rows [3, 1, 3, 4] need 5 cache entries of 7 and 4 source columns of 9.
    cut = plain.runner.backend.select(state, np.array([3, 1, 3, 4]))
    assert cut.self_key[0].shape == (4, heads, 5, head_dim)
    assert cut.cross_key[0].shape == (4, heads, 4, head_dim)


def test_cuda_asked_for_without_a_usable_cuda_provider_fails_loading(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cuda` never runs on the CPU by accident: without onnxruntime-gpu it fails at once; with a
    CUDA provider that onnxruntime cannot start (simulated: this onnxruntime lists one it does not have,
    so it falls back to the CPU as it does when a CUDA library is missing) it fails naming the cause."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a working CUDA provider")
    with pytest.raises(ModelLoadError, match="device 'cuda' asked for, but onnxruntime offers only"):
        Engine.load(tiny_repository, "tiny", device="cuda", threads=1)
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr("service.engine.onnx_runtime.available_providers", lambda: both)
    with pytest.raises(ModelLoadError, match="could not start its CUDA provider"):
        Engine.load(tiny_repository, "tiny", device="cuda", threads=1)
    # `auto` carries on with the CPU, planned as for the CPU (a lane per thread, not the GPU's one).
    fallen_back = Engine.load(tiny_repository, "tiny", device="auto", threads=2)
    assert fallen_back.provider == "CPUExecutionProvider" and fallen_back.lanes == 2


def test_the_longest_training_source_comes_from_the_training_record() -> None:
    from model.export import training_max_source_tokens
    from model.toy_language import TRAIN_MAX_WORDS

    assert training_max_source_tokens({"kind": "tsv", "max_source_tokens": 57}) == 57
    assert training_max_source_tokens({"kind": "toy"}) == TRAIN_MAX_WORDS + 1  # older: the sampler bound
    assert training_max_source_tokens({"kind": "tsv"}) is None  # unknown: nothing is flagged
    assert training_max_source_tokens({}) is None
