"""`translator-export`: a checkpoint as an encoder graph and a decoder-step graph in a model repository.

Layout, as in Triton: `<repository>/<model-name>/<version>/` holding `encoder.onnx`, `decoder.onnx`,
`select.onnx` (the decoder state's row selection, so that caches on a GPU never cross to the host),
`decoder_fixed.onnx` (the decoder step on caches of a fixed size written in place, every shape fixed for a
batch: what a GPU's captured CUDA graphs run, service/engine/fixed_step.py), `tokenizer.json` and
`model.json` (architecture, special ids, graph signatures, metrics, checksums), and
beside them the same two graphs with int8 weights (`encoder.int8.onnx`, `decoder.int8.onnx`:
`--precision int8` on CPU, docs/decisions/precisions.md) and in float16 (`*.float16.onnx`: `--precision
float16`, for GPUs).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from model.checkpoint import load_model
from model.transformer import Transformer
from service.core.cli import positive_int, run_command
from service.core.model_format import (
    ENCODER_INPUTS,
    FIXED_STEP,
    FLOAT32,
    GRAPH_FILES,
    MODEL_FORMAT,
    PRECISION_GRAPHS,
    PRECISIONS,
    decoder_inputs,
    decoder_outputs,
    encoder_outputs,
    fixed_step_inputs,
    fixed_step_outputs,
    select_inputs,
    select_outputs,
    sha256,
)

OPSET = 17
# The IR version of opset 17 (what the PyTorch exporter writes): the onnx package's newest is newer than
# onnxruntime releases accept.
IR_VERSION = 8


class EncoderGraph(nn.Module):
    """Source ids and padding -> memory, each decoder layer's cross keys/values, each encoder layer's
    attention (one output per layer: see service.core.model_format for the signature)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor, src_padding_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The padding mask is an input (not re-derived from pad ids), as in the step graph.
        memory, cross_keys, cross_values, encoder_attention = self.model.encode_rows(
            src_ids, src_padding_mask
        )
        return (
            memory,
            *[t for pair in zip(cross_keys, cross_values, strict=True) for t in pair],
            *encoder_attention,
        )


