"""`translator-train`: train the Transformer on the toy language or a user's TSV corpus.

Checkpoints are a folder: `model.safetensors` (best weights by validation BLEU), `config.json` (model and
training configuration, vocabulary, metrics) and `tokenizer.json`; `last.*` files hold what `--resume` needs.
No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from model.checkpoint import load_optimizer, save_checkpoint, save_optimizer
from model.data import Example, encode_examples, read_tsv, token_batches, toy_model_texts, toy_split
from model.evaluate import corpus_scores, translate_texts
from model.tokenizer import build_bpe, build_word_level
from model.toy_language import SPLIT_SEEDS
from model.transformer import Transformer, TransformerConfig, position_problems
from service.core.cli import run_command
from service.core.vocabulary import Vocabulary


@dataclass
class TrainConfig:
    # Data: the toy language unless `train_tsv` names a corpus of `source<TAB>target` lines.
    train_tsv: str | None = None
    valid_tsv: str | None = None
    train_size: int = 95_000
    valid_size: int = 500
    bpe_vocab_size: int = 8000
    # Model.
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 512
    # "relative" (T5-style buckets in self-attention) or "absolute" (sinusoids): see TransformerConfig and
    # docs/decisions/long-sentences.md for why relative is the default.
    positions: str = "relative"
    # 16 buckets (8 per direction: 4 exact distances, 4 logarithmic), every distance beyond 10 in the last
    # one: that bucket is then common in training texts (up to 40 tokens), so a longer text meets no distance
    # class training rarely saw (docs/decisions/long-sentences.md).
    relative_buckets: int = 16
    relative_max_distance: int = 10
    dropout: float = 0.0  # the toy data is plentiful and noise-free: dropout only slows learning
    # Optimisation.
    max_tokens: int = 4096
    learning_rate: float = 2e-3
    warmup_steps: int = 300
    # After warm-up: "linear" (down to 5% at the last planned step) or "inverse_sqrt" (lr / sqrt(step)).
    schedule: str = "linear"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    # Each batch's source and target positions start at one random offset up to this (0: no shift), meant
    # to let the model hold up beyond its longest training text; measured to slow learning several-fold
    # here, so off by default (docs/decisions/long-sentences.md).
    position_shift: int = 0
    epochs: int = 5
    max_minutes: float | None = None  # stop (after saving) once this much training time has passed
    seed: int = 1234
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    out_dir: str = "runs/default"

    def problems(self) -> list[str]:
        """What is out of range, as flag names: refused before any work rather than found after an epoch of
        training (a valid-size of 0) or never (an epoch count of 0 would end with no checkpoint)."""
        at_least_one = ("train_size", "valid_size", "bpe_vocab_size", "d_model", "n_heads",
                        "n_encoder_layers", "n_decoder_layers", "d_ff", "max_tokens", "warmup_steps",
                        "epochs", "threads")
        found = [f"{_flag(name)} must be at least 1" for name in at_least_one
                 if getattr(self, name) < 1]
        if self.schedule not in SCHEDULES:
            found.append(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.position_shift < 0:
            found.append("--position-shift must be at least 0")
        found += position_problems(self.positions, self.relative_buckets, self.relative_max_distance, _flag)
        if self.position_shift and self.positions != "absolute":
            found.append("--position-shift moves absolute positions: it needs --positions absolute")
        if self.d_model >= 1 and self.n_heads >= 1 and self.d_model % self.n_heads:
            found.append(f"--d-model ({self.d_model}) must be a multiple of --n-heads ({self.n_heads})")
        for name, low, high in (("dropout", 0.0, 1.0), ("label_smoothing", 0.0, 1.0)):
            if not low <= getattr(self, name) < high:
                found.append(f"{_flag(name)} must be in [{low:g}, {high:g})")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            found.append("--betas must be in [0, 1)")
        for name in ("learning_rate", "clip_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                found.append(f"{_flag(name)} must be a finite number above 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            found.append("--weight-decay must be a finite number of at least 0")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            found.append("--max-minutes must be a finite number above 0")
        return found

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        values = json.loads(Path(path).read_text())
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def _flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Defaults come from the dataclass, then `--config FILE`, then flags, so a flag always wins."""
    parser = argparse.ArgumentParser(prog="translator-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="JSON file with TrainConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/last.*")
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        if f.name == "betas":
            parser.add_argument("--betas", type=float, nargs=2)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind)
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"--config {args.config}: {error}")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    if "betas" in overrides:
        overrides["betas"] = tuple(overrides["betas"])
    config = dataclasses.replace(config, **overrides)
    if problems := config.problems():
        parser.error("; ".join(problems))
    return config, args.resume


