"""docs/PERFORMANCE.md is generated from docs/results/: figures read from the raw files, the latest run per
machine and benchmark, the targets judged, `--check` failing on a stale file; new runs get a folder each."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import performance
from bench.results import RUN_JSON, run_folder, write_run_json
from tests.conftest import ROOT

RESULTS = ROOT / "docs" / "results"


def test_the_shipped_file_is_what_the_results_give() -> None:
    assert performance.main(["--results", str(RESULTS), "--out", str(ROOT / "docs" / "PERFORMANCE.md"),
                             "--check"]) == 0


def _engine_run(results: Path, name: str, ours_32: float, best_ct2_32: float) -> None:
    """A copy of a real engine run with ours and the faster CTranslate2 at batch 32 replaced."""
    source = next(p for p in sorted(RESULTS.iterdir()) if p.name.endswith("_cpu2_engine"))
    folder = results / name
    shutil.copytree(source, folder)
    data = json.loads((folder / "bench-engine.json").read_text())
    data["ratios"]["32"]["ours/best ct2_f32"] = ours_32 / best_ct2_32
    data["results"]["ours"]["32"]["sentences_per_s"] = ours_32
    data["results"]["ct2_f32"]["32"]["sentences_per_s"] = best_ct2_32
    data["results"]["ct2_f32_workers"]["32"]["sentences_per_s"] = 0.9 * best_ct2_32
    (folder / "bench-engine.json").write_text(json.dumps(data))
    run = json.loads((folder / RUN_JSON).read_text())
    run.update(date=name[:10], commit=name.split("_")[1])
    (folder / RUN_JSON).write_text(json.dumps(run))


def test_current_figures_and_targets_come_from_the_latest_run(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "PERFORMANCE.md"
    _engine_run(results, "2030-01-01_aaaaaaa_cpu2_engine", ours_32=1234.5, best_ct2_32=2469.0)
    _engine_run(results, "2030-01-02_bbbbbbb_cpu2_engine", ours_32=5432.1, best_ct2_32=2469.0)
    assert performance.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    current = text.split("## Targets")[0]
    assert "bbbbbbb" in current and "5,432.1" in current and "1,234.5" not in current
    targets = text.split("## Targets")[1].split("## History")[0]
    batch_32 = next(line for line in targets.splitlines() if "CTranslate2 float32, batch 32" in line)
    assert "2.20×" in batch_32 and "| met |" in batch_32  # 5432.1 / 2469.0
    history = text.split("## History")[1]
    assert history.index("bbbbbbb") < history.index("aaaaaaa")  # newest first
    assert re.search(r"generated|Generated", text)


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "PERFORMANCE.md"
    _engine_run(results, "2030-01-01_aaaaaaa_cpu2_engine", ours_32=1000.0, best_ct2_32=1000.0)
    performance.main(["--results", str(results), "--out", str(out)])
    assert performance.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    with pytest.raises(SystemExit) as stopped:
        performance.main(["--results", str(results), "--out", str(out), "--check"])
    assert stopped.value.code == 1


def test_a_new_run_gets_a_folder_of_its_own(tmp_path: Path) -> None:
    first = run_folder("engine", root=tmp_path, machine="cpu2")
    named = r"\d{4}-\d{2}-\d{2}_([0-9a-f]{7,}(-dirty)?|unknown)_cpu2_engine"
    assert re.fullmatch(named, first.name), first.name
    assert run_folder("engine", root=tmp_path, machine="cpu2") == first  # not closed yet: reused
    write_run_json(first, ["translator-bench", "engine", "--save"], {"device": "cpu"})
    recorded = json.loads((first / RUN_JSON).read_text())
    assert recorded["bench"] == "engine" and recorded["machine"] == "cpu2" and recorded["device"] == "cpu"
    assert recorded["command"] == "translator-bench engine --save"
    second = run_folder("engine", root=tmp_path, machine="cpu2")
    assert second.name == first.name + "-2"


def test_a_baseline_run_has_its_section_and_target(tmp_path: Path) -> None:
    """A `load --baseline` run: its own bench (load-baseline), ours / CTranslate2 per setting, the 1.3x target
    (p99 no worse) judged on our float32 settings and the 1.0x int8 target on our int8 ones against
    CTranslate2 int8, while the latest load report keeps its own section."""
    results, out = tmp_path / "results", tmp_path / "PERFORMANCE.md"
    source = RESULTS / "2026-12-07_f0753e2_cpu2_load-baseline"  # one float32 setting, b64
    folder = results / "2030-01-01_ccccccc_cpu2_load-baseline"
    shutil.copytree(source, folder)
    data = json.loads((folder / "report.json").read_text())
    ours = data["settings"][0]["points"][0]
    ours["requests_per_s"], ours["latency_ms"]["p99"] = 1400.0, 90.0
    int8_setting = json.loads(json.dumps(data["settings"][0]))
    int8_setting["name"], int8_setting["values"]["precision"] = "b64-int8", "int8"
    int8_setting["points"][0]["requests_per_s"] = 900.0
    data["settings"].append(int8_setting)
    [theirs] = [b for b in data["baselines"] if b["name"] == "ctranslate2"]
    theirs["points"][0]["requests_per_s"], theirs["points"][0]["latency_ms"]["p99"] = 1000.0, 100.0
    [theirs_int8] = [b for b in data["baselines"] if b["name"] == "ctranslate2-int8"]
    theirs_int8["points"][0]["requests_per_s"] = 1000.0
    (folder / "report.json").write_text(json.dumps(data))
    assert performance.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    current = text.split("## Targets")[0]
    assert "#### load-baseline" in current and "| b64 | ctranslate2 | 1,400.0 | 1,000.0 | 1.40× |" in current
    targets = text.split("## Targets")[1].split("## History")[0]
    row = next(line for line in targets.splitlines() if "minimal CTranslate2 float32 server" in line)
    assert "b64 1.40× (p99 90.0 / 100.0 ms)" in row and "| met |" in row and "b64-int8" not in row
    row = next(line for line in targets.splitlines() if "minimal CTranslate2 int8 server" in line)
    assert "b64-int8 0.90×" in row and "| missed |" in row and "b64 " not in row


def test_a_missed_target_links_to_why(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "pages" / "PERFORMANCE.md"
    out.parent.mkdir()
    _engine_run(results, "2030-01-01_aaaaaaa_cpu2_engine", ours_32=1000.0, best_ct2_32=2000.0)
    assert performance.main(["--results", str(results), "--out", str(out)]) == 0
    targets = out.read_text().split("## Targets")[1].split("## History")[0]
    header = next(line for line in targets.splitlines() if line.startswith("| machine"))
    assert "| why |" in header
    missed = next(line for line in targets.splitlines() if "CTranslate2 float32, batch 32" in line)
    assert "| missed |" in missed
    link = re.search(r"\[[^]]+\]\(([^)#]+)(#[^)]*)?\)", missed)
    assert link is not None, missed
    # The link is relative to the page and leads to a page of the docs that exists.
    page = (out.parent / link.group(1)).resolve()
    assert page == (performance.DOCS / "decisions" / "step-floor.md").resolve() and page.is_file()
    met = [line for line in targets.splitlines() if "| met |" in line]
    assert met and all("| met | — |" in line for line in met)  # a met target has no reason to give


def test_int8_speed_and_quality_targets_are_judged(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "PERFORMANCE.md"
    name = "2030-01-01_aaaaaaa_cpu2_engine"
    _engine_run(results, name, ours_32=1000.0, best_ct2_32=1000.0)
    data = json.loads((results / name / "bench-engine.json").read_text())
    data["results"]["ours_int8"] = {"32": {"sentences_per_s": 1500.0}, "128": {"sentences_per_s": 2000.0}}
    data["results"]["ct2_int8"] = {"32": {"sentences_per_s": 1000.0}, "128": {"sentences_per_s": 2000.0}}
    # The faster CTranslate2 int8 configuration is the reference: at batch 32 the worker-per-thread one.
    data["results"]["ct2_int8_workers"] = {"32": {"sentences_per_s": 1200.0},
                                           "128": {"sentences_per_s": 900.0}}
    data["quality"] = {"ours": {"bleu": 99.9, "exact_match": 0.997, "pairs": 1000},
                       "ours_int8": {"bleu": 99.5, "exact_match": 0.990, "pairs": 1000}}
    data["engine_labels"]["ours_int8"] = "ours, int8 weights"
    (results / name / "bench-engine.json").write_text(json.dumps(data))
    performance.main(["--results", str(results), "--out", str(out)])
    targets = out.read_text().split("## Targets")[1].split("## History")[0]

    def row(label: str) -> str:
        return next(line for line in targets.splitlines() if label in line)

    assert "1.25×" in row("CTranslate2 int8, batch 32") and "| met |" in row("CTranslate2 int8, batch 32")
    assert "1.00×" in row("int8, batch 128") and "| missed |" in row("CTranslate2 int8, batch 128")
    assert "+0.40" in row("int8 test BLEU within 0.3") and "| missed |" in row("int8 test BLEU within 0.3")
    assert "+0.7 pt" in row("int8 test exact match") and "| met |" in row("int8 test exact match")
    current = out.read_text().split("## Targets")[0]
    assert "| ours, int8 weights | 99.50 | 99.0% |" in current
