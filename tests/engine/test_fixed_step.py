"""The fixed-shape decoder step (decoder_fixed.onnx, service.engine.fixed_step): the path a GPU's captured
CUDA graphs run, run here on the CPU against the dynamic step, token for token."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from model.data import toy_split
from service.core.model_format import FIXED_STEP, ModelLoadError, fixed_step_outputs, resolve
from service.core.options import ATTENTION_KINDS, TranslateOptions
from service.engine.engine import Engine
from service.engine.fixed_step import FIRST_CAPACITY, FixedStepBackend
from service.engine.onnx_runtime import CPU
from service.engine.runner import Runner
from tests.conftest import DEFAULT_REPOSITORY
from tests.support.texts import sentences


def assert_same(fixed: list, dynamic: list, maps: bool) -> None:
    for ours, reference in zip(fixed, dynamic, strict=True):
        assert ours.token_ids == reference.token_ids
        assert ours.score == pytest.approx(reference.score, abs=1e-5)
        if maps:
            for kind in ("cross_attention", "decoder_self_attention", "encoder_attention"):
                if getattr(reference, kind) is None:  # not asked for
                    assert getattr(ours, kind) is None
                else:
                    np.testing.assert_allclose(getattr(ours, kind), getattr(reference, kind), atol=1e-5)


def fixed_engine(repository: Path, pooled: bool, **settings: object) -> Engine:
    """An engine on the fixed step; `pooled`: its tensors pooled per bucket, as with CUDA graphs."""
    engine = Engine.load(repository, "tiny", device="cpu", threads=1, step_graph="fixed", **settings)
    assert engine.runner is not None and isinstance(engine.runner.backend, FixedStepBackend)
    engine.runner.backend.persistent = pooled
    return engine


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_fixed_step_translates_like_the_dynamic_step(
    each_tiny_model: tuple[Path, Path], beam_size: int, pooled: bool
) -> None:
    """Beam search (`select` repeats and reorders rows every step), outputs longer than the first cache
    capacity (rows outgrow it: the next bucket), with and without maps; with fresh or pooled tensors."""
    _, repository = each_tiny_model
    texts = sentences(40, seed=7, longest=14)
    fixed = fixed_engine(repository, pooled)
    dynamic = Engine.load(repository, "tiny", device="cpu", threads=1)
    lengths = []
    for options in (
        TranslateOptions(beam_size=beam_size, max_length=FIRST_CAPACITY + 8),
        TranslateOptions(beam_size=beam_size, max_length=12, attention=frozenset(ATTENTION_KINDS)),
    ):
        ours = fixed.translate(texts, options, batch_size=16)
        assert_same(ours, dynamic.translate(texts, options, batch_size=16), bool(options.attention))
        lengths += [len(t.token_ids) for t in ours]
    # The untrained model seldom ends its outputs: rows ran past the first capacity.
    assert max(lengths) > FIRST_CAPACITY


@pytest.mark.parametrize("pooled", [False, True])
def test_rows_joining_a_running_batch_decode_as_alone(tiny_relative_repository: Path, pooled: bool) -> None:
    """Iteration batching on the fixed step: each row keeps its own positions in the merged buffers (pooled:
    the batch and the rows joining it are live in the same bucket at once, each on its own tensors)."""
    engine = fixed_engine(tiny_relative_repository, pooled)
    alone = Engine.load(tiny_relative_repository, "tiny", device="cpu", threads=1)
    sources = [text.ids for text in engine.encode_texts(sentences(5, seed=2, longest=9))]
    done: dict[object, list[int]] = {}
    stream = engine.running_batch(
        TranslateOptions(), on_done=lambda key, found: done.setdefault(key, found.tokens)
    )
    try:
        stream.add([0], sources[:1], [20])
        for _ in range(3):
            stream.step()
        stream.add([1, 2, 3, 4], sources[1:], [20] * 4)
        while stream.size:
            stream.step()
    finally:
        stream.close()
    expected = alone.search_ids(sources, TranslateOptions(max_length=20))
    assert [done[row] for row in range(5)] == [hypothesis.tokens for hypothesis in expected]


def test_the_step_writes_its_cache_entries_in_place(tiny_relative_repository: Path) -> None:
    """The written cache is the bound input tensor itself: after a step, each row's new entry is at its own
    position and every other entry is what it was (nothing reset, nothing moved)."""
    runner = Runner(resolve(tiny_relative_repository, "tiny"), [CPU], 1, step_graph="fixed")
    backend = runner.backend
    assert isinstance(backend, FixedStepBackend)
    state, _ = backend.encode(np.array([[5, 6, 7, 2], [8, 2, 0, 0]]), False)
    cache = state.device["cache_self_key.0"].numpy()  # on the CPU: the bound tensor's memory
    cache[...] = np.random.default_rng(1).standard_normal(cache.shape)
    before = cache.copy()
    state.positions[:2] = [0, 3]  # row 1 as if three tokens were decoded already
    state, log_probs, _, _ = backend.step(state, np.array([1, 9]), False)
    changed = np.argwhere((cache != before).any(axis=(1, 3)))  # (row, entry) pairs that changed
    assert sorted((int(row), int(entry)) for row, entry in changed) == [(0, 0), (1, 3)]
    assert log_probs.shape == (2, backend.vocabulary_size)
    assert state.positions[:2].tolist() == [1, 4]


def test_pooled_tensors_are_reused_and_never_shared(tiny_relative_repository: Path) -> None:
    """With pooled tensors (what captured graphs replay on), a second batch of the same bucket runs on the
    tensors of the first, which it got back; two live states of one bucket hold different tensors."""
    engine = fixed_engine(tiny_relative_repository, pooled=True)
    backend = engine.runner.backend  # type: ignore[union-attr]
    assert isinstance(backend, FixedStepBackend)
    first, _ = backend.encode(np.array([[5, 6, 2]]), False)
    second, _ = backend.encode(np.array([[7, 2, 0]]), False)
    assert first.bucket == second.bucket and first.tensors is not second.tensors
    tensors = first.tensors
    del first
    third, _ = backend.encode(np.array([[9, 2, 0]]), False)
    assert third.tensors is tensors and third.tensors.graph_id == tensors.graph_id
    texts = sentences(16, seed=5, longest=12)
    options = TranslateOptions(max_length=15)
    once = engine.translate(texts, options, batch_size=8)
    made = backend._sets
    assert engine.translate(texts, options, batch_size=8) == once
    assert backend._sets == made  # the second pass took every set from the pool


def test_the_fixed_graph_holds_no_shape_arithmetic(each_tiny_model: tuple[Path, Path]) -> None:
    """What a captured CUDA graph cannot have: nodes that compute shapes (onnxruntime places them on the
    CPU) or branch. The cache writes are ScatterND nodes whose outputs are the graph's written caches."""
    folder = each_tiny_model[1] / "tiny" / "1"
    graph = onnx.load(str(folder / f"{FIXED_STEP}.onnx")).graph
    kinds = Counter(node.op_type for node in graph.node)
    # Every kind of node the graph may hold (none computes a shape or branches): a new kind must be looked at.
    allowed = {"Add", "Cast", "Constant", "Gather", "Gemm", "Greater", "Identity", "LayerNormalization",
               "LogSoftmax", "MatMul", "Mul", "Relu", "Reshape", "ScatterND", "Softmax", "Split", "Sub",
               "Transpose", "Unsqueeze", "Where"}
    assert set(kinds) <= allowed, set(kinds) - allowed
    layers = json.loads((folder / "model.json").read_text())["architecture"]["n_decoder_layers"]
    written = [name for name in fixed_step_outputs(layers) if name.startswith("written_")]
    assert sorted(node.output[0] for node in graph.node if node.op_type == "ScatterND") == sorted(written)


