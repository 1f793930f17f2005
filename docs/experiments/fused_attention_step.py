"""Does onnxruntime's fused attention make the decoder step faster on the CPU?

    .venv/bin/python docs/experiments/fused_attention_step.py

Takes the shipped decoder.onnx and replaces each layer's self-attention (reshapes, cache Concat, scores,
bias, softmax, context) and cross-attention by one com.microsoft MultiHeadAttention node (the query already
scaled: scale=1; the relative-position bias and the padding as its attention_bias; the self-attention cache
as its past/present), dropping the attention-map outputs. Then times both graphs, one thread, on the same
random step inputs (past 12 entries, 14 source positions, one row's cache left-padded, one source padded),
best of 5 rounds of 200 runs, and compares their outputs.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from model.export import sort_nodes
from service.core.model_format import decoder_outputs, resolve

PATH = "/tmp/decoder_fused_attention.onnx"


def fused_graph(source: str, layers: int, heads: int, width: int) -> onnx.ModelProto:
    graph = onnx.load(source)
    nodes = list(graph.graph.node)
    producer = {name: node for node in nodes for name in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph.graph.initializer.extend([helper.make_tensor("axis_1", TensorProto.INT64, [1], [1]),
                                    helper.make_tensor("rows", TensorProto.INT64, [2], [-1, width])])
    added, removed = [], set()
    for i in range(layers):
        for kind in ("self", "cross"):
            softmax = producer[f"{kind}_attention.{i}"]
            scores = producer[softmax.input[0]]  # Add(query x keys, bias)
            bias = scores.input[1]
            # The [B, D] query before its reshape to heads.
            query = producer[producer[scores.input[0]].input[0]].input[0]
            context = next(c for c in consumers[softmax.output[0]] if c.op_type == "MatMul")
            merged = consumers[context.output[0]][0]  # the reshape to [B, D] the output projection reads
            added.append(helper.make_node("Unsqueeze", [query, "axis_1"], [f"q{kind}{i}"]))
            if kind == "self":
                concats = [producer[f"present_self_{part}.{i}"] for part in ("key", "value")]
                for part, concat in zip(("k", "v"), concats, strict=True):
                    added.append(helper.make_node("Unsqueeze", [producer[concat.input[1]].input[0], "axis_1"],
                                                  [f"{part}{i}"]))
                past = [f"past_self_key.{i}", f"past_self_value.{i}"]
                inputs = [f"qself{i}", f"k{i}", f"v{i}", "", "", bias, *past]
                outputs = [f"o{kind}{i}", f"present_self_key.{i}", f"present_self_value.{i}"]
                removed |= {id(c) for c in concats}
            else:
                inputs = [f"qcross{i}", f"cross_key.{i}", f"cross_value.{i}", "", "", bias]
                outputs = [f"o{kind}{i}"]
            added.append(helper.make_node("MultiHeadAttention", inputs, outputs, domain="com.microsoft",
                                          num_heads=heads, scale=1.0))
            added.append(helper.make_node("Reshape", [f"o{kind}{i}", "rows"], [merged.output[0]]))
            removed |= {id(softmax), id(context), id(merged)}
    maps = tuple(f"attention.{i}" for i in range(layers))
    kept_outputs = [o for o in graph.graph.output if not o.name.endswith(maps)]
    del graph.graph.output[:]
    graph.graph.output.extend(kept_outputs)
    del graph.graph.node[:]
    graph.graph.node.extend([n for n in nodes if id(n) not in removed] + added)
    sort_nodes(graph.graph)
    needed, alive = {o.name for o in kept_outputs}, []
    for node in reversed(list(graph.graph.node)):  # drop what no output needs any more
        if any(name in needed for name in node.output):
            alive.append(node)
            needed |= set(node.input)
    del graph.graph.node[:]
    graph.graph.node.extend(reversed(alive))
    graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return graph


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    model = resolve("model_repository", "toy-en-es")
    arch = model.architecture
    layers, heads, head_dim = arch.n_decoder_layers, arch.n_heads, arch.head_dim
    fused = fused_graph(str(model.file("decoder.onnx")), layers, heads, arch.d_model)
    onnx.save(fused, PATH)
    kinds = sorted({node.op_type for node in fused.graph.node})
    print(f"fused graph: {len(fused.graph.node)} nodes ({', '.join(kinds)})")
    base, ours = session(str(model.file("decoder.onnx"))), session(PATH)
    names = list(decoder_outputs(layers)[: 1 + 2 * layers])
    rng = np.random.default_rng(0)
    past, source = 12, 14
    for batch in (4, 8, 16, 32, 64):
        feeds = {"tokens": rng.integers(4, 1000, batch), "src_padding_mask": np.zeros((batch, source), bool),
                 "positions": np.full(batch, past)}
        feeds["src_padding_mask"][0, -3:] = True
        feeds["positions"][1] = past - 4
        for i in range(layers):
            for name, length in (("past_self_key", past), ("past_self_value", past), ("cross_key", source),
                                 ("cross_value", source)):
                shape = (batch, heads, length, head_dim)
                feeds[f"{name}.{i}"] = rng.standard_normal(shape).astype(np.float32)
        difference = max(float(np.abs(a - b).max())
                         for a, b in zip(base.run(names, feeds), ours.run(names, feeds), strict=True))
        best = {}
        for label, graph in (("ours", base), ("fused", ours)):
            rounds = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(200):
                    graph.run(names, feeds)
                rounds.append((time.perf_counter() - started) / 200 * 1e6)
            best[label] = min(rounds)
        print(f"batch {batch:>2}: ours {best['ours']:6.0f} us, fused {best['fused']:6.0f} us "
              f"({best['ours'] / best['fused']:.2f}x), largest output difference {difference:.1e}")


if __name__ == "__main__":
    main()
