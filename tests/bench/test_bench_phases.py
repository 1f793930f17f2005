"""translator-bench phases: every phase is counted, and the host's share is what the phases leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.phases import main


def test_phases_count_every_backend_call(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("the big dog\nthe cat sees her and him with the red house\na dog\n" * 4)
    out = tmp_path / "phases.json"
    report = main(["--model-repository", str(tiny_repository), "--model", "tiny", "--device", "cpu",
                   "--threads", "1", "--batch-sizes", "1,6", "--sentences", "12",
                   "--sentence-file", str(sentences), "--json", str(out)])
    assert json.loads(out.read_text()) == report
    one, six = report["rows"]
    # Batch 1: every sentence is one encoder run; batch 6: 12 sentences are two.
    assert one["phases"]["encode"]["calls"] == one["sentences"] >= 1
    assert six["phases"]["encode"]["calls"] == 2 and six["sentences"] == 12
    for row in report["rows"]:
        assert row["phases"]["step"]["calls"] >= row["phases"]["encode"]["calls"]
        shares = sum(phase["share"] for phase in row["phases"].values())
        assert 0 < shares <= 1 and row["host_share"] == pytest.approx(1 - shares, abs=1e-3)
    # Rows of different lengths leave the batch of 6 early: select runs there, never at batch 1.
    assert six["phases"]["select"]["calls"] > 0 and one["phases"]["select"]["calls"] == 0
    assert "step: calls" in capsys.readouterr().out
