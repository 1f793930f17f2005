"""The translator-* commands refuse bad arguments before any work and end with one line, not a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import cli as bench
from bench.load import build_parser as load_parser
from model import checkpoint, evaluate, export, train
from service.client import translator_client as client
from service.scheduler.metrics import ServerMetrics
from service.server.metrics_http import MetricsEndpoint

Main = Callable[[list[str]], Any]


def failure(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run a command's main to its exit: (status, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return int(exit_.value.code or 0), error.strip()


@pytest.mark.parametrize(
    ("main", "argv", "expected"),
    [
        (export.main, ["--name", "../../elsewhere"], "a model name is one folder name"),
        (export.main, ["--version", "-1"], "expected an integer of at least 1"),
        (export.main, ["--precisions", "fp8"], "among float32, int8, float16, got 'fp8'"),
        (evaluate.main, ["--json", "/proc/new/x.json"], "cannot write /proc/new/x.json"),
        (evaluate.main, ["--aer-limit", "0"], "expected an integer of at least 1"),
        (evaluate.main, ["--length-penalty", "nan"], "expected a finite number"),
        (train.main, ["--valid-size", "0"], "--valid-size must be at least 1"),
        (train.main, ["--epochs", "0", "--d-model", "30"], "--d-model (30) must be a multiple of --n-heads"),
        (train.main, ["--learning-rate", "nan"], "--learning-rate must be a finite number above 0"),
        (train.main, ["--schedule", "cosine"], "--schedule must be one of inverse_sqrt, linear"),
        (train.main, ["--position-shift", "-1"], "--position-shift must be at least 0"),
        (train.main, ["--positions", "rotary"], "--positions must be one of absolute, relative"),
        (train.main, ["--position-shift", "8"], "--position-shift moves absolute positions"),
        (train.main, ["--relative-buckets", "30"], "--relative-buckets must be a multiple of 4"),
        (train.main, ["--relative-max-distance", "8"], "--relative-max-distance must exceed"),
        (evaluate.main, ["--split", "dev"], "invalid choice: 'dev'"),
        (bench.main, ["load", "--rate", "inf"], "expected positive numbers separated by commas"),
        (bench.main, ["load", "--concurrency", "1,,2"], "expected positive numbers separated by commas"),
        (bench.main, ["load", "--server", "localhost:99999"], "a port from 1 to 65535"),
        (bench.main, ["phases", "--batch-sizes", "abc"], "expected integers of at least 1"),
        (bench.main, ["phases", "--sentence-file", "/nonexistent.txt"], "/nonexistent.txt: no such file"),
        (bench.main, ["engine", "--json", "/proc/x.json"], "cannot write /proc/x.json"),
        (client.main, ["--server", "localhost:99999", "the dog"], "a port from 1 to 65535"),
        (client.main, ["--timeout", "0", "the dog"], "expected a number above 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    main: Main, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, error = failure(main, argv, capsys)
    assert status == 2 and expected in error, error


def test_a_folder_that_is_not_a_checkpoint_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    status, error = failure(export.main, ["--checkpoint", str(folder), "--repository", str(tmp_path)], capsys)
    assert status == 1 and error.startswith("translator-export: error:") and "config.json" in error, error
    (folder / "config.json").write_text(json.dumps({"metrics": {}}))
    status, error = failure(evaluate.main, ["--checkpoint", str(folder)], capsys)
    assert status == 1 and "not a translator-train checkpoint config" in error, error


def test_truncated_weights_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (folder / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot load the weights"):
        checkpoint.load_model(folder)


def test_load_paths_are_resolved_where_the_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spawned servers run in the project folder: a relative --model-repository must mean the caller's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentences.txt").write_text("the dog\n")
    args = load_parser().parse_args(
        ["--model-repository", "repo", "--sentences", "sentences.txt", "--log-dir", "logs"]
    )
    assert args.model_repository == tmp_path / "repo"
    assert args.sentences == tmp_path / "sentences.txt" and args.log_dir == tmp_path / "logs"


def test_a_metrics_port_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = MetricsEndpoint(ServerMetrics().registry)
        with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{port}"):
            asyncio.run(endpoint.start("127.0.0.1", port))


def test_an_output_file_in_folders_yet_to_be_made_is_accepted(tmp_path: Path) -> None:
    """The commands create missing folders for what they write; only where nothing can be written is it
    refused. The check leaves nothing behind."""
    from service.core.cli import output_file

    target = tmp_path / "new" / "deeper" / "report.json"
    assert output_file(str(target)) == target
    assert list(tmp_path.iterdir()) == []


def test_eval_on_a_tsv_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("the dog\tel perro\nthe cat\tel gato\n")
    out = tmp_path / "results" / "eval.json"
    evaluate.main(
        ["--checkpoint", str(tiny_checkpoint), "--tsv", str(pairs), "--aer-limit", "1", "--json", str(out)]
    )
    results = json.loads(out.read_text())
    assert results["pairs"] == 2 and results["split"] == f"tsv:{pairs}"


def test_repository_index_lists_an_unreadable_model_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.server import kserve

    for folder in ("good/1", "locked/1"):
        (tmp_path / folder).mkdir(parents=True)
    real = kserve.available_versions

    def versions(repository: Path, name: str) -> list[int]:
        if name == "locked":
            raise PermissionError(13, "Permission denied", str(repository / name))
        return real(repository, name)

    monkeypatch.setattr(kserve, "available_versions", versions)
    entries = kserve.repository_entries(tmp_path)
    assert entries[0] == ("good", "1", "")
    assert entries[1][:2] == ("locked", "") and "Permission denied" in entries[1][2]
    assert kserve.repository_entries(tmp_path / "gone")[0][2].startswith("cannot read the repository")


def test_eval_without_a_checkpoint_evaluates_the_shipped_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh clone has no runs/: translator-eval's default is the checkpoint the shipped model came from,
    wherever the command runs."""
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--split", "test", "--limit", "20", "--aer-limit", "5", "--json", "eval.json"])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert Path(results["checkpoint"]) == checkpoint.DEFAULT_CHECKPOINT
    assert results["pairs"] == 20 and results["bleu"] > 90
