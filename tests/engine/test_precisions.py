"""The int8 and float16 precisions: graphs exported beside float32's, chosen at load, refused clearly when not
offered."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model.export import export_checkpoint
from service.core.model_format import FLOAT32, ModelLoadError, offered_precisions, resolve, sha256
from service.core.options import ATTENTION_KINDS, TranslateOptions
from service.engine.engine import Engine
from tests.support.texts import sentences


def weight_products(graph: onnx.ModelProto) -> int:
    """Products with a constant weight: every Gemm, and MatMuls whose second input is an initializer."""
    weights = {tensor.name for tensor in graph.graph.initializer}
    return sum(
        node.op_type == "Gemm" or (node.op_type == "MatMul" and node.input[1] in weights)
        for node in graph.graph.node
    )


def test_int8_graphs_quantize_every_weight_product_and_no_activation_product(tiny_repository: Path) -> None:
    folder = tiny_repository / "tiny" / "1"
    description = json.loads((folder / "model.json").read_text())
    files = {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx"}
    assert description["precisions"] == {
        "int8": files, "float16": {"encoder": "encoder.float16.onnx", "decoder": "decoder.float16.onnx"}
    }
    for graph in ("encoder", "decoder"):
        float32, int8 = onnx.load(str(folder / f"{graph}.onnx")), onnx.load(str(folder / files[graph]))
        onnx.checker.check_model(int8, full_check=True)
        before = Counter(node.op_type for node in float32.graph.node)
        after = Counter(node.op_type for node in int8.graph.node)
        assert weight_products(float32) > 0
        assert after["MatMulInteger"] == weight_products(float32)
        # query x key and weights x value keep their float32 MatMuls.
        assert after["MatMul"] == before["MatMul"] - (weight_products(float32) - before["Gemm"])
        assert weight_products(int8) == 0
        assert description["checksums"][f"{graph}.int8.onnx"] == sha256(folder / f"{graph}.int8.onnx")
        assert (folder / files[graph]).stat().st_size < (folder / f"{graph}.onnx").stat().st_size


def test_float16_graphs_hold_float16_weights_behind_float32_inputs_and_outputs(tiny_repository: Path) -> None:
    """The engine feeds and reads the float16 graphs as the float32 ones: same signature, same types."""
    folder = tiny_repository / "tiny" / "1"
    for graph in ("encoder", "decoder"):
        float32 = onnx.load(str(folder / f"{graph}.onnx"))
        float16 = onnx.load(str(folder / f"{graph}.float16.onnx"))
        onnx.checker.check_model(float16, full_check=True)
        types = {tensor.data_type for tensor in float16.graph.initializer if tensor.dims}
        assert types == {onnx.TensorProto.FLOAT16}, graph
        for kind in ("input", "output"):
            ours, theirs = getattr(float32.graph, kind), getattr(float16.graph, kind)
            assert [(v.name, v.type.tensor_type.elem_type) for v in ours] == [
                (v.name, v.type.tensor_type.elem_type) for v in theirs
            ]


@pytest.mark.parametrize(("precision", "largest_drift"), [("int8", 0.06), ("float16", 0.005)])
def test_reduced_precision_outputs_follow_float32(
    each_tiny_model: tuple[Path, Path], precision: str, largest_drift: float
) -> None:
    """Per-tensor int8 weights move the encoder's outputs by a few percent of their range, float16 weights by
    a fraction of a percent; neither leaves them where float32 puts them."""
    _, repository = each_tiny_model
    folder = repository / "tiny" / "1"
    rng = np.random.default_rng(0)
    src = rng.integers(4, 30, (3, 9))
    src[1, 6:] = 0
    feeds = {"src_ids": src, "src_padding_mask": src == 0}
    float32 = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    reduced = ort.InferenceSession(
        str(folder / f"encoder.{precision}.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in float32.get_outputs()]
    for name, exact, close in zip(names, float32.run(None, feeds), reduced.run(None, feeds), strict=True):
        assert exact.shape == close.shape and close.dtype == np.float32
        drift = np.abs(exact - close).max() / np.abs(exact).max()
        assert 0 < drift < largest_drift, name  # 0: the graph would not be reduced at all


@pytest.mark.parametrize("precision", ["int8", "float16"])
def test_a_reduced_precision_engine_translates_with_attention_maps(
    each_tiny_model: tuple[Path, Path], precision: str
) -> None:
    _, repository = each_tiny_model
    engine = Engine.load(repository, "tiny", device="cpu", threads=1, precision=precision)
    assert engine.model.precision == precision
    assert engine.model.graph_file("decoder").name == f"decoder.{precision}.onnx"
    assert engine.model.graph_file("select").name == "select.onnx"
    texts = sentences(6, seed=3)
    options = TranslateOptions(beam_size=2, attention=frozenset(ATTENTION_KINDS))
    hypotheses = engine.search_ids([source.ids for source in engine.encode_texts(texts)], options)
    for text, hypothesis in zip(texts, hypotheses, strict=True):
        assert hypothesis is not None and hypothesis.tokens, text
        assert hypothesis.cross_attention is not None
        assert np.allclose(hypothesis.cross_attention.sum(axis=-1), 1.0, atol=1e-4)


def copy_version(repository: Path, tmp_path: Path) -> Path:
    shutil.copytree(repository / "tiny", tmp_path / "tiny")
    return tmp_path / "tiny" / "1"


def test_a_precision_the_version_does_not_offer_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    export_checkpoint(tiny_checkpoint, tmp_path, "tiny", 1, precisions=(FLOAT32,))
    folder = tmp_path / "tiny" / "1"
    assert not list(folder.glob("*.int8.onnx")) and not list(folder.glob("*.float16.onnx"))
    assert offered_precisions(resolve(tmp_path, "tiny").description) == [FLOAT32]
    with pytest.raises(ModelLoadError, match=r"model\.json: this version offers precisions \['float32'\], "
                                             r"not 'int8'"):
        Engine.load(tmp_path, "tiny", precision="int8")
    with pytest.raises(ModelLoadError, match=r"not 'bfloat16'"):
        resolve(tmp_path, "tiny", precision="bfloat16")


def test_a_missing_or_replaced_int8_graph_is_named(tiny_repository: Path, tmp_path: Path) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    (folder / "decoder.int8.onnx").write_bytes((folder / "decoder.onnx").read_bytes())
    with pytest.raises(ModelLoadError, match=r"decoder\.int8\.onnx: checksum does not match"):
        Engine.load(tmp_path, "tiny", precision="int8")
    # Only what a precision loads is checked: a stale int8 graph does not stop float32 or float16.
    for precision in (FLOAT32, "float16"):
        assert resolve(tmp_path, "tiny", precision=precision).precision == precision
    (folder / "decoder.int8.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"decoder\.int8\.onnx: missing \(model\.json names it for "
                                             r"precision int8\)"):
        Engine.load(tmp_path, "tiny", precision="int8")
    # float32 does not need the int8 files.
    assert Engine.load(tmp_path, "tiny", device="cpu", threads=1).model.precision == FLOAT32


@pytest.mark.parametrize(
    ("precisions", "message"),
    [
        ([], r"malformed 'precisions'"),
        ({"int4": {"encoder": "e.onnx", "decoder": "d.onnx"}}, r"unknown precision 'int4'"),
        ({"int8": {"encoder": "encoder.int8.onnx"}}, r"'precisions\.int8' must name a file for each of"),
        ({"int8": {"encoder": "../e.onnx", "decoder": "decoder.int8.onnx"}}, r"'precisions\.int8' must"),
        ({"int8": {"encoder": "encoder.onnx", "decoder": "decoder.int8.onnx"}}, r"'precisions\.int8' must"),
        ({"float16": {"encoder": "model.json", "decoder": "d.onnx"}}, r"'precisions\.float16' must"),
    ],
)
def test_a_malformed_precisions_entry_is_named(
    tiny_repository: Path, tmp_path: Path, precisions: object, message: str
) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    description = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**description, "precisions": precisions}))
    with pytest.raises(ModelLoadError, match=rf"model\.json: {message}"):
        resolve(tmp_path, "tiny")


def test_int8_graphs_must_have_checksums(tiny_repository: Path, tmp_path: Path) -> None:
    folder = copy_version(tiny_repository, tmp_path)
    description = json.loads((folder / "model.json").read_text())
    del description["checksums"]["encoder.int8.onnx"]
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelLoadError, match=r"'checksums' lacks \['encoder\.int8\.onnx'\]"):
        resolve(tmp_path, "tiny")
