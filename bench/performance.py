"""`translator-bench performance`: write docs/PERFORMANCE.md from the benchmark runs under docs/results/.

Every run lives in ``docs/results/<date>_<commit>_<machine>_<bench>/`` (see bench/results.py): the files the
benchmark wrote, unedited (``bench-engine.json``, ``report.json``, ``phases.json``, ``plot.png``,
``run.log``...), and a ``run.json`` with date, commit, machine, bench, command and device. This command reads
every folder and writes:

* per machine, the current figures: the latest run of each benchmark (engine: sentences/s per engine and
  batch size, ours against the faster CTranslate2 float32 and against PyTorch without cache, the cost of the
  attention maps; load: requests/s per batching setting and concurrency, the gain against batching off,
  p99, service / engine; soak; phases), each stamped with its date, commit and command;
* the targets, met or missed, on each machine's latest engine and load runs;
* the history: one row per run with its headline figures.

A figure a run did not record shows as "—". The output depends on the folders only (sorted, no clock), so
``--check`` (exit status 1 when the file on disk differs from what would be written) can guard it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.model_format import FLOAT32

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEFAULT_RESULTS = DOCS / "results"
DEFAULT_OUT = ROOT / "docs" / "PERFORMANCE.md"
COMMAND = "translator-bench performance"
DASH = "—"
FOLDER_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})_([^_]+)_([^_]+)_([^_]+)$")
RAW_NAMES = ("bench-engine.json", "report.json", "phases.json")  # preferred raw JSON, in this order

# Targets.
CT2_RATIO_MIN = 1.1  # ours / faster CTranslate2 float32, at CT2_BATCHES
CT2_BATCHES = (8, 32, 128)
NOCACHE_RATIO_MIN = 5.0  # ours / PyTorch without cache, at TARGET_BATCHES
TARGET_BATCHES = (32, 128)
INT8_RATIO_MIN = 1.1  # ours int8 / CTranslate2 int8, at TARGET_BATCHES
INT8_BLEU_DROP_MAX = 0.3  # test-split BLEU, float32 - int8 (points)
INT8_EXACT_DROP_MAX = 0.01  # test-split exact match, float32 - int8 (fraction)
ATTENTION_COST_MAX = 0.10  # 1 - ours with every attention map / ours, at TARGET_BATCHES
ATTENTION_BATCH = 128  # the headline batch
GAIN_MIN = 8.0  # requests/s with batching / batching off, at LOAD_CLIENTS closed-loop clients
SVC_ENG_MIN = 0.8  # service / engine in-process throughput at the batch size the batcher formed
LOAD_CLIENTS = 64
# Our service / the minimal CTranslate2 server at LOAD_CLIENTS clients: float32 against float32 (p99 no worse
# too), int8 against int8.
BASELINE_RATIO_MIN = {"ctranslate2": 1.3, "ctranslate2-int8": 1.0}
BASELINE_OF = {FLOAT32: "ctranslate2", "int8": "ctranslate2-int8"}
# Where the docs say why a target is missed, by target and kind of machine (docs/ paths): the targets table
# links it beside every target not met, so that a miss says by how much (its figure) and why.
WHY_MISSED = {
    ("ct2", "cpu"): "decisions/step-floor.md",
    ("int8", "cpu"): "decisions/step-floor.md",
    ("ct2", "gpu"): "ENGINE.md#on-a-gpu",
    ("nocache", "gpu"): "ENGINE.md#on-a-gpu",
    ("attention", "gpu"): "ENGINE.md#on-a-gpu",
    ("load", "cpu"): "LOAD.md#results",
    ("load", "gpu"): "LOAD.md#on-a-gpu-h100",
    ("baseline", "cpu"): "decisions/serving-cpu.md",
}

ENGINE_ORDER = (
    "torch_nocache", "torch_cache", "ours", "ours_attention", "ours_int8", "ct2_f32", "ct2_f32_workers",
    "ct2_int8", "ct2_int8_workers",
)
CT2_F32 = ("ct2_f32", "ct2_f32_workers")
CT2_INT8 = ("ct2_int8", "ct2_int8_workers")


@dataclass(frozen=True)
class Run:
    """One folder under docs/results."""

    folder: Path
    date: str
    commit: str
    machine: str
    bench: str
    kind: str  # engine, load, soak, phases or log (the raw file's shape)
    command: str | None
    device: str | None
    note: str | None
    started: str  # UTC time: the raw file's start, else run.json's finished or committed; orders a day's runs
    data: dict[str, Any]
    log_tail: str | None

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.date, self.started, self.folder.name)


# ------------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"{COMMAND}: skipping {path}: {error}", file=sys.stderr)
        return None


def _kind(data: dict[str, Any]) -> str:
    if "results" in data and ("ratios" in data or "engine_labels" in data):
        return "engine"
    if data.get("kind") in ("report", "sweep"):
        return "baseline" if data.get("baselines") else "load"
    if data.get("kind") == "soak":
        return "soak"
    if isinstance(data.get("rows"), list):
        return "phases"
    return "other"


def _last_line(path: Path) -> str | None:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def read_run(folder: Path) -> Run | None:
    """The run in `folder`, or None where neither its name nor a run.json says what it is."""
    meta = _read_json(folder / "run.json") if (folder / "run.json").is_file() else None
    meta = meta if isinstance(meta, dict) else {}
    match = FOLDER_NAME.match(folder.name)
    parsed = match.groups() if match else (None, None, None, None)
    raw_paths = [folder / name for name in RAW_NAMES if (folder / name).is_file()]
    raw_paths += sorted(p for p in folder.glob("*.json") if p.name not in RAW_NAMES and p.name != "run.json")
    data: dict[str, Any] = {}
    kind = "log"
    for path in raw_paths:
        loaded = _read_json(path)
        if isinstance(loaded, dict):
            data, kind = loaded, _kind(loaded)
            break
    times_known = (data.get("started"), meta.get("started"), meta.get("finished"), meta.get("committed"))
    started = str(next((t for t in times_known if t), ""))
    date = meta.get("date") or parsed[0] or (started[:10] if started else None)
    bench = meta.get("bench") or (re.sub(r"-\d+$", "", parsed[3]) if parsed[3] else None)
    machine = meta.get("machine") or parsed[2]
    if not (date and bench and machine):
        print(f"{COMMAND}: skipping {folder}: no date, machine or bench in its name or run.json",
              file=sys.stderr)
        return None
    logs = sorted(folder.glob("*.log"), key=lambda p: (p.name != "run.log", p.name))
    return Run(
        folder=folder,
        date=str(date),
        commit=str(meta.get("commit") or parsed[1] or "unknown"),
        machine=str(machine),
        bench=str(bench),
        kind=kind,
        command=meta.get("command") or data.get("command"),
        device=meta.get("device") or meta.get("gpu"),
        note=meta.get("note"),
        started=started[:19],  # "2026-11-23T02:13:42": every time here is UTC
        data=data,
        log_tail=_last_line(logs[0]) if logs else None,
    )


def read_runs(results: Path) -> list[Run]:
    if not results.is_dir():
        raise OSError(f"{results}: no such folder")
    runs = [read_run(p) for p in sorted(results.iterdir()) if p.is_dir()]
    return sorted((r for r in runs if r is not None), key=lambda r: r.order)


def latest(runs: Iterable[Run]) -> dict[tuple[str, str], Run]:
    """The latest run of each (machine, bench)."""
    found: dict[tuple[str, str], Run] = {}
    for run in sorted(runs, key=lambda r: r.order):
        found[(run.machine, run.bench)] = run
    return found


# ------------------------------------------------------------------------------------------------- figures


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _get(data: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key, data.get(str(key)))
        else:
            return None
    return data


def fmt(value: float | None, spec: str = ",.1f", suffix: str = "") -> str:
    return DASH if value is None else f"{value:{spec}}{suffix}"


def times(value: float | None) -> str:
    return fmt(value, ".2f", "×")


def percent(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f}%"


def points(value: float | None) -> str:
    """A difference of two fractions, in percentage points."""
    return DASH if value is None else f"{value * 100:+.1f} pt"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


class Engine:
    """Figures of a `translator-bench engine` report (medians over rounds)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        results = data.get("results")
        self.results: dict[str, Any] = results if isinstance(results, dict) else {}
        per_engine = [per for per in self.results.values() if isinstance(per, dict)]
        sizes = {int(b) for per in per_engine for b in per if str(b).isdigit()}
        self.batches = sorted(sizes)
        known = [e for e in ENGINE_ORDER if e in self.results]
        self.engines = known + sorted(e for e in self.results if e not in ENGINE_ORDER)

    def rate(self, engine: str, batch: int) -> float | None:
        return _num(_get(self.results, engine, batch, "sentences_per_s"))

    def label(self, engine: str) -> str:
        return str(_get(self.data, "engine_labels", engine) or engine)

    def best_ct2(self, batch: int, engines: tuple[str, ...] = CT2_F32) -> float | None:
        """The faster CTranslate2 configuration at `batch` (float32's by default)."""
        rates = [r for r in (self.rate(e, batch) for e in engines) if r is not None]
        return max(rates) if rates else None

    @staticmethod
    def _ratio(top: float | None, bottom: float | None) -> float | None:
        return None if top is None or not bottom else top / bottom

    def vs_ct2(self, batch: int) -> float | None:
        return self._ratio(self.rate("ours", batch), self.best_ct2(batch))

    def vs_nocache(self, batch: int) -> float | None:
        return self._ratio(self.rate("ours", batch), self.rate("torch_nocache", batch))

    def vs_cache(self, batch: int) -> float | None:
        return self._ratio(self.rate("ours", batch), self.rate("torch_cache", batch))

    def int8_vs_ct2_int8(self, batch: int) -> float | None:
        return self._ratio(self.rate("ours_int8", batch), self.best_ct2(batch, CT2_INT8))

    def quality(self, engine: str, key: str) -> float | None:
        """Test-split BLEU or exact match of an engine's parity run (None: not in the report)."""
        return _num(_get(self.data, "quality", engine, key))

    def int8_drop(self, key: str) -> float | None:
        """float32 - int8 test-split `bleu` or `exact_match`: what int8 costs in quality."""
        ours, int8 = self.quality("ours", key), self.quality("ours_int8", key)
        return None if ours is None or int8 is None else ours - int8

    def attention_cost(self, batch: int) -> float | None:
        ratio = self._ratio(self.rate("ours_attention", batch), self.rate("ours", batch))
        return None if ratio is None else 1.0 - ratio

    def headline_batch(self) -> int | None:
        """Batch 128 where ours ran it, else the largest batch ours ran."""
        measured = [b for b in self.batches if self.rate("ours", b) is not None]
        if ATTENTION_BATCH in measured:
            return ATTENTION_BATCH
        return measured[-1] if measured else None


