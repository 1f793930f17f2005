"""`translator-export`: a checkpoint as an encoder graph and a decoder-step graph in a model repository.

Layout, as in Triton: `<repository>/<model-name>/<version>/` holding `encoder.onnx`, `decoder.onnx`,
`tokenizer.json` and `model.json` (architecture, special ids, graph signatures, metrics, checksums).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import onnx
import torch
from torch import nn

from model.transformer import Transformer
from service.repository import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    MODEL_FORMAT,
    sha256,
)

OPSET = 17


class EncoderGraph(nn.Module):
    """Source ids and padding -> memory, each decoder layer's cross keys/values, encoder attention."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor, src_padding_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The padding mask is an input (not re-derived from pad ids), as in the step graph.
        memory, encoder_attention = self.model.encode(src_ids, src_padding_mask)
        cross_key, cross_value = self.model.cross_keys_values(memory)
        return memory, cross_key, cross_value, encoder_attention


class DecoderStepGraph(nn.Module):
    """One decoding step with a key/value cache: the past goes in, the present (one longer) comes out."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: torch.Tensor,
        past_self_key: torch.Tensor,
        past_self_value: torch.Tensor,
        cross_key: torch.Tensor,
        cross_value: torch.Tensor,
        src_padding_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return self.model.decode_step(
            tokens, past_self_key, past_self_value, cross_key, cross_value, src_padding_mask
        )


def example_inputs(model: Transformer, batch: int = 2, source: int = 5, past: int = 3) -> dict[str, tuple]:
    config = model.config
    head_dim = config.d_model // config.n_heads
    src_ids = torch.randint(4, config.src_vocab_size, (batch, source))
    src_padding_mask = torch.zeros(batch, source, dtype=torch.bool)
    src_padding_mask[0, -1] = True
    cache = (config.n_decoder_layers, batch, config.n_heads, past, head_dim)
    cross = (config.n_decoder_layers, batch, config.n_heads, source, head_dim)
    return {
        "encoder": (src_ids, src_padding_mask),
        "decoder": (
            torch.randint(4, config.tgt_vocab_size, (batch,)),
            torch.randn(cache),
            torch.randn(cache),
            torch.randn(cross),
            torch.randn(cross),
            src_padding_mask,
        ),
    }


def export_graphs(model: Transformer, out_dir: Path) -> None:
    """Both graphs with dynamic batch, source-length and past-length axes; onnx.checker must accept them."""
    model.eval()
    inputs = example_inputs(model)
    encoder_axes = {
        "src_ids": {0: "batch", 1: "source"},
        "src_padding_mask": {0: "batch", 1: "source"},
        "memory": {0: "batch", 1: "source"},
        "cross_key": {1: "batch", 3: "source"},
        "cross_value": {1: "batch", 3: "source"},
        "encoder_attention": {1: "batch", 3: "source", 4: "source"},
    }
    decoder_axes = {
        "tokens": {0: "batch"},
        "past_self_key": {1: "batch", 3: "past"},
        "past_self_value": {1: "batch", 3: "past"},
        "cross_key": {1: "batch", 3: "source"},
        "cross_value": {1: "batch", 3: "source"},
        "src_padding_mask": {0: "batch", 1: "source"},
        "log_probs": {0: "batch"},
        "present_self_key": {1: "batch", 3: "present"},
        "present_self_value": {1: "batch", 3: "present"},
        "cross_attention": {1: "batch", 4: "source"},
        "self_attention": {1: "batch", 4: "present"},
    }
    # The wrappers are put in eval mode too: the exporter restores the wrapper's training flag on every
    # submodule afterwards, which would otherwise switch dropout back on in the caller's model.
    graphs = [
        ("encoder", EncoderGraph(model).eval(), ENCODER_INPUTS, ENCODER_OUTPUTS, encoder_axes),
        ("decoder", DecoderStepGraph(model).eval(), DECODER_INPUTS, DECODER_OUTPUTS, decoder_axes),
    ]
    with torch.inference_mode():
        for name, module, input_names, output_names, axes in graphs:
            path = out_dir / f"{name}.onnx"
            torch.onnx.export(
                module,
                inputs[name],
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_checkpoint(
    checkpoint: str | Path, repository: str | Path, name: str, version: int, metrics: dict | None = None
) -> Path:
    from model.train import load_model

    model, vocabulary, meta = load_model(checkpoint)
    out_dir = Path(repository) / name / str(version)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    started = time.time()
    print(f"exporting {checkpoint} -> {out_dir}", flush=True)
    export_graphs(model, out_dir)
    shutil.copyfile(Path(checkpoint) / "tokenizer.json", out_dir / "tokenizer.json")
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
                "outputs": list(ENCODER_OUTPUTS),
            },
            "decoder": {
                "file": "decoder.onnx",
                "inputs": list(DECODER_INPUTS),
                "outputs": list(DECODER_OUTPUTS),
            },
        },
        "training": {
            "metrics": {**meta.get("metrics", {}), **(metrics or {})},
            "data": meta.get("data", {}),
            "config": meta.get("train", {}),
        },
        "checksums": {f: sha256(out_dir / f) for f in ("encoder.onnx", "decoder.onnx", "tokenizer.json")},
    }
    (out_dir / "model.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    print(
        f"exported in {time.time() - started:.1f}s: " + ", ".join(sorted(p.name for p in out_dir.iterdir()))
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="translator-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/default")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--name", default="toy-en-es")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--metrics", action="append", default=[], metavar="NAME=PATH",
                        help="evaluation results (translator-eval --json) to record in model.json under NAME")
    args = parser.parse_args(argv)
    metrics = {}
    for item in args.metrics:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--metrics expects NAME=PATH, got {item!r}")
        metrics[name] = json.loads(Path(path).read_text())
    export_checkpoint(args.checkpoint, args.repository, args.name, args.version, metrics)


if __name__ == "__main__":
    main()
