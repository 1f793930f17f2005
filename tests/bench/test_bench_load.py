"""`translator-bench load` (bench/load.py) end to end against tiny-model servers on 127.0.0.1.

Tiny settings throughout (two batching settings, 1 and 4 clients, ~1.5 s per point): these check that every
mode runs and writes what it promises, not the numbers (docs/LOAD.md has the real runs).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import load as bench_load
from bench.load_driver import Sample, summarize
from bench.servers import Setting, Target, parse_batching, spawn_server

pytestmark = pytest.mark.timeout(300)

PNG = b"\x89PNG\r\n\x1a\n"
POINT_KEYS = {
    "mode",
    "concurrency",
    "rate",
    "duration_s",
    "requests",
    "ok",
    "errors",
    "error_count",
    "requests_per_s",
    "sentences_per_s",
    "tokens_per_s",
    "latency_ms",
    "server",
    "client_cpu_percent",
}
TINY = ["--duration", "1.5", "--warmup", "0.3", "--timeout-s", "20", "--server-threads", "1"]


def check_point(point: dict, mode: str) -> None:
    assert POINT_KEYS <= set(point), POINT_KEYS - set(point)
    assert point["mode"] == mode
    assert point["error_count"] == 0 and point["errors"] == {}, point["errors"]
    assert point["ok"] > 0 and point["requests_per_s"] > 0 and point["tokens_per_s"] > 0
    latency = point["latency_ms"]
    assert set(latency) == {"p50", "p95", "p99", "max", "mean"}
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]


@pytest.fixture(scope="module")
def server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    setting = Setting("b4", {"max_batch_size": "4", "max_queue_delay_ms": "2", "threads": "1"})
    with spawn_server(setting, tiny_repository, "tiny", log_dir=tmp_path_factory.mktemp("bench")) as target:
        yield target


def test_report_spawns_every_setting_and_compares_with_the_engine(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, plot = tmp_path / "report.json", tmp_path / "load.png"
    results = bench_load.main(
        [
            "--report", str(report), "--plot", str(plot),
            "--model-repository", str(tiny_repository), "--model", "tiny",
            "--batching", "off:max_batch_size=1;b4:max_batch_size=4,max_queue_delay_ms=5",
            "--concurrency", "1,4", "--engine-seconds", "0.3", "--log-dir", str(tmp_path / "logs"),
            *TINY,
        ]
    )  # fmt: skip
    assert json.loads(report.read_text()) == json.loads(json.dumps(results))
    assert plot.read_bytes().startswith(PNG)
    assert results["kind"] == "report"
    assert results["config"]["workload"]["sentences"] == 1000  # the shipped test-split sentences
    assert [s["name"] for s in results["settings"]] == ["off", "b4"]
    for setting in results["settings"]:
        closed = {p["concurrency"]: p for p in setting["points"] if p["mode"] == "closed"}
        assert set(closed) == {1, 4, bench_load.SATURATION_CONCURRENCY}  # + the saturation measurement
        for point in closed.values():
            check_point(point, "closed")
            assert point["server"]["mean_batch_size"] >= 1
            assert point["gain_vs_off"] > 0 and point["service_over_engine"] > 0
            assert point["engine_batch_size"] == max(1, round(point["server"]["mean_batch_size"]))
        assert closed[1]["server"]["mean_batch_size"] == 1  # one client: nobody to batch with
        half = setting["half_saturation"]
        check_point(half["point"], "open")
        assert half["point"]["rate"] == pytest.approx(half["saturation_requests_per_s"] / 2)
        assert half["bound_ms"] == pytest.approx(
            2 * (half["unloaded_p50_ms"] + half["max_queue_delay_ms"]), abs=1e-3
        )
        assert isinstance(half["within_bound"], bool) and half["p99_ms"] > 0
    off, batched = results["settings"]
    assert off["max_queue_delay_ms"] == 0 and batched["max_queue_delay_ms"] == 5
    assert all(p["server"]["mean_batch_size"] == 1 for p in off["points"])
    assert all(p["gain_vs_off"] == 1 for p in off["points"])
    assert max(p["server"]["mean_batch_size"] for p in batched["points"]) > 1
    engine = results["engine"]
    sizes = {p["batch_size"] for p in engine["points"]}
    assert {1, 8, 64, 256} <= sizes and all(p["sentences_per_s"] > 0 for p in engine["points"])
    table = capsys.readouterr().out
    assert "sent/s" in table and "svc/eng" in table and "half of saturation" in table


def test_closed_and_open_loop_against_a_running_server(server: Target, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    results = bench_load.main(
        [
            "--server", server.address, "--metrics", str(server.metrics), "--server-pid", str(server.pid),
            "--concurrency", "1,4", "--rate", "40", "--arrivals", "uniform", "--attention", "cross",
            "--texts-per-request", "2", "--json", str(out), "--plot", str(tmp_path / "sweep.png"),
            *TINY,
        ]
    )  # fmt: skip
    assert json.loads(out.read_text())["kind"] == "sweep"
    (setting,) = results["settings"]
    closed_1, closed_4, opened = setting["points"]
    check_point(closed_1, "closed")
    check_point(closed_4, "closed")
    check_point(opened, "open")
    assert closed_4["server"]["mean_batch_size"] > 1  # 4 clients x 2 texts share batches of up to 4
    assert closed_4["sentences_per_s"] == pytest.approx(2 * closed_4["requests_per_s"], abs=0.01)
    assert opened["rate"] == 40 and opened["arrivals"] == "uniform"
    assert opened["requests"] == pytest.approx(40 * 1.5, abs=2)  # uniform arrivals: exactly the rate
    assert "send_lag_ms" in opened and "server_cpu_percent" in opened
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG)


def test_soak_reports_windows_and_memory(server: Target, tmp_path: Path) -> None:
    out, plot = tmp_path / "soak.json", tmp_path / "soak.png"
    results = bench_load.main(
        [
            "--soak", "--server", server.address, "--metrics", str(server.metrics),
            "--server-pid", str(server.pid), "--duration", "3", "--window", "1", "--saturation-s", "1",
            "--target-fraction", "0.5", "--warmup", "0.2", "--json", str(out), "--plot", str(plot),
        ]
    )  # fmt: skip
    assert json.loads(out.read_text())["kind"] == "soak"
    assert results["passed"] and results["errors"] == {}
    assert results["rate"] == pytest.approx(0.5 * results["saturation"]["requests_per_s"], rel=1e-3)
    point = results["soak"]
    check_point(point, "open")
    assert [w["start_s"] for w in point["windows"]] == [0, 1, 2]
    assert all(w["error_count"] == 0 and w["server_rss_mib"] > 0 for w in point["windows"])
    memory = results["memory"]
    assert memory["start_mib"] > 0 and memory["end_mib"] > 0 and "growth_mib" in memory
    assert memory["second_half_slope_mib_per_hour"] is None  # 3 s: too short for a trend
    assert memory["start_mib"] <= memory["max_mib"] and 0 < memory["middle_mib"] <= memory["max_mib"]
    assert memory["growth_after_warmup_percent"] is None  # 3 s: no warm-up over yet
    assert memory["last_window_mib"] is None
    assert len(point["rss_samples"]) >= 3
    assert plot.read_bytes().startswith(PNG)


def test_batching_specs_and_option_errors(capsys: pytest.CaptureFixture[str]) -> None:
    off, b16 = parse_batching("off:max_batch_size=1; b16:max-batch-size=16,max_queue_delay_ms=2.5")
    assert (off.name, off.max_batch_size, off.queue_delay_ms) == ("off", 1, 0.0)
    assert (b16.max_batch_size, b16.queue_delay_ms) == (16, 2.5)
    assert b16.flags() == ["--max-batch-size", "16", "--max-queue-delay-ms", "2.5"]
    assert parse_batching("d:")[0].queue_delay_ms == 5.0  # the server's default delay
    assert [s.name for s in parse_batching(bench_load.DEFAULT_BATCHING)] == ["off", "b16", "b64", "b64-iter"]
    assert parse_batching(bench_load.DEFAULT_BATCHING)[3].flags()[-2:] == ["--iteration-batching", "on"]
    for bad in ("a:nope=1", "a:max_batch_size", "a:port=1", "a:;a:", ":max_batch_size=2", ""):
        with pytest.raises(ValueError):
            parse_batching(bad)
    for argv in (
        ["--server", "127.0.0.1:1", "--report", "r.json"],
        ["--report", "r.json", "--soak"],
        ["--batching", "x:bogus=1"],
        ["--attention", "sideways"],
        ["--concurrency", "0"],
        ["--duration", "100000"],
    ):
        with pytest.raises(SystemExit) as exit_:
            bench_load.main(argv)
        assert exit_.value.code == 2, argv
    capsys.readouterr()


def test_summary_statistics() -> None:
    samples = [Sample(0.0, (i + 1) / 1000, "OK", 2, 5) for i in range(100)]
    samples += [Sample(0.0, 0.5, "DEADLINE_EXCEEDED", 2, 0), Sample(0.0, 0.1, "UNAVAILABLE", 2, 0)]
    summary = summarize(samples, 2.0)
    assert (summary["requests"], summary["ok"], summary["error_count"]) == (102, 100, 2)
    assert summary["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert (summary["requests_per_s"], summary["sentences_per_s"], summary["tokens_per_s"]) == (50, 100, 250)
    assert summary["latency_ms"]["p50"] == pytest.approx(50.5)
    assert summary["latency_ms"]["p99"] == pytest.approx(99.01)
    assert summary["latency_ms"]["max"] == pytest.approx(100)
    assert "send_lag_ms" not in summary
    assert summarize([], 1.0)["latency_ms"]["p50"] is None


def test_the_ctranslate2_baseline_runs_beside_ours(
    tiny_repository: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--baseline: the minimal CTranslate2 server (bench/ctranslate2_server.py) gets the same client; its
    outputs equal ours and each of our points gets ours / theirs."""
    results = bench_load.main(
        [
            "--model-repository", str(tiny_repository), "--model", "tiny",
            "--batching", "b4:max_batch_size=4,max_queue_delay_ms=2", "--concurrency", "4",
            "--baseline", "ctranslate2", "--baseline-checkpoint", str(tiny_checkpoint),
            "--log-dir", str(tmp_path / "logs"), *TINY,
        ]
    )  # fmt: skip
    [baseline] = results["baselines"]
    assert baseline["name"] == "ctranslate2" and baseline["compute_type"] == "float32"
    assert baseline["outputs_equal"] == {"texts": bench_load.BASELINE_CHECK_TEXTS, "equal": 200}
    [point] = baseline["points"]
    check_point(point, "closed")
    [ours] = results["settings"][0]["points"]
    ratio = ours["vs_baselines"]["ctranslate2"]
    expected = ours["requests_per_s"] / point["requests_per_s"]
    assert ratio["requests_per_s"] == pytest.approx(expected, rel=1e-2)
    assert ratio["p99_ms"] == [ours["latency_ms"]["p99"], point["latency_ms"]["p99"]]
    out = capsys.readouterr().out
    assert "ctranslate2: outputs equal to ours on 200 of 200 sentences" in out
    assert "b4 c=4: ours / ctranslate2 = " in out