def _settings(data: dict[str, Any]) -> list[dict[str, Any]]:
    settings = data.get("settings")
    return [s for s in settings if isinstance(s, dict)] if isinstance(settings, list) else []


def _batch_size(setting: dict[str, Any]) -> float | None:
    return _num(setting.get("max_batch_size")) or _num(_float(_get(setting, "values", "max_batch_size")))


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _batching(setting: dict[str, Any]) -> bool:
    size = _batch_size(setting)
    return size is not None and size > 1


def _points(setting: dict[str, Any]) -> list[dict[str, Any]]:
    points = setting.get("points")
    return [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []


def _point(setting: dict[str, Any], clients: int) -> dict[str, Any] | None:
    closed = (p for p in _points(setting) if p.get("mode") == "closed" and p.get("concurrency") == clients)
    return next(closed, None)


def _load_key(point: dict[str, Any]) -> tuple[int, float]:
    if point.get("mode") == "closed":
        return (0, _num(point.get("concurrency")) or 0.0)
    return (1, _num(point.get("rate")) or 0.0)


def _load_label(key: tuple[int, float]) -> str:
    if key[0] == 0:
        clients = int(key[1])
        return f"{clients} client" + ("" if clients == 1 else "s")
    return f"{key[1]:g} req/s offered"


def _values(setting: dict[str, Any]) -> str:
    values = setting.get("values")
    if isinstance(values, dict) and values:
        return ", ".join(f"{k}={v}" for k, v in values.items())
    return DASH


def _half(setting: dict[str, Any]) -> tuple[float | None, float | None, bool | None]:
    """p99 at half of saturation, its bound and whether it is within, as the report recorded them."""
    half = setting.get("half_saturation")
    if not isinstance(half, dict):
        return None, None, None
    p99, bound = _num(half.get("p99_ms")), _num(half.get("bound_ms"))
    within = half.get("within_bound")
    if not isinstance(within, bool):
        within = None if p99 is None or bound is None else p99 <= bound
    return p99, bound, within


def _best_setting(data: dict[str, Any]) -> dict[str, Any] | None:
    """The setting with the most requests/s at LOAD_CLIENTS clients (batching settings first)."""
    candidates = [s for s in _settings(data) if _batching(s)] or _settings(data)
    scored = [(_num(_get(_point(s, LOAD_CLIENTS), "requests_per_s")), s) for s in candidates]
    scored = [(r, s) for r, s in scored if r is not None]
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


# ------------------------------------------------------------------------------------------------- sections


def engine_section(run: Run) -> list[str]:
    engine = Engine(run.data)
    if not engine.batches:
        return ["No engine figures in this run."]
    header = ["engine (sentences/s)"] + [f"batch {b:,}" for b in engine.batches]
    rows = [[engine.label(e)] + [fmt(engine.rate(e, b)) for b in engine.batches] for e in engine.engines]
    lines = table(header, rows) + [""]
    ratios: list[tuple[str, Callable[[int], float | None], Callable[[float | None], str]]] = [
        ("ours / faster CTranslate2 float32", engine.vs_ct2, times),
        ("ours / PyTorch without cache", engine.vs_nocache, times),
        ("ours / PyTorch with KV cache", engine.vs_cache, times),
        ("attention-map cost (1 − with maps / without)", engine.attention_cost, percent),
        ("ours int8 / faster CTranslate2 int8", engine.int8_vs_ct2_int8, times),
    ]
    header = ["ratio"] + [f"batch {b:,}" for b in engine.batches]
    lines += table(header, ([name] + [show(f(b)) for b in engine.batches] for name, f, show in ratios))
    scored = [e for e in engine.engines if engine.quality(e, "bleu") is not None]
    if scored:
        pairs = _get(run.data, "quality", scored[0], "pairs")
        lines += ["", f"Quality of each engine's parity run: the test split ({fmt(_num(pairs), ',.0f')} "
                  "pairs), greedy, against its references.", ""]
        lines += table(["engine", "BLEU", "exact match"],
                       ([engine.label(e), fmt(engine.quality(e, "bleu"), ".2f"),
                         percent(engine.quality(e, "exact_match"))] for e in scored))
    return lines


def load_section(run: Run) -> list[str]:
    settings = _settings(run.data)
    if not settings:
        return ["No load figures in this run."]
    keys = sorted({_load_key(p) for s in settings for p in _points(s)})
    header = ["setting", "batching"] + [_load_label(k) for k in keys]
    header += [
        f"gain at {LOAD_CLIENTS}",
        f"p99 at {LOAD_CLIENTS} (ms)",
        f"mean batch at {LOAD_CLIENTS}",
        f"svc/eng at {LOAD_CLIENTS}",
        "p99 at half saturation (bound), ms",
    ]
    rows = []
    for setting in settings:
        by_key = {_load_key(p): p for p in _points(setting)}
        at = _point(setting, LOAD_CLIENTS)
        p99, bound, within = _half(setting)
        half = DASH if p99 is None else f"{p99:,.1f} ({fmt(bound)})" + ("" if within is None else (
            " within" if within else " over"))
        rows.append(
            [str(setting.get("name", DASH)), _values(setting)]
            + [fmt(_num(_get(by_key.get(k), "requests_per_s"))) for k in keys]
            + [
                times(_num(_get(at, "gain_vs_off"))),
                fmt(_num(_get(at, "latency_ms", "p99"))),
                fmt(_num(_get(at, "server", "mean_batch_size")), ".2f"),
                fmt(_num(_get(at, "service_over_engine")), ".2f"),
                half,
            ]
        )
    lines = ["Requests/s, closed loop (one text per request); gain: against batching off at the same "
             "concurrency; svc/eng: the service against the engine in process at the batch size the batcher "
             "formed; bound: the report's own, 2 × (unloaded p50 + max_queue_delay).", ""]
    return lines + table(header, rows)


def soak_section(run: Run) -> list[str]:
    data, soak = run.data, run.data.get("soak") if isinstance(run.data.get("soak"), dict) else {}
    memory = data.get("memory") if isinstance(data.get("memory"), dict) else {}
    start, end = _num(_get(memory, "start_mib")), _num(_get(memory, "end_mib"))
    passed = data.get("passed")
    header = ["setting", "offered req/s", "achieved req/s", "seconds", "OK", "errors", "p50 ms", "p99 ms",
              "max ms", "RSS start → end MiB", "growth MiB", "second-half slope MiB/h", "passed"]
    row = [
        str(_get(data, "setting", "name") or DASH),
        fmt(_num(data.get("rate"))),
        fmt(_num(soak.get("requests_per_s"))),
        fmt(_num(soak.get("duration_s")), "g"),
        fmt(_num(soak.get("ok")), ",.0f"),
        fmt(_num(soak.get("error_count")), ",.0f"),
        fmt(_num(_get(soak, "latency_ms", "p50"))),
        fmt(_num(_get(soak, "latency_ms", "p99"))),
        fmt(_num(_get(soak, "latency_ms", "max"))),
        f"{fmt(start)} → {fmt(end)}",
        fmt(_num(memory.get("growth_mib")), ".2f"),
        fmt(_num(memory.get("second_half_slope_mib_per_hour"))),
        DASH if not isinstance(passed, bool) else ("yes" if passed else "no"),
    ]
    return table(header, [row])


def _phase(row: dict[str, Any], name: str) -> str:
    ms, share = _num(_get(row, "phases", name, "ms_per_call")), _num(_get(row, "phases", name, "share"))
    if ms is None:
        return DASH
    return f"{ms:.2f} ({percent(share)})"


def _word(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def phases_section(run: Run) -> list[str]:
    data = run.data
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    keys = ("provider", "lanes", "io_binding", "threads")
    setup = ", ".join(f"{k} {_word(data[k])}" for k in keys if k in data)
    if (_num(data.get("lanes")) or 1) > 1:
        setup += "; several lanes run phases in parallel, so their shares can add up to more than 100%"
    header = ["batch", "sentences/s", "decoder step ms (share)", "encoder ms (share)",
              "row selection ms (share)", "host share"]
    body = [
        [fmt(_num(r.get("batch_size")), ",.0f"), fmt(_num(r.get("sentences_per_s"))), _phase(r, "step"),
         _phase(r, "encode"), _phase(r, "select"), percent(_num(r.get("host_share")))]
        for r in sorted(rows, key=lambda r: _num(r.get("batch_size")) or 0.0)
    ]
    return ([setup + ".", ""] if setup else []) + table(header, body)


def _baseline_rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(our setting, baseline name, our point, the baseline's) at LOAD_CLIENTS clients."""
    rows = []
    for baseline in data.get("baselines", []):
        theirs = _point(baseline, LOAD_CLIENTS)
        for setting in _settings(data):
            ours = _point(setting, LOAD_CLIENTS)
            if ours and theirs:
                precision = _get(setting, "values", "precision") or FLOAT32
                rows.append((str(setting.get("name", DASH)), str(baseline.get("name", DASH)),
                             {**ours, "precision": precision}, theirs))
    return rows


def baseline_section(run: Run) -> list[str]:
    lines = [
        "Our service against what a user could write instead (bench/ctranslate2_server.py: CTranslate2 "
        f"behind grpc.aio with a 5 ms micro-batcher, the same weights), the same client, {LOAD_CLIENTS} "
        "closed-loop clients, one text per request; its outputs were checked equal to ours first.",
        "",
    ]
    rows = []
    for name, baseline, ours, theirs in _baseline_rows(run.data):
        mine, other = _num(ours.get("requests_per_s")), _num(theirs.get("requests_per_s"))
        equal = next((b.get("outputs_equal", {}) for b in run.data["baselines"] if b.get("name") == baseline),
                     {})  # fmt: skip
        ratio = None if not other or mine is None else mine / other
        p99s = [fmt(_num(_get(point, "latency_ms", "p99"))) for point in (ours, theirs)]
        rows.append([name, baseline, fmt(mine), fmt(other), times(ratio), " / ".join(p99s),
                     f"{equal.get('equal', DASH)} of {equal.get('texts', DASH)}"])  # fmt: skip
    return lines + table(["ours", "baseline", "ours req/s", "baseline req/s", "ours / baseline",
                          "p99 ms (ours / baseline)", "outputs equal"], rows)


def log_section(run: Run) -> list[str]:
    return [f"Last line of the log: {code(run.log_tail)}" if run.log_tail else "No figures recorded."]


SECTIONS: dict[str, Callable[[Run], list[str]]] = {
    "engine": engine_section,
    "load": load_section,
    "soak": soak_section,
    "phases": phases_section,
    "baseline": baseline_section,
}


def headline(run: Run) -> str:
    """The run's one to three headline figures."""
    data = run.data
    if run.kind == "engine":
        engine = Engine(data)
        batch = engine.headline_batch()
        if batch is None:
            return DASH
        parts = [f"ours {fmt(engine.rate('ours', batch))} sent/s at batch {batch:,}"]
        for value, text in (
            (engine.vs_ct2(batch), "CTranslate2 f32"),
            (engine.vs_nocache(batch), "PyTorch no cache"),
            (engine.attention_cost(batch), "maps cost"),
        ):
            if value is not None and len(parts) < 3:
                parts.append(f"{text} {percent(value)}" if text == "maps cost" else f"{times(value)} {text}")
        return "; ".join(parts)
    if run.kind == "load":
        best = _best_setting(data)
        if best is None:
            return DASH
        at = _point(best, LOAD_CLIENTS)
        rate = fmt(_num(_get(at, "requests_per_s")))
        parts = [f"{best.get('name', DASH)} {rate} req/s at {LOAD_CLIENTS} clients"]
        gain = _num(_get(at, "gain_vs_off"))
        if gain is not None:
            parts[0] += f" ({times(gain)})"
        svc = _num(_get(at, "service_over_engine"))
        if svc is not None:
            parts.append(f"svc/eng {svc:.2f}")
        p99, bound, _ = _half(best)
        if p99 is not None:
            parts.append(f"p99 at half saturation {p99:,.1f} ms (bound {fmt(bound)})")
        return "; ".join(parts)
    if run.kind == "baseline":
        parts = []
        for name, baseline, ours, theirs in _baseline_rows(data):
            mine, other = _num(ours.get("requests_per_s")), _num(theirs.get("requests_per_s"))
            if mine is not None and other:
                parts.append(f"{name} / {baseline} {times(mine / other)} at {LOAD_CLIENTS} clients")
        return "; ".join(parts) or DASH
    if run.kind == "soak":
        soak = data.get("soak") if isinstance(data.get("soak"), dict) else {}
        parts = [f"{fmt(_num(data.get('rate')))} req/s for {fmt(_num(soak.get('duration_s')), 'g')} s, "
                 f"{fmt(_num(soak.get('error_count')), ',.0f')} errors",
                 f"p99 {fmt(_num(_get(soak, 'latency_ms', 'p99')))} ms",
                 f"RSS growth {fmt(_num(_get(data, 'memory', 'growth_mib')), '.2f')} MiB"]
        return "; ".join(parts)
    if run.kind == "phases":
        rows = [r for r in data.get("rows", []) if isinstance(r, dict) and _num(r.get("batch_size"))]
        if not rows:
            return DASH
        top = max(rows, key=lambda r: _num(r.get("batch_size")) or 0.0)
        step = _num(_get(top, "phases", "step", "ms_per_call"))
        return (f"batch {fmt(_num(top.get('batch_size')), ',.0f')}: {fmt(_num(top.get('sentences_per_s')))} "
                f"sent/s, decoder step {fmt(step, '.2f')} ms")
    return code(run.log_tail) if run.log_tail else DASH


# ------------------------------------------------------------------------------------------------- targets


def _verdict(figures: list[tuple[str, str, bool]]) -> tuple[str, str]:
    """(setting, figure, met) per setting -> ("b16 3.32×, b64 3.22×", "met", "met by b16 only" or "missed"):
    a target is met when every batching setting meets it."""
    if not figures:
        return DASH, "not measured"
    met = [name for name, _, ok in figures if ok]
    result = "met" if len(met) == len(figures) else f"met by {', '.join(met)} only" if met else "missed"
    return ", ".join(f"{name} {text}" for name, text, _ in figures), result


def _why(machine: str, key: str, result: str, base: Path) -> str:
    """For a target not met, a link to where the docs say why (WHY_MISSED); "—" otherwise."""
    kind = "cpu" if machine.startswith("cpu") else "gpu"
    where = WHY_MISSED.get((key, kind))
    if result in ("met", "not measured") or where is None:
        return DASH
    page, _, anchor = where.partition("#")
    target = Path(os.path.relpath(DOCS / page, base)).as_posix() + (f"#{anchor}" if anchor else "")
    return f"[{Path(page).stem}]({target})"


def target_rows(
    machine: str, engine_run: Run | None, load_run: Run | None, baseline_run: Run | None = None,
    base: Path = DOCS,
) -> list[list[str]]:
    """One row per target: machine, target, figure, result, why (when missed: a link to the reason), run;
    `base` is the folder of the page the links are written in."""
    rows: list[list[str]] = []

    def add(key: str, target: str, figure: str, result: str, run: Run | None) -> None:
        stamp = DASH if run is None else f"{run.date} {run.commit}"
        rows.append([machine, target, figure, result, _why(machine, key, result, base), stamp])

    def one(
        value: float | None, ok: Callable[[float], bool], show: Callable[[float | None], str]
    ) -> tuple[str, str]:
        if value is None:
            return DASH, "not measured"
        return show(value), "met" if ok(value) else "missed"

    engine = Engine(engine_run.data) if engine_run else None
    for batch in CT2_BATCHES:
        figure, result = one(engine.vs_ct2(batch) if engine else None, lambda v: v >= CT2_RATIO_MIN, times)
        add("ct2", f"ours ≥ {CT2_RATIO_MIN:g}× the faster CTranslate2 float32, batch {batch}", figure, result,
            engine_run)
    for batch in TARGET_BATCHES:
        ratio = engine.vs_nocache(batch) if engine else None
        figure, result = one(ratio, lambda v: v >= NOCACHE_RATIO_MIN, times)
        add("nocache", f"ours ≥ {NOCACHE_RATIO_MIN:g}× PyTorch without cache, batch {batch}", figure, result,
            engine_run)
    for batch in TARGET_BATCHES:
        cost = engine.attention_cost(batch) if engine else None
        figure, result = one(cost, lambda v: v <= ATTENTION_COST_MAX, percent)
        add("attention", f"attention maps cost ≤ {ATTENTION_COST_MAX:.0%}, batch {batch}", figure, result,
            engine_run)
    for batch in TARGET_BATCHES:
        ratio = engine.int8_vs_ct2_int8(batch) if engine else None
        figure, result = one(ratio, lambda v: v >= INT8_RATIO_MIN, times)
        add("int8", f"ours int8 ≥ {INT8_RATIO_MIN:g}× the faster CTranslate2 int8, batch {batch}", figure,
            result, engine_run)
    drop = engine.int8_drop("bleu") if engine else None
    figure, result = one(drop, lambda v: v <= INT8_BLEU_DROP_MAX, lambda v: fmt(v, "+.2f"))
    add("int8_quality", f"int8 test BLEU within {INT8_BLEU_DROP_MAX:g} of float32 (float32 − int8)", figure,
        result, engine_run)
    drop = engine.int8_drop("exact_match") if engine else None
    figure, result = one(drop, lambda v: v <= INT8_EXACT_DROP_MAX, points)
    add("int8_quality", f"int8 test exact match within {100 * INT8_EXACT_DROP_MAX:g} point of float32",
        figure, result, engine_run)

    settings = [s for s in _settings(load_run.data) if _batching(s)] if load_run else []
    gains: list[tuple[str, str, bool]] = []
    svc: list[tuple[str, str, bool]] = []
    tails: list[tuple[str, str, bool]] = []
    for s in settings:
        name, at = str(s.get("name", DASH)), _point(s, LOAD_CLIENTS)
        gain, ratio = _num(_get(at, "gain_vs_off")), _num(_get(at, "service_over_engine"))
        if gain is not None:
            gains.append((name, times(gain), gain >= GAIN_MIN))
        if ratio is not None:
            svc.append((name, f"{ratio:.2f}", ratio >= SVC_ENG_MIN))
        p99, bound, within = _half(s)
        if p99 is not None and within is not None:
            tails.append((name, f"{p99:,.1f} ({fmt(bound)})", within))
    add("load", f"batching gain ≥ {GAIN_MIN:g}× batching off, {LOAD_CLIENTS} clients", *_verdict(gains),
        load_run)
    add("load", f"service / engine ≥ {SVC_ENG_MIN:g}, {LOAD_CLIENTS} clients", *_verdict(svc), load_run)
    add("load", "p99 at half of saturation ≤ its bound, ms (bound)", *_verdict(tails), load_run)
    versus: dict[str, list[tuple[str, str, bool]]] = {"ctranslate2": [], "ctranslate2-int8": []}
    for name, baseline, ours, theirs in _baseline_rows(baseline_run.data) if baseline_run else []:
        mine, other = _num(ours.get("requests_per_s")), _num(theirs.get("requests_per_s"))
        # Like against like: our float32 settings against CTranslate2 float32, our int8 ones against its int8.
        if baseline != BASELINE_OF.get(ours.get("precision", FLOAT32)) or mine is None or not other:
            continue
        p99s = [_num(_get(point, "latency_ms", "p99")) for point in (ours, theirs)]
        tail_ok = baseline != "ctranslate2" or (None not in p99s and p99s[0] <= p99s[1])
        tail = f" (p99 {fmt(p99s[0])} / {fmt(p99s[1])} ms)" if baseline == "ctranslate2" else ""
        versus[baseline].append((name, times(mine / other) + tail,
                                 mine / other >= BASELINE_RATIO_MIN[baseline] and tail_ok))
    float32_min = BASELINE_RATIO_MIN["ctranslate2"]
    add("baseline", f"service ≥ {float32_min:g}× the minimal CTranslate2 float32 server with p99 no worse, "
        f"{LOAD_CLIENTS} clients", *_verdict(versus["ctranslate2"]), baseline_run)
    int8_min = BASELINE_RATIO_MIN["ctranslate2-int8"]
    add("baseline", f"int8 service ≥ {int8_min:g}× the minimal CTranslate2 int8 server, "
        f"{LOAD_CLIENTS} clients", *_verdict(versus["ctranslate2-int8"]), baseline_run)
    return rows


# ------------------------------------------------------------------------------------------------- document


def _link(run: Run, base: Path) -> str:
    return f"[{run.folder.name}]({Path(os.path.relpath(run.folder, base)).as_posix()}/)"


def _stamp(run: Run, base: Path) -> list[str]:
    lines = [f"Run of {run.date}, commit {code(run.commit)}: {_link(run, base)}."]
    if run.command:
        lines += [f"Command: {code(run.command)}."]
    if run.note:
        lines += [f"Note: {run.note}."]
    return lines


def render(runs: Sequence[Run], base: Path, results: Path) -> str:
    """The whole of PERFORMANCE.md; `base` is the folder it is written to (links are relative to it)."""
    results_rel = Path(os.path.relpath(results, base)).as_posix()
    out: list[str] = [
        "# Performance",
        "",
        f"<!-- Generated by `{COMMAND}` from {results_rel}/: do not edit by hand. -->",
        "",
        f"**Generated file: do not edit by hand.** `{COMMAND}` (or `python -m bench.performance`) writes "
        f"it from the benchmark runs under [{results_rel}/]({results_rel}/), one folder per run named "
        "`<date>_<commit>_<machine>_<bench>` (the raw files as the benchmark wrote them, and a `run.json` "
        f"with the command and the device). To change it, add or fix a run folder and run `{COMMAND}` again; "
        f"`{COMMAND} --check` fails when this file is out of date. A figure a run did not record shows as "
        f"\"{DASH}\". Machines: `cpu<N>` is a CPU-only machine with N cores, otherwise the GPU's model.",
        "",
        "Sections: [Current figures](#current-figures) (the latest run of each benchmark, per machine), "
        "[Targets](#targets), [History](#history).",
        "",
        "## Current figures",
    ]
    current = latest(runs)
    machines = sorted({r.machine for r in runs})
    for machine in machines:
        mine = [r for r in runs if r.machine == machine]
        device = next((r.device for r in reversed(mine) if r.device), None)
        out += ["", f"### {machine}", ""]
        if device:
            out += [f"Device: {device}.", ""]
        for bench in sorted({r.bench for r in mine}):
            run = current[(machine, bench)]
            out += [f"#### {bench}", ""] + _stamp(run, base) + [""]
            out += SECTIONS.get(run.kind, log_section)(run) + [""]
    out += [
        "## Targets",
        "",
        "On each machine's latest `engine` and `load` runs. Engine: ours against the faster of the two "
        "CTranslate2 float32 configurations and against PyTorch eager without a KV cache, and the cost of "
        "returning every attention map. Load, for each batching setting (`max_batch_size` > 1) of the "
        "report: "
        f"the gain in requests/s against batching off at {LOAD_CLIENTS} clients, the service's throughput "
        "against the engine's own at the batch size formed, and the p99 at half of the saturation throughput "
        "against the bound the report computed; a target is met when every batching setting meets it.",
        "",
    ]
    target_table = []
    for machine in machines:
        engine_run, load_run = current.get((machine, "engine")), current.get((machine, "load"))
        baseline_run = current.get((machine, "load-baseline"))
        if engine_run or load_run or baseline_run:
            target_table += target_rows(machine, engine_run, load_run, baseline_run, base)
    out += table(["machine", "target", "figure", "result", "why", "run (date, commit)"], target_table)
    out += ["", "## History", "", "Every run, newest first.", ""]
    history = [
        [r.date, code(r.commit), r.machine, r.bench, headline(r), _link(r, base)]
        for r in sorted(runs, key=lambda r: r.order, reverse=True)
    ]
    out += table(["date", "commit", "machine", "bench", "headline figures", "files"], history)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, metavar="DIR",
                        help="the run folders (default: docs/results)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE",
                        help="the file to write (default: docs/PERFORMANCE.md)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit status 1 when FILE differs from what would be written")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results, out = args.results.resolve(), args.out.resolve()
    runs = read_runs(results)
    text = render(runs, out.parent, results)
    if args.check:
        current = out.read_text() if out.is_file() else None
        if current != text:
            print(f"{COMMAND}: {args.out} is out of date: run `{COMMAND}`", file=sys.stderr)
            raise SystemExit(1)
        print(f"{args.out} is up to date ({len(runs)} runs)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {args.out} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
