"""`translator-bench phases`: where a greedy batch's time goes inside the engine, per batch size.

Each batch is timed whole (`Engine.search_ids`) and by phase: encoder runs, decoder steps and row selections
(`select`: finished rows leaving the batch), as the backend's calls; the rest is the search's own work on the
host (argmax, bookkeeping, callbacks). On CPU with several lanes the phases run in parallel, so their
shares of the wall time can add up to more than 100%. This is the measurement behind the GPU notes in
docs/ENGINE.md: on a GPU a decoder step of this small model costs about the same at batch 1 and batch
1024 (kernel launches, not arithmetic), so anything that adds calls or host copies per step shows here first.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.load import DEFAULT_MODEL, DEFAULT_REPOSITORY
from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from service.core.cli import input_file, output_file, positive_int, positive_ints
from service.core.options import TranslateOptions
from service.engine.engine import Engine

PHASES = ("encode", "step", "select")


def timed(
    method: Callable[..., Any], totals: dict[str, list[float]], name: str, lock: threading.Lock
) -> Callable[..., Any]:
    """`method`, adding its calls and seconds to totals[name] (under `lock`: lanes call it concurrently)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            with lock:
                totals[name][0] += 1
                totals[name][1] += elapsed
    return run


def measure(engine: Engine, sources: list[list[int]], batch_size: int, min_sentences: int) -> dict[str, Any]:
    """Greedy search over consecutive batches of `sources` (at least `min_sentences`, whole batches)."""
    if not sources:
        raise ValueError("no sentences to translate")
    totals: dict[str, list[float]] = {name: [0, 0.0] for name in PHASES}
    lock = threading.Lock()
    backend = engine.runner.backend
    originals = {name: getattr(backend, name) for name in PHASES}
    # Wrappers go on the instance; whatever the instance itself held before is put back afterwards.
    own = {name: vars(backend)[name] for name in PHASES if name in vars(backend)}
    options = TranslateOptions()
    engine.search_ids(sources[:batch_size], options)  # warm-up: allocations, kernel selection
    batches = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
    while sum(len(b) for b in batches) < min_sentences:
        batches += batches
    sentences = 0
    for name in PHASES:
        setattr(backend, name, timed(originals[name], totals, name, lock))
    try:
        started = time.perf_counter()
        for batch in batches:
            engine.search_ids(batch, options)
            sentences += len(batch)
            if sentences >= min_sentences:
                break
        seconds = time.perf_counter() - started
    finally:
        for name in PHASES:
            if name in own:
                setattr(backend, name, own[name])
            else:
                delattr(backend, name)
    phases = {
        name: {"calls": int(calls), "ms_per_call": round(1e3 * spent / calls, 4) if calls else None,
               "share": round(spent / seconds, 4)}
        for name, (calls, spent) in totals.items()
    }
    # With parallel lanes the phases overlap: what is left of the wall time means nothing then.
    host = round(1 - sum(p["share"] for p in phases.values()), 4) if engine.lanes == 1 else None
    return {"batch_size": batch_size, "sentences": sentences, "seconds": round(seconds, 4),
            "sentences_per_s": round(sentences / seconds, 2), "phases": phases, "host_share": host}


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per batch size: throughput, then calls, ms per call and share of the time per phase."""
    titles = [f"{name}: calls  ms/call  share" for name in PHASES]
    header = f"{'batch':>6} {'sent/s':>9}" + "".join(f" {title:>34}" for title in titles)
    lines = [header + f" {'host':>6}"]
    for row in rows:
        cells = []
        for name in PHASES:
            phase = row["phases"][name]
            per_call = f"{phase['ms_per_call']:.3f}" if phase["ms_per_call"] is not None else "-"
            cells.append(f" {phase['calls']:>12} {per_call:>10} {100 * phase['share']:>9.0f}%")
        host = "-" if row["host_share"] is None else f"{100 * row['host_share']:.0f}%"
        start = f"{row['batch_size']:>6} {row['sentences_per_s']:>9.1f}"
        lines.append(start + "".join(cells) + f" {host:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="translator-bench phases", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="onnxruntime threads (CPU: one lane each)")
    parser.add_argument("--lanes", type=positive_int,
                        help="decoding lanes (default: one per thread on CPU, 1 on GPU)")
    parser.add_argument("--io-binding", choices=("auto", "on", "off"), default="auto",
                        help="caches kept as device values between steps (auto: on for CUDA)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 32, 128, 512],
                        help="comma-separated")
    parser.add_argument("--sentences", type=positive_int, default=512,
                        help="sentences timed per batch size (batch "
                        "1: an eighth of them)")
    parser.add_argument("--sentence-file", type=input_file, default=DEFAULT_SENTENCES)
    parser.add_argument("--json", type=output_file, help="write the figures here")
    args = parser.parse_args(argv)
    sizes = args.batch_sizes
    io_binding = {"auto": None, "on": True, "off": False}[args.io_binding]
    engine = Engine.load(args.model_repository, args.model, device=args.device, threads=args.threads,
                         io_binding=io_binding, lanes=args.lanes)
    texts = read_sentences(args.sentence_file)
    sources = [s.ids for s in engine.encode_texts(texts)]
    print(f"translator-bench phases: {engine.provider}, {engine.lanes} lane(s), IO binding "
          f"{'on' if engine.io_binding else 'off'}, batch sizes {sizes}", file=sys.stderr, flush=True)
    rows = []
    for size in sizes:
        wanted = max(1, args.sentences // 8) if size == 1 else args.sentences  # batch 1 is the slow one
        rows.append(measure(engine, sources, size, max(size, wanted)))
        print(f"  batch {size}: {rows[-1]['sentences_per_s']:.1f} sentences/s", file=sys.stderr, flush=True)
    command = shlex.join(["translator-bench", "phases", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "provider": engine.provider, "lanes": engine.lanes,
              "io_binding": engine.io_binding, "threads": args.threads, "rows": rows}
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