def flat_step_outputs(
    log_probs: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    cross_attention: list[torch.Tensor],
    self_attention: list[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """A step's results in the graphs' output order: log-probs, each layer's key and value, the maps."""
    return (
        log_probs,
        *[t for pair in zip(keys, values, strict=True) for t in pair],
        *cross_attention,
        *self_attention,
    )


class DecoderStepGraph(nn.Module):
    """One decoding step with a key/value cache: the past goes in, the present (one longer) comes out.

    Inputs and outputs are flat, one tensor per layer, in the order of service.core.model_format's
    decoder_inputs / decoder_outputs.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.model.config.n_decoder_layers
        past, cross = rest[: 2 * layers], rest[2 * layers : 4 * layers]
        src_padding_mask, positions = rest[-2], rest[-1]
        return flat_step_outputs(*self.model.decode_step_layers(
            tokens, list(past[0::2]), list(past[1::2]), list(cross[0::2]), list(cross[1::2]),
            src_padding_mask, positions,
        ))


class DecoderFixedStepGraph(nn.Module):
    """The decoder step on caches of a fixed capacity, written in place (Transformer.
    decode_step_in_place_layers); signature: service.core.model_format's fixed_step_inputs / outputs."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.model.config.n_decoder_layers
        caches, cross = rest[: 2 * layers], rest[2 * layers : 4 * layers]
        src_padding_mask, positions, cache_entries, cache_slots = rest[4 * layers :]
        return flat_step_outputs(*self.model.decode_step_in_place_layers(
            tokens, list(caches[0::2]), list(caches[1::2]), list(cross[0::2]), list(cross[1::2]),
            src_padding_mask, positions, cache_entries, cache_slots,
        ))


def example_inputs(model: Transformer, batch: int = 2, source: int = 5, past: int = 3) -> dict[str, tuple]:
    config = model.config
    layers = config.n_decoder_layers
    src_ids = torch.randint(4, config.src_vocab_size, (batch, source))
    src_padding_mask = torch.zeros(batch, source, dtype=torch.bool)
    src_padding_mask[0, -1] = True
    cache = (batch, config.n_heads, past, config.head_dim)
    cross = (batch, config.n_heads, source, config.head_dim)
    capacity = (batch, config.n_heads, past + 4, config.head_dim)
    fixed_positions = torch.tensor([past, 1] + [past] * (batch - 2))
    return {
        "encoder": (src_ids, src_padding_mask),
        "decoder": (
            torch.randint(4, config.tgt_vocab_size, (batch,)),
            *[torch.randn(cache) for _ in range(2 * layers)],
            *[torch.randn(cross) for _ in range(2 * layers)],
            src_padding_mask,
            torch.tensor([past, 1] + [past] * (batch - 2)),  # row 1 joined later: left-padded cache
        ),
        FIXED_STEP: (
            torch.randint(4, config.tgt_vocab_size, (batch,)),
            *[torch.randn(capacity) for _ in range(2 * layers)],
            *[torch.randn(cross) for _ in range(2 * layers)],
            src_padding_mask,
            fixed_positions,
            torch.arange(capacity[2]),
            torch.stack(torch.broadcast_tensors(
                torch.arange(batch)[:, None], torch.arange(config.n_heads)[None, :], fixed_positions[:, None]
            ), dim=-1),
        ),
    }


def dynamic_axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Batch, source and cache-length axes of every graph input/output, by name (the part before `.i`)."""
    by_kind = {
        "src_ids": {0: "batch", 1: "source"},
        "src_padding_mask": {0: "batch", 1: "source"},
        "memory": {0: "batch", 1: "source"},
        "encoder_attention": {0: "batch", 2: "source", 3: "source"},
        "tokens": {0: "batch"},
        "positions": {0: "batch"},
        "past_self_key": {0: "batch", 2: "past"},
        "past_self_value": {0: "batch", 2: "past"},
        "cross_key": {0: "batch", 2: "source"},
        "cross_value": {0: "batch", 2: "source"},
        "log_probs": {0: "batch"},
        "present_self_key": {0: "batch", 2: "present"},
        "present_self_value": {0: "batch", 2: "present"},
        "cross_attention": {0: "batch", 3: "source"},
        "self_attention": {0: "batch", 3: "present"},
        "cache_self_key": {0: "batch", 2: "capacity"},
        "cache_self_value": {0: "batch", 2: "capacity"},
        "written_self_key": {0: "batch", 2: "capacity"},
        "written_self_value": {0: "batch", 2: "capacity"},
        "cache_entries": {0: "capacity"},
        "cache_slots": {0: "batch"},
    }
    return {name: by_kind[name.split(".")[0]] for name in names}


def export_graphs(model: Transformer, out_dir: Path) -> None:
    """Both graphs with dynamic batch, source-length and past-length axes; onnx.checker must accept them."""
    model.eval()
    config = model.config
    inputs = example_inputs(model)
    signatures = {
        "encoder": (ENCODER_INPUTS, encoder_outputs(config.n_encoder_layers, config.n_decoder_layers)),
        "decoder": (decoder_inputs(config.n_decoder_layers), decoder_outputs(config.n_decoder_layers)),
        FIXED_STEP: (fixed_step_inputs(config.n_decoder_layers), fixed_step_outputs(config.n_decoder_layers)),
    }
    # The wrappers are put in eval mode too: the exporter restores the wrapper's training flag on every
    # submodule afterwards, which would otherwise switch dropout back on in the caller's model.
    modules = {
        "encoder": EncoderGraph(model).eval(),
        "decoder": DecoderStepGraph(model).eval(),
        FIXED_STEP: DecoderFixedStepGraph(model).eval(),
    }
    with torch.inference_mode():
        for name, module in modules.items():
            input_names, output_names = signatures[name]
            path = out_dir / f"{name}.onnx"
            torch.onnx.export(
                module,
                inputs[name],
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes(input_names + output_names),
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def select_graph(n_layers: int) -> onnx.ModelProto:
    """The search's `select` on the decoder state: keep / reorder / repeat rows (Gather on the batch axis),
    dropping the self-attention cache entries before `cache_start` (left padding no kept row needs) and the
    cross keys/values beyond `source_width` (source padding no kept row needs). Written node by node: it
    has no weights, and onnxruntime runs it where the caches are, so on a GPU they never visit the host."""
    nodes = []
    inputs = [
        helper.make_tensor_value_info("rows", TensorProto.INT64, ["kept"]),
        helper.make_tensor_value_info("cache_start", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("source_width", TensorProto.INT64, [1]),
    ]
    outputs = []
    constants = [
        helper.make_tensor("length_axis", TensorProto.INT64, [1], [2]),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("to_the_end", TensorProto.INT64, [1], [2**63 - 1]),
    ]
    for name, kept in zip(select_inputs(n_layers)[3:], select_outputs(n_layers), strict=True):
        if "self" in name:  # a self-attention cache: [cache_start, end) of its length axis
            length, start, end = "past", "cache_start", "to_the_end"
        else:  # cross keys/values: [0, source_width) of the source axis
            length, start, end = "source", "zero", "source_width"
        inputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "heads", length, "head_dim"])
        )
        outputs.append(
            helper.make_tensor_value_info(kept, TensorProto.FLOAT, ["kept", "heads", None, "head_dim"])
        )
        nodes.append(helper.make_node("Gather", [name, "rows"], [f"{kept}.rows"], axis=0))
        nodes.append(helper.make_node("Slice", [f"{kept}.rows", start, end, "length_axis"], [kept]))
    graph = helper.make_graph(nodes, "select", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="translator-export", ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def training_max_source_tokens(data: dict[str, Any]) -> int | None:
    """The longest training source in source ids, </s> included: recorded by training; for a toy-language
    checkpoint from before it was recorded, the sampler's bound (TRAIN_MAX_WORDS words, an id each, </s>)."""
    recorded = data.get("max_source_tokens")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    if data.get("kind") == "toy":
        from model.toy_language import TRAIN_MAX_WORDS

        return TRAIN_MAX_WORDS + 1
    return None


def quantize_int8(source: Path, target: Path) -> None:
    """A graph with int8 weights (onnxruntime's dynamic quantization): every matrix product with a constant
    weight in int8, one scale per tensor, its activations quantized as it runs; the tables read by a lookup
    (token embeddings, relative-position biases) stored in uint8. Products of two activations (query x key,
    weights x value), softmax and layer norms stay float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    # The quantizer advises its shape pre-processing on every call; measured on our graphs, it changes
    # neither the tokens nor the speed (docs/decisions/precisions.md), so the advice is not shown.
    advice = _DropMessage("Please consider to run pre-processing")
    root.addFilter(advice)
    try:
        # MatMulConstBOnly: products of two activations stay float32.
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True}
        )
    finally:
        root.removeFilter(advice)


def convert_float16(source: Path, target: Path) -> None:
    """A graph with weights and computation in float16, its inputs and outputs float32, so that the engine
    feeds and reads it as it does the float32 graph (each step casts its caches at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    sort_nodes(converted.graph)  # the converter appends its input casts after the nodes that read them
    onnx.checker.check_model(converted, full_check=True)
    onnx.save(converted, str(target))


# How each reduced precision is made from a float32 graph (`<graph>.onnx` -> `<graph>.<precision>.onnx`).
CONVERTERS = {"int8": quantize_int8, "float16": convert_float16}


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order a graph's nodes so that each comes after the nodes whose outputs it reads, as ONNX requires:
    by rounds, each taking (in their old order) the nodes whose inputs are all available."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError(f"graph {graph.name}: a cycle or an undefined input among {len(pending)} nodes")
        for node in ready:
            available.update(node.output)
        ordered += ready
        taken = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def export_checkpoint(
    checkpoint: str | Path,
    repository: str | Path,
    name: str,
    version: int,
    metrics: dict | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
) -> Path:
    model, vocabulary, meta = load_model(checkpoint)
    out_dir = Path(repository) / name / str(version)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    started = time.time()
    print(f"exporting {checkpoint} -> {out_dir}", flush=True)
    export_graphs(model, out_dir)
    onnx.save(select_graph(model.config.n_decoder_layers), str(out_dir / "select.onnx"))
    shutil.copyfile(Path(checkpoint) / "tokenizer.json", out_dir / "tokenizer.json")
    variants = {
        precision: {graph: f"{graph}.{precision}.onnx" for graph in PRECISION_GRAPHS}
        for precision in CONVERTERS if precision in precisions
    }
    for precision, files in variants.items():
        for graph, file in files.items():
            CONVERTERS[precision](out_dir / f"{graph}.onnx", out_dir / file)
    variant_files = [file for files in variants.values() for file in files.values()]
    config = model.config
    description = {
        "format": MODEL_FORMAT,
        "name": name,
        "version": version,
        "architecture": config.to_dict(),
        "special_ids": {
            "pad": vocabulary.pad_id,
            "bos": vocabulary.bos_id,
            "eos": vocabulary.eos_id,
            "unk": vocabulary.unk_id,
        },
        "vocabulary_size": {"source": config.src_vocab_size, "target": config.tgt_vocab_size},
        "graphs": {
            "encoder": {
                "file": "encoder.onnx",
                "inputs": list(ENCODER_INPUTS),
                "outputs": list(encoder_outputs(config.n_encoder_layers, config.n_decoder_layers)),
            },
            "decoder": {
                "file": "decoder.onnx",
                "inputs": list(decoder_inputs(config.n_decoder_layers)),
                "outputs": list(decoder_outputs(config.n_decoder_layers)),
            },
            "select": {
                "file": "select.onnx",
                "inputs": list(select_inputs(config.n_decoder_layers)),
                "outputs": list(select_outputs(config.n_decoder_layers)),
            },
            FIXED_STEP: {
                "file": f"{FIXED_STEP}.onnx",
                "inputs": list(fixed_step_inputs(config.n_decoder_layers)),
                "outputs": list(fixed_step_outputs(config.n_decoder_layers)),
            },
        },
        "training": {
            "metrics": {**meta.get("metrics", {}), **(metrics or {})},
            "data": meta.get("data", {}),
            "config": meta.get("train", {}),
            "max_source_tokens": training_max_source_tokens(meta.get("data", {})),
        },
        "precisions": variants,
        "checksums": {
            f: sha256(out_dir / f)
            for f in (*GRAPH_FILES, f"{FIXED_STEP}.onnx", "tokenizer.json", *variant_files)
        },
    }
    (out_dir / "model.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    print(
        f"exported in {time.time() - started:.1f}s: " + ", ".join(sorted(p.name for p in out_dir.iterdir()))
    )
    return out_dir


def model_name(text: str) -> str:
    """A model's folder name in the repository: one path component (no separator, not '.' or '..')."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or text != text.strip():
        raise argparse.ArgumentTypeError(f"a model name is one folder name, got {text!r}")
    return text


def precision_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in PRECISIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"precisions are among {', '.join(PRECISIONS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    run_command("translator-export", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="translator-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/default")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--name", type=model_name, default="toy-en-es")
    parser.add_argument("--version", type=positive_int, default=1)
    parser.add_argument("--metrics", action="append", default=[], metavar="NAME=PATH",
                        help="evaluation results (translator-eval --json) to record in model.json under NAME")
    parser.add_argument("--precisions", type=precision_list, default=PRECISIONS,
                        help=f"precisions to export, separated by commas (default and choices: "
                        f"{','.join(PRECISIONS)}; {FLOAT32} is always exported)")
    args = parser.parse_args(argv)
    metrics = {}
    for item in args.metrics:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--metrics expects NAME=PATH, got {item!r}")
        try:
            metrics[name] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"--metrics {name}={path}: {error}") from error
    target = Path(args.repository) / args.name / str(args.version)
    if target.exists():
        print(f"translator-export: replacing {target}", file=sys.stderr)
    export_checkpoint(args.checkpoint, args.repository, args.name, args.version, metrics, args.precisions)


if __name__ == "__main__":
    main()
