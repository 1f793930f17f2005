"""The inference engine: a model version run by onnxruntime (CUDA if present, else CPU); no torch.

The encoder runs once per padded batch (on CPU once per group of similar source lengths); the decoder-step
graph runs once per generated position over the rows that are still unfinished, with the key/value cache
passed from one step to the next.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.repository import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    ModelLoadError,
    ModelVersion,
    resolve,
)
from service.search import Hypothesis, search
from service.vocabulary import EncodedText, Vocabulary

ATTENTION_KINDS = ("cross", "decoder_self", "encoder_self")


@dataclass(frozen=True)
class TranslateOptions:
    beam_size: int = 1
    max_length: int | None = None  # generated tokens; None: 2 x source length + 10, capped by the engine
    length_penalty: float = 1.0
    replace_unknowns: bool = False
    attention: frozenset[str] = frozenset()  # any of ATTENTION_KINDS

    def __post_init__(self) -> None:
        unknown = set(self.attention) - set(ATTENTION_KINDS)
        if unknown:
            raise ValueError(
                f"unknown attention kinds {sorted(unknown)}; expected some of {list(ATTENTION_KINDS)}"
            )
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention) or self.replace_unknowns

    def search_key(self) -> tuple:
        """Options that must be equal for sentences to share a batch."""
        return (self.beam_size, self.length_penalty, self.needs_attention)


@dataclass
class Translation:
    text: str
    token_ids: list[int]  # generated ids, no <s>/</s>
    target_tokens: list[str]  # decoder tokens, one per attention row (</s> included when produced)
    source_tokens: list[str]  # encoder tokens, one per attention column (</s> included)
    score: float
    log_prob: float
    unknown_words: list[str]
    cross_attention: np.ndarray | None = None  # [L, H, T, S]
    decoder_self_attention: np.ndarray | None = None  # [L, H, T, T]
    encoder_attention: np.ndarray | None = None  # [L, H, S, S]
    extras: dict = field(default_factory=dict)


@dataclass
class DecoderState:
    self_key: np.ndarray  # [L, N, H, t, Dh]
    self_value: np.ndarray
    cross_key: np.ndarray  # [L, N, H, S, Dh]
    cross_value: np.ndarray
    src_padding_mask: np.ndarray  # [N, S] bool, True = padding


def available_providers() -> list[str]:
    return ort.get_available_providers()


def choose_providers(device: str) -> list[str]:
    """`auto` takes CUDA when onnxruntime-gpu sees a GPU; `cuda` insists on it; `cpu` never uses it."""
    available = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ModelLoadError(f"device 'cuda' asked for, but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


def make_session(path: Path, providers: list[str], threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({error})") from error


def check_signature(
    session: ort.InferenceSession, path: Path, inputs: Iterable[str], outputs: Iterable[str], described: dict
) -> None:
    """The graph must have the inputs/outputs the engine feeds and model.json promises."""
    actual_inputs = [i.name for i in session.get_inputs()]
    actual_outputs = [o.name for o in session.get_outputs()]
    if actual_inputs != list(inputs) or actual_outputs != list(outputs):
        raise ModelLoadError(
            f"{path}: graph has inputs {actual_inputs} and outputs {actual_outputs}, "
            f"expected {list(inputs)} and {list(outputs)}"
        )
    if described.get("inputs") != actual_inputs or described.get("outputs") != actual_outputs:
        raise ModelLoadError(f"{path}: its inputs/outputs do not match those listed in model.json")


class OnnxBackend:
    """The `StepBackend` of service.search over the two exported graphs."""

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        pad_id: int,
    ) -> None:
        self.encoder = encoder
        self.pad_id = pad_id
        self.decoder = decoder
        self.cache_shape = (n_layers, 0, n_heads, 0, head_dim)
        self.step_outputs = list(DECODER_OUTPUTS[:3])
        self.step_outputs_with_attention = list(DECODER_OUTPUTS)
        # On CPU the encoder's cost grows with rows x padded width, and a batch of mixed lengths is mostly
        # padding (toy test split at batch 128: 65%); on a GPU the padding is nearly free and every extra
        # run costs launches, so there the batch stays whole.
        self.group_encoder_by_length = encoder.get_providers()[0] == "CPUExecutionProvider"

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> tuple[DecoderState, np.ndarray | None]:
        padding = src_ids == self.pad_id
        wanted = ["cross_key", "cross_value"] + (["encoder_attention"] if with_attention else [])
        groups = encoder_groups((~padding).sum(axis=1)) if self.group_encoder_by_length else []
        if len(groups) <= 1:
            outputs = self.encoder.run(wanted, {"src_ids": src_ids, "src_padding_mask": padding})
        else:
            outputs = self._encode_groups(src_ids, groups, wanted)
        layers, _, heads, _, head_dim = self.cache_shape
        empty = np.zeros((layers, len(src_ids), heads, 0, head_dim), dtype=np.float32)
        state = DecoderState(empty, empty, outputs[0], outputs[1], padding)
        encoder_attention = outputs[2].transpose(1, 0, 2, 3, 4) if with_attention else None
        return state, encoder_attention

    def _encode_groups(self, src_ids: np.ndarray, groups: list[np.ndarray], wanted: list[str]
                       ) -> list[np.ndarray]:
        """The encoder run per group of rows, each cut to its own longest source, put back at full width.

        A real position's outputs do not depend on the padding after it (padded keys get exactly zero
        weight), so the tokens and attention maps are those of one whole-batch run (bitwise on the toy
        test split). Columns beyond a row's own length stay zero: they are masked everywhere downstream,
        and the search trims the encoder attention to each sentence's length.
        """
        batch, width = src_ids.shape
        layers, _, heads, _, head_dim = self.cache_shape
        outputs = [np.zeros((layers, batch, heads, width, head_dim), dtype=np.float32) for _ in range(2)]
        if len(wanted) > 2:
            outputs.append(np.zeros((layers, batch, heads, width, width), dtype=np.float32))
        for rows in groups:
            group_width = int((src_ids[rows] != self.pad_id).sum(axis=1).max())
            ids = np.ascontiguousarray(src_ids[rows, :group_width])
            results = self.encoder.run(wanted, {"src_ids": ids, "src_padding_mask": ids == self.pad_id})
            outputs[0][:, rows, :, :group_width] = results[0]
            outputs[1][:, rows, :, :group_width] = results[1]
            if len(wanted) > 2:
                outputs[2][:, rows, :, :group_width, :group_width] = results[2]
        return outputs

    def step(
        self, state: DecoderState, tokens: np.ndarray, with_attention: bool
    ) -> tuple[DecoderState, np.ndarray, np.ndarray | None, np.ndarray | None]:
        feeds = {
            "tokens": tokens,
            "past_self_key": state.self_key,
            "past_self_value": state.self_value,
            "cross_key": state.cross_key,
            "cross_value": state.cross_value,
            "src_padding_mask": state.src_padding_mask,
        }
        if with_attention:
            log_probs, key, value, cross, self_attention = self.decoder.run(
                self.step_outputs_with_attention, feeds
            )
            # [L, N, H, 1, *] -> [N, L, H, *]
            cross, self_attention = (
                cross[:, :, :, 0].transpose(1, 0, 2, 3),
                self_attention[:, :, :, 0].transpose(1, 0, 2, 3),
            )
        else:
            log_probs, key, value = self.decoder.run(self.step_outputs, feeds)
            cross = self_attention = None
        state.self_key, state.self_value = key, value
        return state, log_probs, cross, self_attention

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        mask = state.src_padding_mask[rows]
        # Trimming the source columns that no kept row uses spares the cross-attention work on padding.
        width = int((~mask).sum(axis=1).max()) if len(rows) else mask.shape[1]
        # np.take, not x[:, rows]: fancy indexing on axis 1 returns a non-contiguous array, which
        # onnxruntime copies again on every later step (measured: a batch-128 step took 15.5 ms instead of
        # 8.9 ms). The cross keys/values would then be re-copied each step until the batch ends.
        return DecoderState(
            np.take(state.self_key, rows, axis=1),
            np.take(state.self_value, rows, axis=1),
            np.take(state.cross_key[:, :, :, :width], rows, axis=1),
            np.take(state.cross_value[:, :, :, :width], rows, axis=1),
            np.ascontiguousarray(mask[:, :width]),
        )


# What one more encoder run costs on CPU, in padded source positions: onnxruntime's fixed cost per run of the
# default model (d_model 128, 3 layers) is about 0.3 ms, what 15-40 positions cost (1-2 threads).
ENCODER_RUN_COST = 32


def encoder_groups(lengths: np.ndarray, run_cost: float = ENCODER_RUN_COST) -> list[np.ndarray]:
    """Rows split into runs of similar source length, minimising padded positions + run_cost per run.

    Exact over contiguous ranges of the rows sorted by length (dynamic programming over the distinct
    lengths, at most the padded width of them).
    """
    order = np.argsort(lengths, kind="stable")
    values, counts = np.unique(lengths[order], return_counts=True)
    ends = np.concatenate([[0], np.cumsum(counts)])
    best = np.zeros(len(values) + 1)
    start = np.zeros(len(values) + 1, dtype=np.int64)
    for b in range(1, len(values) + 1):
        # Cheapest split of the first b lengths whose last run covers lengths a..b-1 (padded to values[b-1]).
        costs = best[:b] + values[b - 1] * (ends[b] - ends[:b]) + run_cost
        start[b] = int(np.argmin(costs))
        best[b] = costs[start[b]]
    groups = []
    b = len(values)
    while b > 0:
        groups.append(order[ends[start[b]]:ends[b]])
        b = int(start[b])
    return groups[::-1]


class Engine:
    """Translate texts with a model version: batches, options, attention maps, unknown-word replacement."""

    def __init__(
        self,
        model: ModelVersion,
        device: str = "auto",
        threads: int | None = None,
        max_length_limit: int = 256,
    ) -> None:
        self.model = model
        self.providers = choose_providers(device)
        self.vocabulary = Vocabulary.from_file(model.file("tokenizer.json"))
        architecture = model.architecture
        if self.vocabulary.size != architecture.tgt_vocab_size:
            raise ModelLoadError(
                f"{model.file('tokenizer.json')}: {self.vocabulary.size} tokens, but model.json "
                f"says the model has {architecture.tgt_vocab_size}"
            )
        special = model.special_ids
        ours = {
            "pad": self.vocabulary.pad_id,
            "bos": self.vocabulary.bos_id,
            "eos": self.vocabulary.eos_id,
            "unk": self.vocabulary.unk_id,
        }
        if special != ours:
            raise ModelLoadError(
                f"{model.file('model.json')}: special ids {special} differ from tokenizer.json's {ours}"
            )
        graphs = model.description["graphs"]
        encoder = make_session(model.file("encoder.onnx"), self.providers, threads)
        decoder = make_session(model.file("decoder.onnx"), self.providers, threads)
        check_signature(
            encoder, model.file("encoder.onnx"), ENCODER_INPUTS, ENCODER_OUTPUTS, graphs["encoder"]
        )
        check_signature(
            decoder, model.file("decoder.onnx"), DECODER_INPUTS, DECODER_OUTPUTS, graphs["decoder"]
        )
        self.backend = OnnxBackend(
            encoder,
            decoder,
            architecture.n_decoder_layers,
            architecture.n_heads,
            architecture.head_dim,
            self.vocabulary.pad_id,
        )
        self.provider = encoder.get_providers()[0]
        self.max_length_limit = max_length_limit
        self._check_shapes()

    @classmethod
    def load(
        cls,
        repository: str | Path,
        name: str,
        version: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        max_length_limit: int = 256,
    ) -> Engine:
        return cls(
            resolve(repository, name, version),
            device=device,
            threads=threads,
            max_length_limit=max_length_limit,
        )

    def _check_shapes(self) -> None:
        """The graphs' fixed dimensions must be the ones model.json describes (layers, heads, vocabulary)."""
        architecture = self.model.architecture
        layers, heads, head_dim = architecture.n_decoder_layers, architecture.n_heads, architecture.head_dim
        expected = {
            ("encoder.onnx", "cross_key"): [layers, None, heads, None, head_dim],
            ("decoder.onnx", "past_self_key"): [layers, None, heads, None, head_dim],
            ("decoder.onnx", "log_probs"): [None, architecture.tgt_vocab_size],
        }
        sessions = {"encoder.onnx": self.backend.encoder, "decoder.onnx": self.backend.decoder}
        for (file, name), dims in expected.items():
            session = sessions[file]
            values = {v.name: v.shape for v in [*session.get_inputs(), *session.get_outputs()]}
            actual = [d if isinstance(d, int) else None for d in values[name]]
            if actual != dims:
                raise ModelLoadError(
                    f"{self.model.file(file)}: '{name}' has dimensions {values[name]}, but "
                    f"model.json describes {layers} decoder layers, {heads} heads of size "
                    f"{head_dim} and a vocabulary of {architecture.tgt_vocab_size}"
                )

    def encode_texts(self, texts: list[str]) -> list[EncodedText]:
        return [self.vocabulary.encode_source(text) for text in texts]

    def max_length_for(self, source_length: int, options: TranslateOptions) -> int:
        """Per sentence, so that a translation does not depend on the batch it shares."""
        automatic = 2 * source_length + 10
        return min(options.max_length or automatic, self.max_length_limit)

    def search_ids(
        self,
        sources: list[list[int]],
        options: TranslateOptions,
        on_token: Callable[[int, int], None] | None = None,
        is_abandoned: Callable[[int], bool] | None = None,
    ) -> list[Hypothesis | None]:
        """Run the shared search over one padded batch of source ids."""
        width = max(len(s) for s in sources)
        src_ids = np.full((len(sources), width), self.vocabulary.pad_id, dtype=np.int64)
        for row, source in enumerate(sources):
            src_ids[row, : len(source)] = source
        return search(
            self.backend,
            src_ids,
            pad_id=self.vocabulary.pad_id,
            bos_id=self.vocabulary.bos_id,
            eos_id=self.vocabulary.eos_id,
            beam_size=options.beam_size,
            max_length=np.array([self.max_length_for(len(s), options) for s in sources]),
            length_penalty=options.length_penalty,
            with_attention=options.needs_attention,
            on_token=on_token,
            is_abandoned=is_abandoned,
        )

    def finish(self, source: EncodedText, hypothesis: Hypothesis, options: TranslateOptions) -> Translation:
        """Text, tokens and the attention maps the caller asked for, trimmed to the real lengths."""
        ids = list(hypothesis.tokens)
        target_tokens = self.vocabulary.tokens(ids) + (["</s>"] if hypothesis.finished else [])
        text = self.vocabulary.decode(ids)
        if (
            options.replace_unknowns
            and self.vocabulary.unk_id in ids
            and hypothesis.cross_attention is not None
        ):
            text = self.replace_unknowns(ids, source, hypothesis.cross_attention)
        wanted = options.attention
        return Translation(
            text=text,
            token_ids=ids,
            target_tokens=target_tokens,
            source_tokens=list(source.tokens),
            score=hypothesis.score,
            log_prob=hypothesis.log_prob,
            unknown_words=list(source.unknown_words),
            cross_attention=hypothesis.cross_attention if "cross" in wanted else None,
            decoder_self_attention=hypothesis.self_attention if "decoder_self" in wanted else None,
            encoder_attention=hypothesis.encoder_attention if "encoder_self" in wanted else None,
        )

    def replace_unknowns(self, ids: list[int], source: EncodedText, cross_attention: np.ndarray) -> str:
        """Each generated <unk> becomes the source word its mean cross-attention points to most."""
        mean = cross_attention.mean(axis=(0, 1))[:, :-1]  # the source </s> is not a word to copy
        words = []
        for position, token_id in enumerate(ids):
            if token_id == self.vocabulary.unk_id and mean.shape[1]:
                words.append(source.pieces[int(mean[position].argmax())])
            else:
                words.append(self.vocabulary.decode([token_id]))
        return " ".join(w for w in words if w)

    def translate(
        self, texts: list[str], options: TranslateOptions | None = None, batch_size: int = 64
    ) -> list[Translation]:
        """Translate a list of texts; similar lengths share a batch, results come back in input order."""
        options = options or TranslateOptions()
        sources = self.encode_texts(texts)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i].ids))
        results: list[Translation | None] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            hypotheses = self.search_ids([sources[i].ids for i in chunk], options)
            for i, hypothesis in zip(chunk, hypotheses, strict=True):
                assert hypothesis is not None  # nothing is abandoned without is_abandoned
                results[i] = self.finish(sources[i], hypothesis, options)
        return [r for r in results if r is not None]
