"""`translator-eval`: BLEU, chrF and exact match on any split, and cross-attention alignment error (AER)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import sacrebleu
import torch

from model.checkpoint import DEFAULT_CHECKPOINT, load_model
from model.data import Example, read_tsv, toy_split
from model.decoding import translate_ids
from model.toy_language import SPLIT_SEEDS
from model.transformer import Transformer
from service.core.cli import finite_float, input_file, output_file, positive_int, run_command
from service.core.search import Hypothesis
from service.core.text import model_target_positions, split_words
from service.core.vocabulary import Vocabulary


@dataclass
class TextTranslation:
    text: str
    hypothesis: Hypothesis


def translate_texts(
    model: Transformer,
    vocabulary: Vocabulary,
    texts: list[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 64,
) -> list[TextTranslation]:
    """Translate with the shared search; sentences are sorted by length so batches carry little padding."""
    encoded = [vocabulary.encode_source(text) for text in texts]
    sources = [source.ids for source in encoded]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    results: list[TextTranslation | None] = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        hypotheses = translate_ids(
            model, [sources[i] for i in chunk], beam_size=beam_size, length_penalty=length_penalty
        )
        for i, hypothesis in zip(chunk, hypotheses, strict=True):
            results[i] = TextTranslation(vocabulary.decode(hypothesis.tokens, encoded[i]), hypothesis)
    return [r for r in results if r is not None]


def copy_scores(vocabulary: Vocabulary, sources: list[str], hypotheses: list[str]) -> dict[str, float | int]:
    """How many of the sources' names and numbers (the text rules' slots) the translations carry unchanged."""
    total = copied = 0
    for source, hypothesis in zip(sources, hypotheses, strict=True):
        prepared = vocabulary.encode_source(source).prepared
        if prepared is None:
            continue
        words = Counter(split_words(hypothesis))
        for value in prepared.slots.values():
            total += 1
            copied += words[value] > 0
    return {"names_and_numbers": total, "copied": round(copied / total, 4) if total else 1.0}


def exact_match_by_length(sources: list[str], hypotheses: list[str], references: list[str],
                          width: int = 10) -> dict[str, float]:
    """Exact match per band of source length in tokens (words and marks): "31-40": 0.97."""
    bands: dict[int, list[bool]] = {}
    for source, hypothesis, reference in zip(sources, hypotheses, references, strict=True):
        bands.setdefault((len(split_words(source)) - 1) // width, []).append(hypothesis == reference)
    return {f"{band * width + 1}-{band * width + width}": round(sum(hits) / len(hits), 4)
            for band, hits in sorted(bands.items())}


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    return {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
        "exact_match": round(
            sum(h == r for h, r in zip(hypotheses, references, strict=True)) / len(references), 4
        ),
    }


@torch.inference_mode()
def forced_cross_attention(model: Transformer, vocabulary: Vocabulary, example: Example) -> np.ndarray:
    """Cross-attention [L, H, T, S] while the decoder reads the reference; row j predicts word j."""
    source = vocabulary.encode_source(example.source)
    src = torch.tensor([source.ids])
    target = vocabulary.encode_target(example.target, source)
    memory, _ = model.encode(src)
    cross_key, cross_value = model.cross_keys_values(memory)
    n_layers, _, n_heads, _, head_dim = cross_key.shape
    self_key = torch.zeros(n_layers, 1, n_heads, 0, head_dim)
    self_value = torch.zeros_like(self_key)
    padding = src == vocabulary.pad_id
    rows = []
    for token in target[:-2]:  # steps that predict the words, not the final </s>
        _, self_key, self_value, cross, _ = model.decode_step(
            torch.tensor([token]), self_key, self_value, cross_key, cross_value, padding
        )
        rows.append(cross[:, 0, :, 0, :])
    return torch.stack(rows, dim=2).numpy()


def gold_links(vocabulary: Vocabulary, example: Example) -> set[tuple[int, int]]:
    """(source token, target row) links of a reference, rows counted as the model writes the target (with
    text rules it does not write opening marks, so their rows are not its rows)."""
    alignment = example.alignment or ()
    rows = model_target_positions(example.target) if vocabulary.text_rules else range(len(alignment))
    return {(i, row) for row, j in enumerate(rows) for i in alignment[j]}


def alignment_error_rate(predicted: list[set[tuple[int, int]]], gold: list[set[tuple[int, int]]]) -> float:
    """AER with every gold link counted as sure: 1 - 2|A & S| / (|A| + |S|)."""
    hits = sum(len(a & s) for a, s in zip(predicted, gold, strict=True))
    total = sum(len(a) + len(s) for a, s in zip(predicted, gold, strict=True))
    return 1.0 - 2.0 * hits / total


def links_from_attention(attention: np.ndarray) -> set[tuple[int, int]]:
    """Each target word links to the source word it attends to most (the source </s> is not a word)."""
    words = attention[:, :-1]
    return {(int(i), j) for j, i in enumerate(words.argmax(axis=1))}


def attention_alignment(model: Transformer, vocabulary: Vocabulary, examples: list[Example]) -> dict:
    """AER of every layer/head and of the average of all heads, against the gold alignments."""
    gold = [gold_links(vocabulary, e) for e in examples]
    maps = [forced_cross_attention(model, vocabulary, e) for e in examples]
    n_layers, n_heads = maps[0].shape[:2]
    per_head = np.array(
        [
            [
                alignment_error_rate([links_from_attention(m[layer, head]) for m in maps], gold)
                for head in range(n_heads)
            ]
            for layer in range(n_layers)
        ]
    )
    best_layer, best_head = np.unravel_index(per_head.argmin(), per_head.shape)
    average = alignment_error_rate([links_from_attention(m.mean(axis=(0, 1))) for m in maps], gold)
    return {
        "aer_best_head": round(float(per_head.min()), 4),
        "best_layer": int(best_layer),
        "best_head": int(best_head),
        "aer_all_heads_average": round(float(average), 4),
        "aer_per_layer_head": per_head.round(4).tolist(),
    }


def load_examples(split: str, tsv: str | None, seed: int | None, limit: int | None) -> list[Example]:
    examples = read_tsv(tsv) if tsv else toy_split(split, size=limit, seed=seed)
    return examples[:limit] if limit else examples


def main(argv: list[str] | None = None) -> None:
    run_command("translator-eval", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="translator-eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        default=str(DEFAULT_CHECKPOINT),
        help="checkpoint folder from translator-train (default: the shipped default model's, "
        "checkpoints/toy-en-es)",
    )
    parser.add_argument("--split", default="test", choices=list(SPLIT_SEEDS))
    parser.add_argument("--seed", type=int, help="sample the split from this seed instead of its own")
    parser.add_argument("--tsv", type=input_file,
                        help="evaluate on this `source<TAB>target` file instead of a toy split")
    parser.add_argument("--limit", type=positive_int, help="evaluate on the first N pairs only")
    parser.add_argument("--beam-size", type=positive_int, default=1)
    parser.add_argument("--length-penalty", type=finite_float, default=1.0)
    parser.add_argument("--aer-limit", type=positive_int, default=300,
                        help="pairs used for the alignment error rate")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", type=output_file, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, vocabulary, meta = load_model(args.checkpoint)
    examples = load_examples(args.split, args.tsv, args.seed, args.limit)
    started = time.time()
    translations = translate_texts(
        model,
        vocabulary,
        [e.source for e in examples],
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
    )
    results: dict = {
        "checkpoint": args.checkpoint,
        "split": f"tsv:{args.tsv}" if args.tsv else args.split,
        "seed": args.seed,
        "pairs": len(examples),
        "beam_size": args.beam_size,
        **corpus_scores([t.text for t in translations], [e.target for e in examples]),
        "translate_seconds": round(time.time() - started, 2),
    }
    unknown = sum(len(vocabulary.encode_source(e.source).unknown_words) for e in examples)
    results["unknown_source_words"] = unknown
    hypotheses = [t.text for t in translations]
    results.update(copy_scores(vocabulary, [e.source for e in examples], hypotheses))
    results["exact_match_by_length"] = exact_match_by_length(
        [e.source for e in examples], hypotheses, [e.target for e in examples]
    )
    if examples and examples[0].alignment is not None:
        results.update(attention_alignment(model, vocabulary, examples[: args.aer_limit]))
    for key in (
        "pairs",
        "bleu",
        "chrf",
        "exact_match",
        "copied",
        "exact_match_by_length",
        "aer_best_head",
        "best_layer",
        "best_head",
        "aer_all_heads_average",
        "translate_seconds",
    ):
        if key in results:
            print(f"{key:>24}: {results[key]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
