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


def save_tiny_checkpoint(folder: Path, positions: str) -> Path:
    """A small randomly initialised model saved as translator-train saves one (untrained: fast)."""
    import torch
    from safetensors.torch import save_file

    from model.tokenizer import build_word_level
    from model.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
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
        positions=positions,
        # Short texts still reach the logarithmic and the last buckets.
        relative_buckets=16,
        relative_max_distance=12,
    )
    model = Transformer(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model": config.to_dict(), "metrics": {}}))
    vocabulary.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with absolute (sinusoidal) positions."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), "absolute")


@pytest.fixture(scope="session")
def tiny_relative_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with relative positions (T5 buckets), the kind the default model is."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-relative-checkpoint"), "relative")


@pytest.fixture(scope="session")
def tiny_relative_repository(
    tiny_relative_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from model.export import export_checkpoint

    repository = tmp_path_factory.mktemp("relative-repository")
    export_checkpoint(tiny_relative_checkpoint, repository, "tiny", 1)
    return repository


@pytest.fixture(params=["absolute", "relative"])
def each_tiny_model(
    request: pytest.FixtureRequest,
    tiny_checkpoint: Path,
    tiny_repository: Path,
    tiny_relative_checkpoint: Path,
    tiny_relative_repository: Path,
) -> tuple[Path, Path]:
    """(checkpoint, repository holding it as "tiny") for each kind of positions: parity tests run on both."""
    if request.param == "absolute":
        return tiny_checkpoint, tiny_repository
    return tiny_relative_checkpoint, tiny_relative_repository


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.export import export_checkpoint

    repository = tmp_path_factory.mktemp("repository")
    export_checkpoint(tiny_checkpoint, repository, "tiny", 1)
    return repository