def load_data(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    if config.train_tsv:
        train = read_tsv(config.train_tsv)
        if config.valid_tsv:
            valid = read_tsv(config.valid_tsv)
        else:  # hold out a deterministic slice when no validation file is given
            shuffled = random.Random(config.seed).sample(train, len(train))
            held = min(config.valid_size, max(1, len(train) // 20))
            valid, train = shuffled[:held], shuffled[held:]
        return train, valid
    return toy_split("train", config.train_size), toy_split("valid", config.valid_size)


def inverse_sqrt_schedule(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then decay proportional to 1/sqrt(step)."""
    step = max(step, 1)
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then a straight line down to 0.05 at `total_steps`."""
    step = max(step, 1)
    if step <= warmup_steps:
        return step / warmup_steps
    done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - 0.95 * done


SCHEDULES = ("inverse_sqrt", "linear")


def main(argv: list[str] | None = None) -> None:
    run_command("translator-train", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    config, resume = parse_config(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(max(1, config.threads // world))
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)

    started = time.time()
    train_examples, valid_examples = load_data(config)
    if resume:
        vocabulary = Vocabulary.from_file(out_dir / "tokenizer.json")
    elif config.train_tsv:
        vocabulary = build_bpe(
            (t for e in train_examples for t in (e.source, e.target)), config.bpe_vocab_size
        )
    else:
        vocabulary = build_word_level(toy_model_texts(train_examples), text_rules=True)
    if rank == 0:
        vocabulary.save(out_dir / "tokenizer.json")
    train_pairs = encode_examples(vocabulary, train_examples, seed=config.seed)
    n_target = sum(len(p.target) - 1 for p in train_pairs)
    log(
        f"data: {len(train_pairs)} training pairs ({n_target} target tokens), "
        f"{len(valid_examples)} validation "
        f"pairs, vocabulary {vocabulary.size}, prepared in {time.time() - started:.1f}s"
    )

    model_config = TransformerConfig(
        src_vocab_size=vocabulary.size,
        tgt_vocab_size=vocabulary.size,
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_encoder_layers=config.n_encoder_layers,
        n_decoder_layers=config.n_decoder_layers,
        d_ff=config.d_ff,
        positions=config.positions,
        relative_buckets=config.relative_buckets,
        relative_max_distance=config.relative_max_distance,
        dropout=config.dropout,
        pad_id=vocabulary.pad_id,
        bos_id=vocabulary.bos_id,
        eos_id=vocabulary.eos_id,
        unk_id=vocabulary.unk_id,
    )
    model = Transformer(model_config)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay
    )

    progress = {"epoch": 0, "step": 0, "best_bleu": -1.0, "train_seconds": 0.0, "history": []}
    if resume:
        state = json.loads((out_dir / "last.json").read_text())
        model.load_state_dict(load_file(out_dir / "last.safetensors"))
        load_optimizer(out_dir / "last_optimizer.safetensors", optimizer, state["optimizer"]["param_groups"])
        progress = state["progress"]
        log(
            f"resumed at epoch {progress['epoch']}, step {progress['step']}, "
            f"best BLEU {progress['best_bleu']:.2f}"
        )
    trainable = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    meta_base = {
        "model": model_config.to_dict(),
        "train": dataclasses.asdict(config),
        "data": {
            "kind": "tsv" if config.train_tsv else "toy",
            "train_pairs": len(train_pairs),
            "valid_pairs": len(valid_examples),
            "split_seeds": None if config.train_tsv else dict(_toy_seeds()),
            # The longest training source in source ids (</s> included): the server flags longer texts.
            "max_source_tokens": max((len(pair.source) for pair in train_pairs), default=0),
        },
        "vocabulary_size": vocabulary.size,
    }
    budget = config.max_minutes * 60 if config.max_minutes else math.inf
    while progress["epoch"] < config.epochs and progress["train_seconds"] < budget:
        epoch = progress["epoch"]
        model.train()
        batches = token_batches(
            train_pairs, config.max_tokens, vocabulary.pad_id, config.seed, epoch, rank, world
        )
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=rank != 0,
            mininterval=2,
            file=sys.stdout,
            dynamic_ncols=True,
        )
        epoch_start, tokens_seen, loss_sum = time.time(), 0, 0.0
        shifts = random.Random(config.seed * 1_000_003 + epoch + 7)
        for batch in bar:
            src = torch.from_numpy(batch.src_ids)
            tgt = torch.from_numpy(batch.tgt_ids)
            room = model_config.max_positions - max(src.shape[1], tgt.shape[1])
            shift = min(config.position_shift, room)
            offset = shifts.randint(0, shift)  # source and target alike: target j, source i stay j - i apart
            logits = trainable(src, tgt[:, :-1], offset, offset)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                tgt[:, 1:].reshape(-1),
                ignore_index=vocabulary.pad_id,
                label_smoothing=config.label_smoothing,
            )
            if config.schedule == "linear":
                total = len(batches) * config.epochs
                factor = linear_schedule(progress["step"] + 1, config.warmup_steps, total)
            else:
                factor = inverse_sqrt_schedule(progress["step"] + 1, config.warmup_steps)
            learning_rate = config.learning_rate * factor
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            progress["step"] += 1
            tokens_seen += batch.n_target_tokens
            loss_sum += loss.item() * batch.n_target_tokens
            elapsed = time.time() - epoch_start
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                tok_s=f"{tokens_seen * world / max(elapsed, 1e-9):.0f}",
                lr=f"{learning_rate:.2e}",
                refresh=False,
            )
            if progress["train_seconds"] + elapsed >= budget:
                break
        bar.close()
        progress["train_seconds"] += time.time() - epoch_start
        progress["epoch"] += 1
        if rank == 0:
            model.eval()
            hypotheses = [
                t.text for t in translate_texts(model, vocabulary, [e.source for e in valid_examples])
            ]
            scores = corpus_scores(hypotheses, [e.target for e in valid_examples])
            record = {
                "epoch": progress["epoch"],
                "step": progress["step"],
                "train_loss": loss_sum / max(tokens_seen, 1),
                "train_seconds": round(progress["train_seconds"], 1),
                **scores,
            }
            progress["history"].append(record)
            improved = scores["bleu"] > progress["best_bleu"]
            log(
                f"epoch {progress['epoch']}: train loss {record['train_loss']:.4f}, "
                f"valid BLEU {scores['bleu']:.2f}, "
                f"chrF {scores['chrf']:.2f}, exact {scores['exact_match']:.1%}"
                f"{' (best, saved)' if improved else ''}, {progress['train_seconds'] / 60:.1f} min so far"
            )
            if improved:
                progress["best_bleu"] = scores["bleu"]
                save_checkpoint(out_dir, "model", model, {**meta_base, "metrics": {"valid": record}})
            optimizer_meta = save_optimizer(out_dir / "last_optimizer.safetensors", optimizer)
            save_checkpoint(out_dir, "last", model, {"progress": progress, "optimizer": optimizer_meta})
        if distributed:
            dist.barrier()
    log(
        f"done: best valid BLEU {progress['best_bleu']:.2f} after "
        f"{progress['train_seconds'] / 60:.1f} min of "
        f"training; checkpoint in {out_dir}"
    )
    if distributed:
        dist.destroy_process_group()


def _toy_seeds() -> dict[str, int]:
    return dict(SPLIT_SEEDS)


if __name__ == "__main__":
    main()
