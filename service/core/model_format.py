"""The model repository: `<repository>/<model>/<version>/` with the graphs, tokenizer.json and model.json.

Loading checks everything it can before a request arrives, and every error names the file at fault.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FORMAT = "translator-onnx-v4"
# Graph signatures. Caches and attention maps are one tensor per decoder layer (`name.{i}`, i = 0..L-1), not
# stacked [L, ...] tensors: stacking and splitting them cost the decoder-step graph a third of its kernel
# time (Concat/Split every step). Per layer i:
#   encoder outputs  cross_key.{i}, cross_value.{i}            [B, H, S, Dh]
#                    encoder_attention.{i}                     [B, H, S, S]    (encoder layer i)
#   decoder inputs   past_self_key.{i}, past_self_value.{i}    [B, H, t, Dh]
#                    cross_key.{i}, cross_value.{i}            [B, H, S, Dh]
#   decoder outputs  present_self_key.{i}, present_self_value.{i}  [B, H, t+1, Dh]
#                    cross_attention.{i}                       [B, H, 1, S]
#                    self_attention.{i}                        [B, H, 1, t+1]
#   decoder_fixed    (optional) the decoder step on caches of a fixed capacity C, written in place:
#     inputs         cache_self_key.{i}, cache_self_value.{i}  [B, H, C, Dh]; cache_entries [C] = 0..C-1;
#                    cache_slots [B, H, 3] = (b, h, positions[b]); the decoder's other inputs
#     outputs        written_self_key.{i}, written_self_value.{i}  [B, H, C, Dh]: the caches with the new
#                    entries (a ScatterND: bound to the input cache, nothing else is copied);
#                    self_attention.{i} [B, H, 1, C]; log_probs, cross_attention as the decoder's
#   select inputs    rows [N] int64, cache_start [1] int64, source_width [1] int64,
#                    self_key.{i}, self_value.{i} [B, H, t, Dh], cross_key.{i}, cross_value.{i} [B, H, S, Dh]
#   select outputs   kept_self_key.{i}, kept_self_value.{i}    [N, H, t - cache_start, Dh]
#                    kept_cross_key.{i}, kept_cross_value.{i}  [N, H, source_width, Dh]
ENCODER_INPUTS = ("src_ids", "src_padding_mask")


def per_layer(names: tuple[str, ...], n_layers: int) -> tuple[str, ...]:
    """("a", "b"), 2 -> ("a.0", "b.0", "a.1", "b.1")"""
    return tuple(f"{name}.{i}" for i in range(n_layers) for name in names)


def encoder_outputs(n_encoder_layers: int, n_decoder_layers: int) -> tuple[str, ...]:
    return (
        "memory",
        *per_layer(("cross_key", "cross_value"), n_decoder_layers),
        *per_layer(("encoder_attention",), n_encoder_layers),
    )


def decoder_inputs(n_layers: int) -> tuple[str, ...]:
    return (
        "tokens",
        *per_layer(("past_self_key", "past_self_value"), n_layers),
        *per_layer(("cross_key", "cross_value"), n_layers),
        "src_padding_mask",
        "positions",
    )


def decoder_outputs(n_layers: int) -> tuple[str, ...]:
    return (
        "log_probs",
        *per_layer(("present_self_key", "present_self_value"), n_layers),
        *per_layer(("cross_attention",), n_layers),
        *per_layer(("self_attention",), n_layers),
    )


def fixed_step_inputs(n_layers: int) -> tuple[str, ...]:
    return (
        "tokens",
        *per_layer(("cache_self_key", "cache_self_value"), n_layers),
        *per_layer(("cross_key", "cross_value"), n_layers),
        "src_padding_mask",
        "positions",
        "cache_entries",
        "cache_slots",
    )


def fixed_step_outputs(n_layers: int) -> tuple[str, ...]:
    return (
        "log_probs",
        *per_layer(("written_self_key", "written_self_value"), n_layers),
        *per_layer(("cross_attention",), n_layers),
        *per_layer(("self_attention",), n_layers),
    )


def select_inputs(n_layers: int) -> tuple[str, ...]:
    return (
        "rows",
        "cache_start",
        "source_width",
        *per_layer(("self_key", "self_value", "cross_key", "cross_value"), n_layers),
    )


def select_outputs(n_layers: int) -> tuple[str, ...]:
    return per_layer(("kept_self_key", "kept_self_value", "kept_cross_key", "kept_cross_value"), n_layers)


GRAPH_FILES = ("encoder.onnx", "decoder.onnx", "select.onnx")
# Optional, float32 only: the step whose shapes are fixed for a batch (service/engine/fixed_step.py).
FIXED_STEP = "decoder_fixed"
# The decoder steps an engine can run: `dynamic` (decoder.onnx, caches grown by one entry per step) or
# `fixed` (decoder_fixed.onnx).
STEP_GRAPHS = ("dynamic", "fixed")
REQUIRED_FILES = ("model.json", *GRAPH_FILES, "tokenizer.json")
# Precisions a model version may offer. float32 is the graphs above; every other one is a second encoder and
# decoder beside them, named in model.json's "precisions" (`{"int8": {"encoder": FILE, "decoder": FILE}}`);
# select.onnx only gathers and slices the caches, so one serves all. int8 is for CPUs, float16 for GPUs.
FLOAT32 = "float32"
PRECISIONS = (FLOAT32, "int8", "float16")
PRECISION_GRAPHS = ("encoder", "decoder")


class ModelLoadError(RuntimeError):
    """A model version that cannot be served; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Architecture:
    d_model: int
    n_heads: int
    n_encoder_layers: int
    n_decoder_layers: int
    d_ff: int
    src_vocab_size: int
    tgt_vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    description: dict[str, Any]
    architecture: Architecture
    precision: str = FLOAT32

    def file(self, name: str) -> Path:
        return self.path / name

    def graph_file(self, graph: str) -> Path:
        """The file of graph `encoder`, `decoder` or `select` at this version's precision."""
        if self.precision not in offered_precisions(self.description):
            raise ModelLoadError(f"{self.path / 'model.json'}: no graphs for precision {self.precision!r}")
        return self.path / graph_file(self.description, self.precision, graph)

    def fixed_step_file(self) -> Path:
        """decoder_fixed.onnx, checked against model.json; a clear error where this version has none."""
        path = self.path / f"{FIXED_STEP}.onnx"
        if FIXED_STEP not in self.description["graphs"]:
            raise ModelLoadError(
                f"{self.path / 'model.json'}: this version has no fixed-shape step graph ({path.name}; "
                "translator-export writes it)"
            )
        if self.precision != FLOAT32:
            raise ModelLoadError(f"{path}: the fixed-shape step is float32 only, not {self.precision}")
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing (model.json names it)")
        if sha256(path) != self.description["checksums"][path.name]:
            raise ModelLoadError(f"{path}: checksum does not match model.json (corrupt or replaced)")
        return path

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.description["special_ids"])

    @property
    def max_positions(self) -> int | None:
        """The model's position table: no source or target may be longer (None: not recorded)."""
        positions = self.description["architecture"].get("max_positions")
        return positions if isinstance(positions, int) else None

    @functools.cached_property
    def max_training_source_tokens(self) -> int | None:
        """The longest source the model was trained on, in source ids with </s> (None: not recorded): a
        longer text is beyond what it has seen, and answers say so."""
        value = self.description.get("training", {}).get("max_source_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.description.get("training", {}).get("metrics", {}))


def available_versions(repository: Path, name: str) -> list[int]:
    folder = repository / name
    if not folder.is_dir():
        known = sorted(p.name for p in repository.iterdir() if p.is_dir()) if repository.is_dir() else []
        raise ModelLoadError(
            f"{folder}: no such model in repository {repository} (models there: {known or 'none'})"
        )
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
    versions = (p.name for p in folder.iterdir() if p.is_dir())
    return sorted(int(name) for name in versions if name.isascii() and name.isdigit())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def offered_precisions(description: dict[str, Any]) -> list[str]:
    return [FLOAT32, *(p for p in PRECISIONS if p in description.get("precisions", {}))]


def graph_file(description: dict[str, Any], precision: str, graph: str) -> str:
    """The file of `graph` at `precision` (select.onnx, and every float32 graph, by their own names)."""
    return description.get("precisions", {}).get(precision, {}).get(graph, f"{graph}.onnx")


def loaded_files(description: dict[str, Any], precision: str) -> list[str]:
    """The files a version at `precision` reads: its encoder and decoder, select.onnx and tokenizer.json."""
    return [graph_file(description, precision, graph) for graph in ("encoder", "decoder", "select")] + [
        "tokenizer.json"
    ]


def resolve(
    repository: str | Path,
    name: str,
    version: int | None = None,
    verify_checksums: bool = True,
    precision: str = FLOAT32,
) -> ModelVersion:
    """Find a model version (the newest when none is named) at a precision it offers, and check its
    description and files."""
    repository = Path(repository)
    versions = available_versions(repository, name)
    if version is None:
        if not versions:
            raise ModelLoadError(f"{repository / name}: no numbered version folders")
        version = versions[-1]
    path = repository / name / str(version)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: version {version} does not exist (versions: {versions})")
    for file in REQUIRED_FILES:
        if not (path / file).is_file():
            raise ModelLoadError(
                f"{path / file}: missing (a model version needs {', '.join(REQUIRED_FILES)})"
            )
    description = read_description(path / "model.json")
    offered = offered_precisions(description)
    if precision not in offered:
        raise ModelLoadError(
            f"{path / 'model.json'}: this version offers precisions {offered}, not {precision!r} "
            "(translator-export writes them)"
        )
    for file in description.get("precisions", {}).get(precision, {}).values():
        if not (path / file).is_file():
            raise ModelLoadError(f"{path / file}: missing (model.json names it for precision {precision})")
    if verify_checksums:  # the files this precision loads: another precision's graphs may be absent or stale
        for file in loaded_files(description, precision):
            expected = description["checksums"][file]
            if (path / file).is_file() and sha256(path / file) != expected:
                raise ModelLoadError(
                    f"{path / file}: checksum does not match model.json (corrupt or replaced)"
                )
    architecture_fields = {k: description["architecture"][k] for k in Architecture.__dataclass_fields__}
    return ModelVersion(name, version, path, description, Architecture(**architecture_fields), precision)


def graph_file_name(file: object) -> bool:
    """A reduced-precision graph is a `.onnx` file in the version folder itself, not a float32 one."""
    return (
        isinstance(file, str) and file.endswith(".onnx") and file not in GRAPH_FILES
        and Path(file).name == file and "\\" not in file
    )


def read_description(path: Path) -> dict[str, Any]:
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(description, dict) or description.get("format") != MODEL_FORMAT:
        raise ModelLoadError(f"{path}: not a {MODEL_FORMAT} model description")
    for key in ("architecture", "special_ids", "vocabulary_size", "graphs", "checksums"):
        if not isinstance(description.get(key), dict):
            raise ModelLoadError(f"{path}: missing or malformed '{key}'")
    for graph in GRAPH_FILES:
        name = graph.removesuffix(".onnx")
        if not isinstance(description["graphs"].get(name), dict):
            raise ModelLoadError(f"{path}: missing or malformed 'graphs.{name}'")
    precisions = description.get("precisions", {})
    if not isinstance(precisions, dict):
        raise ModelLoadError(f"{path}: malformed 'precisions' (an object of precision -> graph files)")
    extra_files = []
    reduced = [p for p in PRECISIONS if p != FLOAT32]
    for precision, files in precisions.items():
        if precision not in reduced:
            raise ModelLoadError(f"{path}: unknown precision {precision!r} (known: {reduced})")
        if not isinstance(files, dict) or sorted(files) != sorted(PRECISION_GRAPHS) or not all(
            graph_file_name(file) for file in files.values()
        ):
            raise ModelLoadError(
                f"{path}: 'precisions.{precision}' must name a file for each of {list(PRECISION_GRAPHS)}"
            )
        extra_files.extend(files.values())
    if FIXED_STEP in description["graphs"]:
        fixed = description["graphs"][FIXED_STEP]
        if not isinstance(fixed, dict) or fixed.get("file") != f"{FIXED_STEP}.onnx":
            raise ModelLoadError(f"{path}: malformed 'graphs.{FIXED_STEP}' (its file is {FIXED_STEP}.onnx)")
        extra_files.append(fixed["file"])
    checked = description["checksums"]
    unchecked = [file for file in (*GRAPH_FILES, "tokenizer.json", *extra_files) if file not in checked]
    if unchecked:
        raise ModelLoadError(f"{path}: 'checksums' lacks {unchecked}")
    missing = [
        k
        for k in Architecture.__dataclass_fields__
        if not isinstance(description["architecture"].get(k), int)
    ]
    if missing:
        raise ModelLoadError(f"{path}: architecture lacks integer fields {missing}")
    for key in ("pad", "bos", "eos", "unk"):
        if not isinstance(description["special_ids"].get(key), int):
            raise ModelLoadError(f"{path}: special_ids lacks '{key}'")
    return description
