from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model import evaluate, train
from model.data import encode_examples, token_batches, toy_model_texts, toy_split
from model.evaluate import alignment_error_rate, links_from_attention, translate_texts
from model.tokenizer import build_word_level
from model.train import inverse_sqrt_schedule, linear_schedule
from model.transformer import Transformer, TransformerConfig

TINY = [
    "--d-model",
    "32",
    "--n-heads",
    "2",
    "--n-encoder-layers",
    "1",
    "--n-decoder-layers",
    "1",
    "--d-ff",
    "64",
    "--threads",
    "2",
]


def test_tiny_model_overfits_64_pairs_within_60_seconds() -> None:
    torch.manual_seed(0)
    examples = [e for e in toy_split("train", 400) if len(e.source.split()) <= 8][:64]
    vocabulary = build_word_level(toy_model_texts(examples), text_rules=True)
    pairs = encode_examples(vocabulary, examples)
    config = TransformerConfig(
        src_vocab_size=vocabulary.size,
        tgt_vocab_size=vocabulary.size,
        d_model=64,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=128,
        dropout=0.0,
    )
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    started, step, exact = time.time(), 0, 0.0
    while time.time() - started < 60:
        model.train()
        for batch in token_batches(pairs, 400, vocabulary.pad_id, seed=0, epoch=step):
            tgt = torch.from_numpy(batch.tgt_ids)
            logits = model(torch.from_numpy(batch.src_ids), tgt[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=vocabulary.pad_id
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        step += 1
        if step % 25 == 0:
            model.eval()
            outputs = translate_texts(model, vocabulary, [e.source for e in examples])
            exact = np.mean([o.text == e.target for o, e in zip(outputs, examples, strict=True)])
            if exact == 1.0:
                break
    assert exact == 1.0, f"exact match {exact:.0%} after {time.time() - started:.0f}s"


def test_linear_schedule_warms_up_then_falls_to_five_percent_at_the_last_step() -> None:
    assert linear_schedule(50, 100, 1100) == pytest.approx(0.5)
    assert linear_schedule(100, 100, 1100) == pytest.approx(1.0)
    assert linear_schedule(600, 100, 1100) == pytest.approx(0.525)
    assert linear_schedule(1100, 100, 1100) == pytest.approx(0.05)
    assert linear_schedule(5000, 100, 1100) == pytest.approx(0.05)  # a resumed run past its plan stays low


def test_schedule_warms_up_then_decays_as_inverse_square_root() -> None:
    assert inverse_sqrt_schedule(50, 100) == pytest.approx(0.5)
    assert inverse_sqrt_schedule(100, 100) == pytest.approx(1.0)
    assert inverse_sqrt_schedule(400, 100) == pytest.approx(0.5)


def test_train_cli_saves_safetensors_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [
        *TINY,
        "--train-size",
        "300",
        "--valid-size",
        "20",
        "--max-tokens",
        "600",
        "--out-dir",
        str(out),
    ]
    train.main([*common, "--epochs", "1"])
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["d_model"] == 32 and meta["data"]["kind"] == "toy"
    assert set(load_file(out / "model.safetensors"))  # tensors, no pickle
    first = json.loads((out / "last.json").read_text())["progress"]
    assert first["epoch"] == 1
    train.main([*common, "--epochs", "2", "--resume"])
    second = json.loads((out / "last.json").read_text())["progress"]
    assert second["epoch"] == 2 and second["step"] > first["step"]
    assert [h["epoch"] for h in second["history"]] == [1, 2]


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"d_model": 64, "epochs": 7, "betas": [0.8, 0.9]}))
    config, resume = train.parse_config(["--config", str(path), "--epochs", "2"])
    assert (config.d_model, config.epochs, config.betas, resume) == (64, 2, (0.8, 0.9), False)
    path.write_text(json.dumps({"not_a_field": 1}))
    with pytest.raises(ValueError, match="not_a_field"):
        train.TrainConfig.from_json(path)


def test_train_on_a_user_tsv_corpus_with_bpe(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("".join(f"{e.source}\t{e.target}\n" for e in toy_split("train", 200)))
    out = tmp_path / "tsv-run"
    train.main(
        [*TINY, "--train-tsv", str(corpus), "--bpe-vocab-size", "300", "--epochs", "1", "--out-dir", str(out)]
    )
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["kind"] == "tsv"
    # The longest training source in source ids (</s> included), what served answers are compared with.
    from service.core.vocabulary import Vocabulary

    vocabulary = Vocabulary.from_file(out / "tokenizer.json")
    sources = [line.split("\t")[0] for line in corpus.read_text().splitlines()]
    longest = max(len(vocabulary.encode_source(source).ids) for source in sources)
    assert 1 < meta["data"]["max_source_tokens"] <= longest
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"


def test_eval_cli_reports_scores_and_alignment(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "run"
    train.main([*TINY, "--train-size", "200", "--valid-size", "10", "--epochs", "1", "--out-dir", str(out)])
    report = tmp_path / "eval.json"
    evaluate.main(
        [
            "--checkpoint",
            str(out),
            "--split",
            "test",
            "--limit",
            "15",
            "--aer-limit",
            "10",
            "--json",
            str(report),
        ]
    )
    results = json.loads(report.read_text())
    assert results["pairs"] == 15
    for key in ("bleu", "chrf", "exact_match", "aer_best_head", "aer_all_heads_average"):
        assert 0 <= results[key] <= 100
    assert np.array(results["aer_per_layer_head"]).shape == (1, 2)
    assert results["aer_best_head"] == pytest.approx(np.min(results["aer_per_layer_head"]))


def test_alignment_error_rate() -> None:
    attention = np.array([[0.1, 0.8, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1]])  # last column is </s>
    links = links_from_attention(attention)
    assert links == {(1, 0), (0, 1)}
    assert alignment_error_rate([links], [{(1, 0), (0, 1)}]) == 0.0
    assert alignment_error_rate([links], [{(0, 0), (1, 1)}]) == 1.0
    assert alignment_error_rate([links], [{(1, 0), (2, 1)}]) == pytest.approx(0.5)
