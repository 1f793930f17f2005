"""Rewrites of the decoder step measured against the shipped graphs, one thread, interleaved.

    .venv/bin/python docs/experiments/step_variants.py [--rounds 9]

Each variant is exported from the default checkpoint (or converted from the shipped graph) into a temporary
folder and timed at 1, 4 and 16 rows (past 16, source 14: step_floor.py's feeds) against the graph it
would replace:
- float32, attention as elementwise products and sums (Mul + ReduceSum) instead of batched matrix products;
- float32, attention with the heads side by side: one product per row against all heads' keys and values,
  the other heads' blocks masked (4x fewer, 4x larger products);
- float32, no relative-position bias at all: not a usable model, the ceiling of what any cheaper way to
  compute that bias could save;
- int8, weight-only 8-bit products (com.microsoft.MatMulNBits, int8 compute) instead of dynamic quantization;
- int8, only the large products (feed-forward and output projection) in int8.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from step_floor import session, step_feeds  # this folder's step_floor.py (scripts run from here)

import model.export as export
from model.checkpoint import load_model
from model.transformer import DecoderLayer, MultiHeadAttention

CHECKPOINT = "checkpoints/toy-en-es"
SHIPPED = Path("model_repository/toy-en-es/1")


def elementwise_attend(self: MultiHeadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (query * key).sum(-1).unsqueeze(2)  # [B,H,1,Tk]
    if bias is not None:
        scores = scores + bias
    weights = scores.softmax(dim=-1)
    context = (weights.transpose(-2, -1) * value).sum(2).reshape(-1, self.n_heads * self.head_dim)
    return self.output(context), weights


def heads_side_by_side_attend(self: MultiHeadAttention, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, bias: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    heads = self.n_heads
    keys = key.flatten(1, 2).transpose(-2, -1)  # [B,Dh,H*Tk]
    scores = (query.view(-1, heads, self.head_dim) @ keys).unflatten(-1, (heads, -1))
    scores = scores + ((1 - torch.eye(heads)) * -1e30)[:, :, None]  # [Hq,Hk,1]: other heads' keys masked
    if bias is not None:
        scores = scores + bias
    full = scores.flatten(2).softmax(dim=-1)  # [B,Hq,Hk*Tk], zero outside the query head's block
    context = (full @ value.flatten(1, 2)).view(-1, heads * self.head_dim)
    return self.output(context), full.unflatten(-1, (heads, -1)).sum(2, keepdim=True)


def without_relative_bias(step: Callable) -> Callable:
    def run(self: DecoderLayer, *args: object, **kwargs: object) -> object:
        table, self.relative_bias = self.relative_bias, None
        try:
            return step(self, *args, **kwargs)
        finally:
            self.relative_bias = table
    return run


def exported(folder: Path, patch: tuple[type, str, Callable]) -> Path:
    owner, name, replacement = patch
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        model, _, _ = load_model(CHECKPOINT)
        folder.mkdir(parents=True)
        export.export_graphs(model, folder)
    finally:
        setattr(owner, name, original)
    return folder / "decoder.onnx"


def as_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Gemm of the graph as MatMul (+ Add for its bias), weights [in, out]: what the weight-only
    quantizer recognizes."""
    constants = {w.name: w for w in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        weight = constants[node.input[1]]
        if any(a.name == "transB" and a.i for a in node.attribute):
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
        product = node.output[0] + "_product"
        result = product if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", node.input[:2], [result]))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def weight_only_int8(folder: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
    graph = as_products(onnx.load(str(SHIPPED / "decoder.onnx")))
    quantizer = MatMulNBitsQuantizer(graph, algo_config=config)
    quantizer.process()
    target = folder / "decoder.nbits8.onnx"
    onnx.save(quantizer.model.model, str(target))
    return target


def large_products_int8(folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = SHIPPED / "decoder.onnx"
    model = onnx.load(str(source))
    constants = {w.name: list(w.dims) for w in model.graph.initializer}
    small = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in constants
             and not {512, 1966} & set(constants[n.input[1]])]
    target = folder / "decoder.large-int8.onnx"
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, nodes_to_exclude=small,
                     extra_options={"MatMulConstBOnly": True})
    return target


def compare(label: str, reference: Path, variant: Path, rounds: int) -> None:
    sessions = [session(str(reference)), session(str(variant))]
    rng = np.random.default_rng(0)
    for rows in (1, 4, 16):
        feeds = [step_feeds(s, rows, rng) for s in sessions]
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for i, decoder in enumerate(sessions):
                for _ in range(10):
                    decoder.run(["log_probs"], feeds[i])
                started = time.perf_counter()
                for _ in range(100):
                    decoder.run(["log_probs"], feeds[i])
                times[i].append((time.perf_counter() - started) * 1e4)  # us per call
        before, after = statistics.median(times[0]), statistics.median(times[1])
        print(f"{label:46s} {rows:2d} rows: {before:7.1f} -> {after:7.1f} us ({after / before:.2f}x)",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        attend = (MultiHeadAttention, "step_attend")
        variants = {
            "attention as elementwise products and sums": (*attend, elementwise_attend),
            "attention with the heads side by side": (*attend, heads_side_by_side_attend),
            "no relative-position bias (ceiling)": (DecoderLayer, "step",
                                                    without_relative_bias(DecoderLayer.step)),
        }
        float32, int8 = SHIPPED / "decoder.onnx", SHIPPED / "decoder.int8.onnx"
        for i, (label, patch) in enumerate(variants.items()):
            compare(f"float32, {label}", float32, exported(root / str(i), patch), args.rounds)
        compare("int8, weight-only 8-bit products", int8, weight_only_int8(root), args.rounds)
        compare("int8, large products only", int8, large_products_int8(root), args.rounds)


if __name__ == "__main__":
    main()
