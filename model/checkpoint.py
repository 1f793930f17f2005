"""Checkpoint folders: `model.safetensors` (weights), `config.json` (model and training configuration,
vocabulary, metrics) and `tokenizer.json`; `last.*` files hold what `translator-train --resume` needs.
No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.transformer import Transformer, TransformerConfig
from service.core.vocabulary import Vocabulary

# The checkpoint the shipped default model (model_repository/toy-en-es/1) was exported from.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "toy-en-es"


def save_checkpoint(out_dir: Path, prefix: str, model: Transformer, meta: dict) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / f"{prefix}.safetensors")
    (out_dir / ("config.json" if prefix == "model" else f"{prefix}.json")).write_text(
        json.dumps(meta, indent=2)
    )


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value for index, entry in state["state"].items() for key, value in entry.items()
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return {"param_groups": state["param_groups"]}


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(path).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def load_model(checkpoint: str | Path) -> tuple[Transformer, Vocabulary, dict]:
    """Best weights of a checkpoint folder, in eval mode. A folder that is not a checkpoint, or a file of it
    that is missing or unreadable, raises ValueError naming the file."""
    folder = Path(checkpoint)
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such checkpoint folder (translator-train writes one)")
    try:
        meta = json.loads(config.read_text())
        model = Transformer(TransformerConfig.from_dict(meta["model"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config}: not a translator-train checkpoint config ({error!r})") from error
    try:
        model.load_state_dict(load_file(weights))
    except Exception as error:  # safetensors' own error type for a truncated or foreign file
        raise ValueError(f"{weights}: cannot load the weights ({error})") from error
    model.eval()
    return model, Vocabulary.from_file(folder / "tokenizer.json"), meta