def test_a_version_without_the_fixed_graph_or_not_float32_is_refused_clearly(
    tiny_repository: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_repository / "tiny", tmp_path / "tiny")
    folder = tmp_path / "tiny" / "1"
    with pytest.raises(ModelLoadError, match="fixed-shape step is float32 only"):
        Engine.load(tmp_path, "tiny", device="cpu", precision="int8", step_graph="fixed")
    (folder / f"{FIXED_STEP}.onnx").write_bytes(b"replaced")
    with pytest.raises(ModelLoadError, match=rf"{FIXED_STEP}\.onnx: checksum does not match"):
        Engine.load(tmp_path, "tiny", device="cpu", step_graph="fixed")
    description = json.loads((folder / "model.json").read_text())
    del description["graphs"][FIXED_STEP]
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelLoadError, match="has no fixed-shape step graph"):
        Engine.load(tmp_path, "tiny", device="cpu", step_graph="fixed")
    Engine.load(tmp_path, "tiny", device="cpu")  # the dynamic step does not need it


def test_lane_processes_run_the_fixed_step(tiny_relative_repository: Path, tmp_path: Path) -> None:
    """The lanes load the fixed step (a version without it fails there) and decode like the dynamic one."""
    shutil.copytree(tiny_relative_repository / "tiny", tmp_path / "tiny")
    (tmp_path / "tiny" / "1" / f"{FIXED_STEP}.onnx").unlink()
    with pytest.raises(ModelLoadError, match=rf"{FIXED_STEP}\.onnx: missing"):
        Engine.load(tmp_path, "tiny", device="cpu", threads=1, lane_processes=True, step_graph="fixed")
    texts = sentences(24, seed=4, longest=12)
    options = TranslateOptions(max_length=15)
    dynamic = Engine.load(tiny_relative_repository, "tiny", device="cpu", threads=1).translate(texts, options)
    engine = Engine.load(tiny_relative_repository, "tiny", device="cpu", threads=2, lanes=2,
                         lane_processes=True, step_graph="fixed")
    try:
        assert_same(engine.translate(texts, options), dynamic, False)
    finally:
        engine.close()


def test_the_default_model_decodes_alike_on_both_steps() -> None:
    """The shipped model on `test` and `long` texts (outputs past 32 entries: capacity buckets grow)."""
    fixed = Engine.load(DEFAULT_REPOSITORY, "toy-en-es", device="cpu", threads=2, lanes=1, step_graph="fixed")
    dynamic = Engine.load(DEFAULT_REPOSITORY, "toy-en-es", device="cpu", threads=2, lanes=1)
    texts = [e.source for split, count in (("test", 200), ("long", 40)) for e in toy_split(split, count)]
    for options in (TranslateOptions(), TranslateOptions(attention=frozenset({"cross"}))):
        ours = fixed.translate(texts, options, batch_size=32)
        assert_same(ours, dynamic.translate(texts, options, batch_size=32), bool(options.attention))
    assert max(len(t.token_ids) for t in ours) > FIRST_CAPACITY
