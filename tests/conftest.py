from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = ROOT / "model_repository"
DEFAULT_MODEL = "toy-en-es"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / DEFAULT_MODEL
# Where the default model's parity tests run the engine: `TRANSLATOR_TEST_DEVICE=cuda` runs them on a GPU
# (onnxruntime-gpu installed); everything else in the suite is CPU-only.
ENGINE_DEVICE = os.environ.get("TRANSLATOR_TEST_DEVICE", "cpu")
if ENGINE_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"TRANSLATOR_TEST_DEVICE must be cpu or cuda, not {ENGINE_DEVICE!r}")

WORDS = (
    "the a big red small dog cat house sees saw will see her him and with in that el la perro gato casa "
    "grande rojo pequeño ve vio verá y con en que"
).split()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised model saved as translator-train saves one (untrained: fast)."""
    import torch
    from safetensors.torch import save_file

    from model.tokenizer import build_word_level
    from model.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    vocabulary = build_word_level([" ".join(WORDS)])
    config = TransformerConfig(
        src_vocab_size=vocabulary.size,
        tgt_vocab_size=vocabulary.size,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
    )
    model = Transformer(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model": config.to_dict(), "metrics": {}}))
    vocabulary.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.export import export_checkpoint

    repository = tmp_path_factory.mktemp("repository")
    export_checkpoint(tiny_checkpoint, repository, "tiny", 1)
    return repository
