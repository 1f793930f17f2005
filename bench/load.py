"""`translator-bench load`: load tests of the gRPC service (grpc.aio clients, real sockets).

Three modes, one command:

* sweep (default): closed loop with N concurrent clients (``--concurrency 1,8,64,256``) and/or open loop at
  fixed request rates (``--rate 50,100``, Poisson or uniform arrivals), against a running server
  (``--server host:port``) or against servers it starts itself, one per batching setting (``--spawn``,
  ``--batching "off:max_batch_size=1;b16:max_batch_size=16,max_queue_delay_ms=5"``).
* ``--report FILE``: the batching report. Every batching setting is driven with 1, 8, 64 and 256 clients;
  the throughput gain against batching off, the engine's own in-process throughput at the batch size the
  batcher really formed (read from the server's batch-size histogram) and the cost of gRPC + batching
  (service / engine), and the p99 latency at half of the saturation throughput against the bound
  "unloaded p50 + max_queue_delay".
* ``--soak``: find the saturation throughput quickly, run at ``--target-fraction`` of it for ``--duration``
  seconds; errors (must be zero: exit status 1 otherwise), throughput and latency per time window, and the
  server's resident memory over time (VmRSS of /proc/<pid>/status, its lane processes included).

Every loop is bounded in time (``--warmup`` + ``--duration`` + the per-call ``--timeout-s``) and in count
(``--max-requests`` per point). Results go to stdout as a table, to ``--json`` and to a ``--plot`` PNG.

Serving-side module: imports grpc, numpy and service.* only (never torch or model/); the engine baseline runs
in a subprocess (``python -m bench.load --engine-baseline ...``) so it never competes with a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load_driver import DEFAULT_SENTENCES, Driver, Workload, read_sentences
from bench.load_report import BOUND_FACTOR, format_ms, plot, soak_summary, table
from bench.results import run_folder, write_run_json
from bench.servers import ServerStartError, Setting, Target, parse_batching, rss_mib, spawn_server
from service.api.kinds import KIND_ENUMS
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.core.cli import (
    absolute_path,
    finite_float,
    input_file,
    nonnegative_float,
    output_file,
    positive_float,
    positive_int,
    server_address,
)
from service.server import event_loop
from service.server.config import ROOT, ServerConfig

DEFAULT_REPOSITORY = ROOT / "model_repository"
DEFAULT_MODEL = "toy-en-es"
DEFAULT_CONCURRENCY = (1, 8, 64, 256)
DEFAULT_BATCHING = (
    "off:max_batch_size=1;"
    "b16:max_batch_size=16,max_queue_delay_ms=5;"
    "b64:max_batch_size=64,max_queue_delay_ms=5;"
    "b64-iter:max_batch_size=64,max_queue_delay_ms=5,iteration_batching=on"
)
SOAK_BATCHING = "b64:max_batch_size=64,max_queue_delay_ms=5"
# What a user could write instead (bench/ctranslate2_server.py), by name: its CTranslate2 compute type.
BASELINES = {"ctranslate2": "float32", "ctranslate2-int8": "int8"}
BASELINE_CHECK_TEXTS = 200  # sentences translated by both before timing: the outputs must be equal
SATURATION_CONCURRENCY = 64  # closed loop at this many clients measures the saturation throughput
MAX_SOAK_S = 24 * 3600.0
MIN_SLOPE_SPAN_S = 50.0  # the soak reports an RSS trend only over at least this many seconds
SOAK_WARMUP_S = 30.0  # the soak's RSS growth is measured from this long after its start (or a tenth of it)



def progress(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Settings and workload
# ---------------------------------------------------------------------------------------------------------


def parse_numbers(text: str, kind: type = int) -> list[Any]:
    """'1,8,64' -> [1, 8, 64]: positive (finite) numbers separated by commas, none empty."""
    parse = positive_int if kind is int else positive_float
    try:
        return [parse(part) for part in text.replace(" ", "").split(",")]
    except argparse.ArgumentTypeError:
        expected = "positive numbers separated by commas"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None





# ---------------------------------------------------------------------------------------------------------
# Engine baseline (runs in its own process)
# ---------------------------------------------------------------------------------------------------------


def engine_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """In-process throughput of Engine.translate at each batch size, on batches drawn from the sentences."""
    from service.core.options import TranslateOptions
    from service.engine.engine import Engine

    engine = Engine.load(args.model_repository, args.model, device=args.device, threads=args.server_threads,
                         lanes=args.server_lanes)
    workload = Workload(read_sentences(args.sentences), attention=tuple(args.attention or ()))
    options = TranslateOptions(
        beam_size=args.beam_size or 1,
        max_length=args.max_length,
        attention=frozenset(workload.attention),
    )
    rng = random.Random(args.seed)
    engine.translate(workload.sentences[:4], options, batch_size=4)  # warm-up
    results = []
    for size in args.batch_sizes:
        sentences = tokens = runs = 0
        elapsed = 0.0
        while runs < 2 or (elapsed < args.engine_seconds and runs < 10_000):
            batch = [rng.choice(workload.sentences) for _ in range(size)]
            started = time.perf_counter()
            translations = engine.translate(batch, options, batch_size=size)
            elapsed += time.perf_counter() - started
            sentences += len(translations)
            tokens += sum(len(t.target_tokens) for t in translations)
            runs += 1
        results.append(
            {
                "batch_size": size,
                "batches": runs,
                "seconds": round(elapsed, 3),
                "sentences_per_s": round(sentences / elapsed, 3),
                "tokens_per_s": round(tokens / elapsed, 3),
                "ms_per_batch": round(elapsed / runs * 1000, 3),
            }
        )
        progress(f"engine batch {size}: {results[-1]['sentences_per_s']:.1f} sentences/s")
    return {
        "provider": engine.provider,
        "model": engine.model.name,
        "version": engine.model.version,
        "points": results,
    }


def run_engine_baseline(args: argparse.Namespace, batch_sizes: list[int]) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.load",
        "--engine-baseline",
        "--model-repository",
        str(args.model_repository),
        "--model",
        args.model,
        "--device",
        args.device,
        "--sentences",
        str(args.sentences),
        "--batch-sizes",
        ",".join(str(b) for b in batch_sizes),
        "--engine-seconds",
        str(args.engine_seconds),
        "--seed",
        str(args.seed),
    ]
    if args.server_threads:
        command += ["--server-threads", str(args.server_threads)]
    if args.server_lanes:
        command += ["--server-lanes", str(args.server_lanes)]
    if args.attention:
        command += ["--attention", ",".join(args.attention)]
    if args.beam_size:
        command += ["--beam-size", str(args.beam_size)]
    if args.max_length:
        command += ["--max-length", str(args.max_length)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    limit = 120 + len(batch_sizes) * (args.engine_seconds + 60)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the engine baseline failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_rate(engine: dict[str, Any], batch_size: float | None) -> dict[str, Any] | None:
    """The engine measurement at the batch size nearest to `batch_size` (rounded)."""
    if not engine or batch_size is None:
        return None
    wanted = max(1, round(batch_size))
    return min(engine["points"], key=lambda p: (abs(p["batch_size"] - wanted), p["batch_size"]))


# ---------------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------------


def _describe_point(name: str, point: dict[str, Any]) -> str:
    load = f"c={point['concurrency']}" if point["mode"] == "closed" else f"rate={point['rate']:.1f}/s"
    latency = point["latency_ms"]
    batch = point.get("server", {}).get("mean_batch_size")
    text = (
        f"[{name}] {point['mode']} {load}: {point['requests_per_s'] or 0:.1f} req/s, "
        f"{point['sentences_per_s'] or 0:.1f} sent/s, {point['tokens_per_s'] or 0:.0f} tok/s, "
        f"p50 {format_ms(latency['p50'])} p99 {format_ms(latency['p99'])} ms"
    )
    if batch is not None:
        text += f", mean batch {batch}"
    if point["error_count"]:
        text += f", errors {point['errors']}"
    return text


async def _drive_setting(
    args: argparse.Namespace,
    name: str,
    target: Target,
    workload: Workload,
    *,
    concurrency: list[int],
    rates: list[float],
    half_saturation: bool,
    queue_delay_ms: float,
) -> dict[str, Any]:
    channels = args.channels or min(max([*concurrency, 8 if rates else 1]), 16)
    driver = Driver(target, workload, channels=channels, timeout_s=args.timeout_s, seed=args.seed)
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {"points": points}
    try:
        await driver.ready()
        result["rss_mib_start"] = rss_mib(target.pid)
        for clients in concurrency:
            point = await driver.closed_loop(clients, args.warmup, args.duration, args.max_requests)
            points.append(point)
            progress(_describe_point(name, point))
        for rate in rates:
            point = await driver.open_loop(
                rate,
                args.warmup,
                args.duration,
                args.max_requests,
                arrivals=args.arrivals,
                max_inflight=args.max_inflight,
            )
            points.append(point)
            progress(_describe_point(name, point))
        if half_saturation:
            by_clients = {p["concurrency"]: p for p in points if p["mode"] == "closed"}
            saturated = by_clients.get(SATURATION_CONCURRENCY)
            if saturated is None:
                saturated = await driver.closed_loop(
                    SATURATION_CONCURRENCY, args.warmup, args.duration, args.max_requests
                )
                progress(_describe_point(name, saturated) + " (saturation)")
                saturated["role"] = "saturation"
                points.append(saturated)
            unloaded = by_clients.get(1)
            if unloaded is None:
                unloaded = await driver.closed_loop(1, args.warmup, args.duration, args.max_requests)
                progress(_describe_point(name, unloaded) + " (unloaded)")
                unloaded["role"] = "unloaded"
                points.append(unloaded)
            saturation = saturated["requests_per_s"] or 0.0
            entry: dict[str, Any] = {
                "saturation_requests_per_s": saturation,
                "saturation_concurrency": SATURATION_CONCURRENCY,
                "max_closed_loop_requests_per_s": max(
                    p["requests_per_s"] or 0.0 for p in points if p["mode"] == "closed"
                ),
                "unloaded_p50_ms": unloaded["latency_ms"]["p50"],
                "max_queue_delay_ms": queue_delay_ms,
            }
            if saturation > 0:
                half = await driver.open_loop(
                    saturation / 2,
                    args.warmup,
                    args.duration,
                    args.max_requests,
                    arrivals="poisson",
                    max_inflight=args.max_inflight,
                )
                progress(_describe_point(name, half) + " (half of saturation)")
                # The target: p99 at most 2 x (unloaded p50 + max_queue_delay).
                bound = BOUND_FACTOR * ((entry["unloaded_p50_ms"] or 0.0) + queue_delay_ms)
                p99 = half["latency_ms"]["p99"]
                entry.update(
                    point=half,
                    p99_ms=p99,
                    bound_ms=round(bound, 3),
                    within_bound=None if p99 is None else bool(p99 <= bound),
                    p99_over_bound=None if p99 is None or bound <= 0 else round(p99 / bound, 3),
                )
            result["half_saturation"] = entry
        result["rss_mib_end"] = rss_mib(target.pid)
    finally:
        await driver.close()
    return result


def _settings(args: argparse.Namespace) -> list[Setting]:
    spec = args.batching or (SOAK_BATCHING if args.soak else DEFAULT_BATCHING)
    return parse_batching(spec)


def _spawn_extra(args: argparse.Namespace, concurrency: list[int]) -> dict[str, str]:
    """Settings every spawned server gets (a batching setting may override them)."""
    extra = {"device": args.device, "log_level": "INFO"}
    if args.server_threads:
        extra["threads"] = str(args.server_threads)
    if args.server_lanes:
        extra["lanes"] = str(args.server_lanes)
    # Each in-flight call takes one of --max-concurrent-rpcs (--grpc-max-calls follows with its reserve):
    # enough of them that every client can be in the batcher.
    extra["max_concurrent_rpcs"] = str(max(ServerConfig().max_concurrent_rpcs, max([*concurrency, 1])))
    return extra


def run_sweep(args: argparse.Namespace, workload: Workload, report: bool) -> dict[str, Any]:
    concurrency = args.concurrency or (list(DEFAULT_CONCURRENCY) if report or not args.rate else [])
    rates = args.rate or []
    results: dict[str, Any] = {
        "kind": "report" if report else "sweep",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": _config(args, workload),
        "settings": [],
        "baselines": [],
    }
    if args.server:
        target = Target(args.server, args.metrics, args.server_pid)
        progress(f"target {args.server} (metrics {args.metrics or 'not read'})")
        outcome = event_loop.run(
            _drive_setting(
                args,
                "server",
                target,
                workload,
                concurrency=concurrency,
                rates=rates,
                half_saturation=False,
                queue_delay_ms=0.0,
            )
        )
        results["settings"].append({"name": "server", "values": {}, **outcome})
    else:
        settings = _settings(args)
        extra = _spawn_extra(args, concurrency + [SATURATION_CONCURRENCY] * report)
        results["config"]["spawn_defaults"] = extra
        for number, setting in enumerate(settings, start=1):
            progress(
                f"starting server {setting.name} ({number}/{len(settings)}): {setting.values or 'defaults'}"
            )
            with spawn_server(
                setting, args.model_repository, args.model, extra=extra, log_dir=args.log_dir
            ) as target:
                outcome = event_loop.run(
                    _drive_setting(
                        args,
                        setting.name,
                        target,
                        workload,
                        concurrency=concurrency,
                        rates=rates,
                        half_saturation=report,
                        queue_delay_ms=setting.queue_delay_ms,
                    )
                )
            results["settings"].append(
                {
                    "name": setting.name,
                    "values": setting.values,
                    "max_batch_size": setting.max_batch_size,
                    "max_queue_delay_ms": setting.queue_delay_ms,
                    **outcome,
                }
            )
        for name in args.baseline:
            results["baselines"].append(_run_baseline(args, name, workload, extra, concurrency, rates))
        _add_baseline_ratios(results)
    if report:
        _add_comparisons(args, results)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


def _same_outputs(args: argparse.Namespace, target: Target, workload: Workload) -> dict[str, Any]:
    """The baseline's translations of the workload's first sentences against our engine's (greedy)."""
    from service.core.options import TranslateOptions
    from service.engine.engine import Engine

    texts = workload.sentences[:BASELINE_CHECK_TEXTS]
    engine = Engine.load(args.model_repository, args.model, device="cpu", threads=1)
    try:
        ours = [t.text for t in engine.translate(texts, TranslateOptions())]
    finally:
        engine.close()
    channel = grpc.insecure_channel(target.address)
    try:
        answer = pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=texts), timeout=120)
    finally:
        channel.close()
    theirs = [t.text for t in answer.translations]
    equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return {"texts": len(texts), "equal": equal}


