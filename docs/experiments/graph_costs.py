"""Where a lane's time goes inside onnxruntime, one thread: the figures the README quotes for the graphs.

    .venv/bin/python docs/experiments/graph_costs.py

1. Encoder graph: the default checkpoint exported twice, with the training-style encoder
   (`encode_layers` + `cross_keys_values_layers`) and with the one the export uses (`encode_rows`); kernels
   after onnxruntime's optimizations and time per run on the test sentences in sorted batches of 16.
2. Softmax over [16,4,18,18] scores with half the keys padded (the most negative float), on a thread that
   keeps denormals and on one that flushes them (`flush_denormals_on_this_thread`).
3. The shipped decoder step at 1 and 16 rows (past length 8, 14 source positions).
4. A single-threaded float32 matrix product (1024^3), for the core's peak.
5. One decoder self-attention at 16 rows: onnxruntime's fused `MultiHeadAttention` contrib operator against
   the same work as our graph writes it (reshapes, cache concatenation, scores, bias, softmax, context).
Medians of 5 rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import model.export as export
from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from model.checkpoint import load_model
from service.core.vocabulary import Vocabulary
from service.engine.onnx_runtime import flush_denormals_on_this_thread

CHECKPOINT = Path("checkpoints/toy-en-es")
DECODER = Path("model_repository/toy-en-es/1/decoder.onnx")
ROUNDS = 5


def one_node_model(graph: onnx.GraphProto) -> bytes:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def session(model: str | bytes, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def per_call_us(call: Callable[[], object], repeats: int) -> float:
    """Median over rounds of the mean time per call, in microseconds."""
    for _ in range(max(3, repeats // 10)):
        call()
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        rounds.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(rounds)


def encoder_graphs() -> None:
    model, _, _ = load_model(CHECKPOINT)
    vocabulary = Vocabulary.from_file(CHECKPOINT / "tokenizer.json")
    ids = sorted((vocabulary.encode_source(t).ids for t in read_sentences(DEFAULT_SENTENCES)[:512]), key=len)
    batches = []
    for start in range(0, len(ids), 16):
        rows = ids[start:start + 16]
        src = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
        for i, row in enumerate(rows):
            src[i, : len(row)] = row
        batches.append({"src_ids": src, "src_padding_mask": src == 0})

    def training_style(self: export.EncoderGraph, src_ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        memory, weights = self.model.encode_layers(src_ids, mask)
        keys, values = self.model.cross_keys_values_layers(memory)
        return (memory, *[t for pair in zip(keys, values, strict=True) for t in pair], *weights)

    with tempfile.TemporaryDirectory() as folder:
        times = {}
        for name in ("training-style", "on rows"):
            out = Path(folder) / name
            out.mkdir()
            original = export.EncoderGraph.forward
            if name == "training-style":
                export.EncoderGraph.forward = training_style
            try:
                export.export_graphs(model, out)
            finally:
                export.EncoderGraph.forward = original
            encoder = session(str(out / "encoder.onnx"), optimized=out / "optimized.onnx")
            kernels = len(onnx.load(str(out / "optimized.onnx")).graph.node)
            outputs = [o.name for o in encoder.get_outputs() if o.name.startswith("cross_")]
            runs = per_call_us(lambda s=encoder, o=outputs: [s.run(o, b) for b in batches], 3)
            times[name] = runs / len(batches)
            print(f"encoder {name:>14}: {kernels} kernels, {times[name]:.0f} us per batch of 16")
        print(f"encoder on rows / training-style: {times['on rows'] / times['training-style']:.2f}x time")


def softmax_with_padding() -> None:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 4, 18, 18])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    softmax = session(one_node_model(graph))
    scores = np.random.default_rng(0).standard_normal((16, 4, 18, 18)).astype(np.float32)
    scores[..., 9:] = np.finfo(np.float32).min
    results = {}

    def measure(flush: bool) -> None:
        if flush:
            flush_denormals_on_this_thread()
        results[flush] = per_call_us(lambda: softmax.run(None, {"x": scores}), 2000)

    for flush in (False, True):  # a fresh thread each: the flush stays on the thread that set it
        thread = threading.Thread(target=measure, args=(flush,))
        thread.start()
        thread.join()
    print(f"softmax [16,4,18,18], half the keys padded: {results[False]:.1f} us keeping denormals, "
          f"{results[True]:.1f} us flushing them")


def decoder_step() -> None:
    decoder = session(str(DECODER))
    rng = np.random.default_rng(0)
    for rows in (1, 16):
        feeds = {"tokens": rng.integers(4, 1900, rows), "positions": np.full(rows, 8, dtype=np.int64),
                 "src_padding_mask": np.zeros((rows, 14), dtype=bool)}
        for layer in range(3):
            for kind, length in (("past_self_key", 8), ("past_self_value", 8), ("cross_key", 14),
                                 ("cross_value", 14)):
                feeds[f"{kind}.{layer}"] = rng.standard_normal((rows, 4, length, 32)).astype(np.float32)
        outputs = ["log_probs"] + [f"present_self_{k}.{i}" for i in range(3) for k in ("key", "value")]
        step = per_call_us(lambda f=feeds, o=outputs: decoder.run(o, f), 500)
        print(f"decoder step, {rows:>2} rows: {step:.0f} us")


def matrix_product_peak() -> None:
    size = 1024
    weight = numpy_helper.from_array(np.random.rand(size, size).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight],
    )
    matmul = session(one_node_model(graph))
    a = np.random.rand(size, size).astype(np.float32)
    us = per_call_us(lambda: matmul.run(None, {"a": a}), 10)
    print(f"matrix product {size}^3, one thread: {2 * size ** 3 / us / 1e3:.0f} GFLOP/s")


def fused_attention() -> None:
    rows, past, heads, head_dim = 16, 8, 4, 32
    width = heads * head_dim
    value_info = helper.make_tensor_value_info
    rng = np.random.default_rng(0)
    new = {n: rng.standard_normal((rows, width)).astype(np.float32) for n in ("q", "k", "v")}
    cache = {n: rng.standard_normal((rows, heads, past, head_dim)).astype(np.float32) for n in ("pk", "pv")}
    bias = np.zeros((rows, 1, 1, past + 1), dtype=np.float32)
    cache_inputs = [value_info(n, TensorProto.FLOAT, [rows, heads, past, head_dim]) for n in ("pk", "pv")]
    bias_input = value_info("bias", TensorProto.FLOAT, [rows, 1, 1, past + 1])
    outputs = [value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_k", "present_v")]

    fused = helper.make_graph(
        [helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias", "pk", "pv"],
                          ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=heads,
                          scale=1.0)],
        "fused", [value_info(n, TensorProto.FLOAT, [rows, 1, width]) for n in ("q", "k", "v")]
        + [bias_input, *cache_inputs], outputs,
    )
    shape = helper.make_tensor("heads", TensorProto.INT64, [4], [-1, heads, 1, head_dim])
    flat = helper.make_tensor("flat", TensorProto.INT64, [2], [-1, width])
    ours = helper.make_graph(
        [helper.make_node("Reshape", [n, "heads"], [f"{n}h"]) for n in ("q", "k", "v")] + [
            helper.make_node("Concat", ["pk", "kh"], ["present_k"], axis=2),
            helper.make_node("Concat", ["pv", "vh"], ["present_v"], axis=2),
            helper.make_node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["biased"]),
            helper.make_node("Softmax", ["biased"], ["weights"], axis=-1),
            helper.make_node("MatMul", ["weights", "present_v"], ["context"]),
            helper.make_node("Reshape", ["context", "flat"], ["out"]),
        ],
        "ours", [value_info(n, TensorProto.FLOAT, [rows, width]) for n in ("q", "k", "v")]
        + [bias_input, *cache_inputs], outputs, [shape, flat],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    times = {}
    for name, graph, feeds in (
        ("MultiHeadAttention", fused, {**{n: a[:, None] for n, a in new.items()}, **cache, "bias": bias}),
        ("our graph's nodes", ours, {**new, **cache, "bias": bias}),
    ):
        run = session(helper.make_model(graph, opset_imports=opsets).SerializeToString())
        times[name] = per_call_us(lambda s=run, f=feeds: s.run(None, f), 2000)
    print("one self-attention, 16 rows: " + ", ".join(f"{n} {t:.1f} us" for n, t in times.items()))


def main() -> None:
    encoder_graphs()
    softmax_with_padding()
    decoder_step()
    matrix_product_peak()
    fused_attention()


if __name__ == "__main__":
    main()