def _run_baseline(
    args: argparse.Namespace, name: str, workload: Workload, extra: dict[str, str], concurrency: list[int],
    rates: list[float],
) -> dict[str, Any]:  # fmt: skip
    values = {"compute_type": BASELINES[name]}
    if args.baseline_checkpoint is not None:
        values["checkpoint"] = str(args.baseline_checkpoint)
    setting = Setting(name, values)
    progress(f"starting baseline {name} (bench/ctranslate2_server.py, {BASELINES[name]})")
    with spawn_server(
        setting, args.model_repository, args.model, extra=extra, log_dir=args.log_dir,
        python_args=("-m", "bench.ctranslate2_server"),
    ) as target:  # fmt: skip
        same = _same_outputs(args, target, workload)
        progress(f"[{name}] outputs equal to ours on {same['equal']} of {same['texts']} sentences")
        outcome = event_loop.run(
            _drive_setting(args, name, target, workload, concurrency=concurrency, rates=rates,
                           half_saturation=False, queue_delay_ms=0.0)
        )  # fmt: skip
    return {"name": name, "compute_type": BASELINES[name], "outputs_equal": same, **outcome}


def _add_baseline_ratios(results: dict[str, Any]) -> None:
    """Each of our closed-loop points / the baseline's at the same concurrency: throughput and p99."""
    for baseline in results["baselines"]:
        theirs = {p["concurrency"]: p for p in baseline["points"] if p["mode"] == "closed"}
        for setting in results["settings"]:
            for point in setting["points"]:
                other = theirs.get(point.get("concurrency")) if point["mode"] == "closed" else None
                if other and other["requests_per_s"] and point["requests_per_s"] is not None:
                    point.setdefault("vs_baselines", {})[baseline["name"]] = {
                        "requests_per_s": round(point["requests_per_s"] / other["requests_per_s"], 3),
                        "p99_ms": [point["latency_ms"]["p99"], other["latency_ms"]["p99"]],
                    }


def baseline_summary(results: dict[str, Any]) -> str:
    lines = []
    for baseline in results.get("baselines", []):
        same = baseline["outputs_equal"]
        equal = f"{same['equal']} of {same['texts']}"
        lines.append(f"{baseline['name']}: outputs equal to ours on {equal} sentences")
        for setting in results["settings"]:
            for point in setting["points"]:
                ratio = point.get("vs_baselines", {}).get(baseline["name"])
                if ratio:
                    ours_p99, their_p99 = ratio["p99_ms"]
                    lines.append(
                        f"  {setting['name']} c={point['concurrency']}: ours / {baseline['name']} = "
                        f"{ratio['requests_per_s']:.2f}x req/s, p99 {ours_p99} vs {their_p99} ms"
                    )
    return "\n".join(lines)


def _add_comparisons(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Gain against batching off, and service / engine throughput at the batch size really formed."""
    settings = results["settings"]
    sizes = set(DEFAULT_CONCURRENCY) | {1}
    for setting in settings:
        for point in setting["points"]:
            mean = point.get("server", {}).get("mean_batch_size")
            if mean:
                sizes.add(max(1, round(mean)))
    progress(f"engine baseline in a subprocess at batch sizes {sorted(sizes)}")
    engine = run_engine_baseline(args, sorted(sizes)) if not args.no_engine else {}
    results["engine"] = engine
    baseline = next((s for s in settings if s.get("max_batch_size") == 1), None)
    for setting in settings:
        for point in setting["points"]:
            if point["mode"] != "closed":
                continue
            if baseline is not None:
                reference = next(
                    (
                        p
                        for p in baseline["points"]
                        if p["mode"] == "closed" and p["concurrency"] == point["concurrency"]
                    ),
                    None,
                )
                if reference and reference["sentences_per_s"]:
                    point["gain_vs_off"] = round(
                        (point["sentences_per_s"] or 0) / reference["sentences_per_s"], 3
                    )
            # The in-process engine runs float32: a setting at another precision has nothing to compare with.
            float32 = setting.get("values", {}).get("precision", "float32") == "float32"
            batch = point.get("server", {}).get("mean_batch_size")
            measured = engine_rate(engine, batch) if float32 else None
            if measured:
                point["engine_batch_size"] = measured["batch_size"]
                point["engine_sentences_per_s"] = measured["sentences_per_s"]
                point["service_over_engine"] = round(
                    (point["sentences_per_s"] or 0) / measured["sentences_per_s"], 3
                )


def run_soak(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    setting = next((s for s in _settings(args) if s.max_batch_size > 1), _settings(args)[0])
    duration = args.duration
    results: dict[str, Any] = {
        "kind": "soak",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": _config(args, workload),
        "setting": {"name": setting.name, "values": setting.values},
    }

    async def soak(target: Target) -> None:
        driver = Driver(
            target, workload, channels=args.channels or 16, timeout_s=args.timeout_s, seed=args.seed
        )
        try:
            await driver.ready()
            results["rss_mib_ready"] = rss_mib(target.pid)
            progress(
                f"[{setting.name}] finding saturation: closed loop c={SATURATION_CONCURRENCY}, "
                f"{args.saturation_s:g} s"
            )
            saturated = await driver.closed_loop(
                SATURATION_CONCURRENCY, min(args.warmup, 2.0), args.saturation_s, args.max_requests
            )
            progress(_describe_point(setting.name, saturated) + " (saturation)")
            saturation = saturated["requests_per_s"] or 0.0
            if saturation <= 0:
                raise RuntimeError(f"no request succeeded while finding saturation: {saturated['errors']}")
            rate = saturation * args.target_fraction
            results["saturation"] = saturated
            results["rate"] = round(rate, 3)
            results["rss_mib_start"] = rss_mib(target.pid)
            progress(
                f"[{setting.name}] soak: {rate:.1f} req/s ({args.target_fraction:.0%} of saturation) "
                f"for {duration:g} s, windows of {args.window:g} s"
            )
            ticker = asyncio.create_task(_tick(duration, args.window, target))
            try:
                point = await driver.open_loop(
                    rate,
                    args.warmup,
                    duration,
                    args.max_requests,
                    arrivals=args.arrivals,
                    max_inflight=args.max_inflight,
                    window_s=args.window,
                    rss_interval_s=args.rss_interval,
                )
            finally:
                ticker.cancel()
            results["soak"] = point
            results["rss_mib_end"] = rss_mib(target.pid)
        finally:
            await driver.close()

    if args.server:
        event_loop.run(soak(Target(args.server, args.metrics, args.server_pid)))
    else:
        extra = _spawn_extra(args, [SATURATION_CONCURRENCY])
        results["config"]["spawn_defaults"] = extra
        progress(f"starting server {setting.name}: {setting.values or 'defaults'}")
        with spawn_server(
            setting, args.model_repository, args.model, extra=extra, log_dir=args.log_dir
        ) as target:
            event_loop.run(soak(target))
    point = results["soak"]
    start, end = results.get("rss_mib_start"), results.get("rss_mib_end")
    samples = point.get("rss_samples", [])
    # Every figure is rounded the same way, so start <= max <= ... holds in the written numbers too.
    start = round(start, 2) if start is not None else None
    end = round(end, 2) if end is not None else None
    growth: dict[str, Any] = {"start_mib": start, "end_mib": end}
    if start is not None and end is not None:
        growth["growth_mib"] = round(end - start, 2)
        growth["growth_percent"] = round((end - start) / start * 100, 2) if start else None
    if len(samples) >= 4:
        times, values = np.array([t for t, _ in samples]), np.array([v for _, v in samples])
        half = times >= times[len(times) // 2]  # after the warm-up effects (arenas, caches) have settled
        # The start and end readings are taken outside the sampling loop: the maximum covers them too.
        ends = [v for v in (start, end) if v is not None]
        growth["max_mib"] = round(max(float(values.max()), *ends), 2)
        # Start, middle and end of the run, and the growth after warm-up (the first tenth of the run, at
        # least SOAK_WARMUP_S): what a leak would show and allocator arenas filling up at first would not.
        # Both ends of that growth are means over SOAK_WARMUP_S of samples: RSS wanders by a few MiB.
        warm = float(max(times[0] + SOAK_WARMUP_S, times[0] + 0.1 * np.ptp(times)))
        early = values[(times >= warm) & (times < warm + SOAK_WARMUP_S)]
        late = values[times >= times[-1] - SOAK_WARMUP_S]
        growth["middle_mib"] = round(float(values[np.abs(times - (times[0] + times[-1]) / 2).argmin()]), 2)
        growth["after_warmup_mib"] = growth["last_window_mib"] = growth["growth_after_warmup_percent"] = None
        if early.size and late.size and times[-1] - SOAK_WARMUP_S >= warm + SOAK_WARMUP_S:
            growth["after_warmup_mib"] = round(float(early.mean()), 2)
            growth["last_window_mib"] = round(float(late.mean()), 2)
            growth["growth_after_warmup_percent"] = round((float(late.mean() / early.mean()) - 1) * 100, 2)
        # RSS wanders by a few MiB from second to second: a trend over less than a minute is noise.
        if np.ptp(times[half]) >= MIN_SLOPE_SPAN_S:
            slope = np.polyfit(times[half], values[half], 1)[0]
            growth["second_half_slope_mib_per_hour"] = round(float(slope) * 3600, 2)
        else:
            growth["second_half_slope_mib_per_hour"] = None
    results["memory"] = growth
    results["errors"] = point["errors"]
    results["passed"] = point["error_count"] == 0 and point["ok"] > 0
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


async def _tick(duration: float, window: float, target: Target) -> None:
    """A progress line per window while the soak runs."""
    started = time.perf_counter()
    while True:
        await asyncio.sleep(window)
        elapsed = time.perf_counter() - started
        rss = rss_mib(target.pid)
        progress(
            f"soak {min(elapsed, duration):.0f}/{duration:g} s"
            + (f", server RSS {rss:.1f} MiB" if rss else "")
        )


def _config(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    return {
        "server": args.server,
        "model_repository": None if args.server else str(args.model_repository),
        "model": None if args.server else args.model,
        "device": args.device,
        "server_threads": args.server_threads,
        "server_lanes": args.server_lanes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "timeout_s": args.timeout_s,
        "arrivals": args.arrivals,
        "seed": args.seed,
        "workload": {"file": str(args.sentences), **workload.describe()},
        "host": {
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0],
            "grpc": grpc.__version__,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="translator-bench load",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  translator-bench load --report docs/load-report.json --plot docs/load.png\n"
        "  translator-bench load --soak --duration 120 --target-fraction 0.7 --json soak.json\n"
        "  translator-bench load --server localhost:8001 --metrics localhost:8002 --concurrency 1,8,64\n"
        "  translator-bench load --server localhost:8001 --rate 50,100 --arrivals uniform --attention cross",
    )
    target = parser.add_argument_group("target")
    target.add_argument(
        "--server",
        type=server_address,
        metavar="HOST:PORT",
        help="drive this running server (default: spawn)",
    )
    target.add_argument(
        "--metrics", type=server_address, metavar="HOST:PORT", help="its /metrics endpoint (mean batch size)"
    )
    target.add_argument("--server-pid", type=positive_int, help="its process id (RSS and CPU from /proc)")
    target.add_argument(
        "--spawn",
        action="store_true",
        help="start servers here, one per batching setting (the default when --server is not given)",
    )
    target.add_argument(
        "--batching",
        help=f"spawned servers: 'name:key=value,...;...' (default: "
        f"{DEFAULT_BATCHING!r}; soak: {SOAK_BATCHING!r})",
    )
    # Resolved here: spawned servers run in the project folder, not the caller's.
    target.add_argument("--model-repository", type=absolute_path, default=DEFAULT_REPOSITORY, metavar="PATH")
    target.add_argument("--model", default=DEFAULT_MODEL)
    target.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    target.add_argument(
        "--server-threads",
        type=positive_int,
        help="onnxruntime threads of spawned servers and the engine baseline (default: one per core)",
    )
    target.add_argument(
        "--server-lanes",
        type=positive_int,
        help="decoding lanes of spawned servers and the engine baseline (default: the server's)",
    )
    target.add_argument(
        "--log-dir",
        type=absolute_path,
        help="where spawned servers write their logs (default: a temporary folder)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=parse_numbers,
        help="closed loop: concurrent clients, e.g. 1,8,64,256 (default when no --rate)",
    )
    load.add_argument(
        "--rate", type=lambda t: parse_numbers(t, float), help="open loop: requests/s, e.g. 50,100"
    )
    load.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    load.add_argument(
        "--duration",
        type=finite_float,
        help="seconds measured per point (default 10); the soak's length (default 120)",
    )
    load.add_argument(
        "--warmup", type=finite_float, default=2.0, help="seconds of load before measuring (default 2)"
    )
    load.add_argument(
        "--timeout-s", type=finite_float, default=30.0, help="deadline of each call (default 30)"
    )
    load.add_argument(
        "--max-requests", type=positive_int, default=2_000_000, help="at most this many requests per point"
    )
    load.add_argument(
        "--max-inflight",
        type=positive_int,
        default=4096,
        help="open loop: past this many outstanding calls an arrival is a CLIENT_OVERLOAD (default 4096)",
    )
    load.add_argument("--channels", type=positive_int, help="gRPC connections (default: min(clients, 16))")
    load.add_argument(
        "--sentences",
        type=input_file,
        default=DEFAULT_SENTENCES,
        help="one source sentence a line (default: 1000 toy test-split sentences)",
    )
    load.add_argument("--texts-per-request", type=positive_int, default=1)
    load.add_argument(
        "--attention",
        type=lambda t: [k for k in t.split(",") if k],
        help="attention maps to ask for: cross,decoder_self,encoder_self",
    )
    load.add_argument("--beam-size", type=positive_int)
    load.add_argument("--max-length", type=positive_int)
    load.add_argument("--seed", type=int, default=0)
    modes = parser.add_argument_group("modes")
    modes.add_argument(
        "--report",
        type=output_file,
        metavar="JSON",
        help="the batching report (spawns the servers; "
        "adds the engine baseline and the half-saturation latency)",
    )
    modes.add_argument(
        "--engine-seconds", type=nonnegative_float, default=3.0, help="report: seconds per engine batch size"
    )
    modes.add_argument("--no-engine", action="store_true", help="report: skip the engine baseline")
    modes.add_argument(
        "--baseline",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=[],
        help=f"spawned servers: also run what a user could write instead ({', '.join(BASELINES)}: "
        "bench/ctranslate2_server.py, CTranslate2 behind grpc.aio with a 5 ms micro-batcher, same weights), "
        "with the same client, its outputs first checked equal to ours; each point gets ours / theirs",
    )
    modes.add_argument(
        "--baseline-checkpoint",
        type=Path,
        default=None,
        help="the checkpoint the served model was exported from, converted for the baseline (default: the "
        "shipped one)",
    )
    modes.add_argument(
        "--soak",
        action="store_true",
        help="run at --target-fraction of saturation for --duration seconds; exit status 1 on any error",
    )
    modes.add_argument("--target-fraction", type=finite_float, default=0.7)
    modes.add_argument(
        "--saturation-s", type=finite_float, default=5.0, help="soak: seconds to measure saturation"
    )
    modes.add_argument("--window", type=finite_float, default=10.0, help="soak: seconds per reported window")
    modes.add_argument(
        "--rss-interval", type=positive_float, default=1.0, help="soak: seconds between RSS samples"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=output_file, help="write the results here")
    output.add_argument("--plot", type=output_file, help="write a PNG here")
    output.add_argument(
        "--save",
        action="store_true",
        help="keep the run in docs/results/<date>_<commit>_<machine>_<load|soak>/ (report.json, plot.png, "
        "run.json), where `translator-bench performance` reads it",
    )
    parser.add_argument("--engine-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", type=parse_numbers, help=argparse.SUPPRESS)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = [name for name in args.baseline if name not in BASELINES]
    if unknown or (args.baseline and (args.server or args.soak)):
        parser.error(f"--baseline takes {', '.join(BASELINES)}, with spawned servers (not --server, --soak)")
    if args.duration is None:
        args.duration = 120.0 if args.soak else 10.0
    if args.server and (args.spawn or args.report or args.batching):
        parser.error("--server drives a running server: --spawn, --batching and --report start their own")
    if args.report and args.soak:
        parser.error("--report and --soak are separate runs")
    if not 0 < args.duration <= MAX_SOAK_S or args.warmup < 0 or args.timeout_s <= 0:
        parser.error(f"--duration must be in (0, {MAX_SOAK_S:g}] s, --warmup >= 0, --timeout-s > 0")
    if not 0 < args.target_fraction <= 1.5 or args.window <= 0 or args.saturation_s <= 0:
        parser.error("--target-fraction must be in (0, 1.5], --window and --saturation-s > 0")
    if (
        args.texts_per_request < 1
        or args.max_requests < 1
        or args.max_inflight < 1
        or (args.channels is not None and args.channels < 1)
    ):
        parser.error("--texts-per-request, --max-requests, --max-inflight and --channels must be at least 1")
    for kind in args.attention or ():
        if kind not in KIND_ENUMS:
            parser.error(f"--attention {kind!r}: choose from {', '.join(KIND_ENUMS)}")
    if not args.server and not args.engine_baseline:
        try:
            _settings(args)
        except ValueError as error:
            parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _check(parser, args)
    if args.engine_baseline:
        print(json.dumps(engine_baseline(args)), flush=True)
        return {}
    workload = Workload(
        read_sentences(args.sentences),
        texts_per_request=args.texts_per_request,
        attention=tuple(args.attention or ()),
        beam_size=args.beam_size,
        max_length=args.max_length,
    )
    try:
        if args.soak:
            results = run_soak(args, workload)
            text = soak_summary(results)
        else:
            results = run_sweep(args, workload, report=args.report is not None)
            text = table(results)
            if results.get("baselines"):
                text += "\n" + baseline_summary(results)
    except (ServerStartError, grpc.RpcError, OSError) as error:
        what = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else error
        parser.exit(1, f"translator-bench load: error: {what}\n")
    print(text, flush=True)
    for path in {p for p in (args.json, args.report) if p is not None}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        progress(f"wrote {path}")
    if args.plot:
        plot(results, args.plot)
        progress(f"wrote {args.plot}")
    if args.save:
        folder = run_folder("soak" if args.soak else "load-baseline" if args.baseline else "load")
        (folder / "report.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, folder / "plot.png")
        write_run_json(folder, ["translator-bench", "load", *(argv or sys.argv[1:])], {"device": args.device})
        progress(f"kept in {folder}")
    if args.soak and not results["passed"]:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
