"""What `translator-bench load` prints and draws: the table of a sweep or report, the soak's summary, and
the latency-against-throughput plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

BOUND_FACTOR = 2.0  # p99 at half of saturation must stay within this factor of unloaded p50 + queue delay


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"




def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "setting",
            "load",
            "req/s",
            "sent/s",
            "tok/s",
            "p50",
            "p95",
            "p99",
            "max",
            "errors",
            "batch",
            "gain",
            "engine",
            "svc/eng",
        )
    ]
    for setting in results.get("settings", []):
        for p in setting["points"]:
            load = f"c={p['concurrency']}" if p["mode"] == "closed" else f"{p['rate']:.1f}/s"
            latency = p["latency_ms"]
            rows.append(
                (
                    setting["name"],
                    load,
                    f"{p['requests_per_s'] or 0:.1f}",
                    f"{p['sentences_per_s'] or 0:.1f}",
                    f"{p['tokens_per_s'] or 0:.0f}",
                    format_ms(latency["p50"]),
                    format_ms(latency["p95"]),
                    format_ms(latency["p99"]),
                    format_ms(latency["max"]),
                    str(p["error_count"]),
                    _opt(p.get("server", {}).get("mean_batch_size")),
                    _opt(p.get("gain_vs_off"), "x"),
                    _opt(p.get("engine_sentences_per_s")),
                    _opt(p.get("service_over_engine")),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "latency in ms; batch: mean sentences per batch (server metrics); gain: sent/s vs batching off at "
    text += "the same concurrency; engine: in-process sent/s at that batch size\n" + "\n".join(lines)
    halves = [
        (s["name"], s["half_saturation"]) for s in results.get("settings", []) if s.get("half_saturation")
    ]
    if halves:
        text += (
            f"\n\np99 at half of saturation (open loop, Poisson) vs {BOUND_FACTOR:g} x (unloaded p50 + "
            "max_queue_delay):\n"
        )
        for name, h in halves:
            text += (
                f"  {name}: saturation {h['saturation_requests_per_s']:.1f} req/s "
                f"(c={h['saturation_concurrency']}), "
                f"p99 {format_ms(h.get('p99_ms'))} ms vs bound {format_ms(h.get('bound_ms'))} ms "
                f"(= {BOUND_FACTOR:g} x ({format_ms(h['unloaded_p50_ms'])} + {h['max_queue_delay_ms']:g})): "
                f"{'within' if h.get('within_bound') else 'OVER'}\n"
            )
    return text


def _opt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def soak_summary(results: dict[str, Any]) -> str:
    point = results["soak"]
    memory = results["memory"]
    lines = [
        f"soak {results['setting']['name']}: {results['rate']:.1f} req/s offered for "
        f"{point['duration_s']:g} s: "
        f"{point['ok']} OK, errors {point['errors'] or 0}, {point['requests_per_s']:.1f} req/s, "
        f"p50 {format_ms(point['latency_ms']['p50'])} p99 {format_ms(point['latency_ms']['p99'])} "
        f"max {format_ms(point['latency_ms']['max'])} ms",
        f"server RSS (its lanes included): start {_opt(memory.get('start_mib'))}, "
        f"middle {_opt(memory.get('middle_mib'))}, end {_opt(memory.get('end_mib'))} MiB "
        f"(growth {memory.get('growth_mib')} MiB; after warm-up {_opt(memory.get('after_warmup_mib'))} -> "
        f"last {_opt(memory.get('last_window_mib'))} MiB: "
        f"{_opt(memory.get('growth_after_warmup_percent'), '%')}; "
        f"second-half slope {memory.get('second_half_slope_mib_per_hour')} MiB/h)",
        "window  req/s    p50     p99     max  errors  RSS MiB",
    ]
    for w in point.get("windows", []):
        lines.append(
            f"{w['start_s']:6.0f}  {w['requests_per_s'] or 0:5.1f}  {format_ms(w['latency_ms']['p50']):>5}  "
            f"{format_ms(w['latency_ms']['p99']):>6}  {format_ms(w['latency_ms']['max']):>6}  "
            f"{w['error_count']:6d}  {format_ms(w.get('server_rss_mib'))}"
        )
    lines.append("PASSED: no errors" if results["passed"] else f"FAILED: errors {point['errors']}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    if results["kind"] == "soak":
        point = results["soak"]
        windows = point.get("windows", [])
        figure, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
        starts = [w["start_s"] for w in windows]
        axes[0].plot(starts, [w["requests_per_s"] or 0 for w in windows], marker="o")
        axes[0].set_ylabel("requests/s")
        for key, style in (("p50", "-"), ("p99", "--"), ("max", ":")):
            axes[1].plot(
                starts, [w["latency_ms"][key] or np.nan for w in windows], style, marker=".", label=key
            )
        axes[1].set_ylabel("latency (ms)")
        axes[1].legend()
        samples = point.get("rss_samples", [])
        if samples:
            axes[2].plot([t for t, _ in samples], [v for _, v in samples])
        axes[2].set_ylabel("server RSS, lanes included (MiB)")
        axes[2].set_xlabel("seconds into the soak")
        figure.suptitle(f"soak at {results['rate']:.1f} req/s ({results['setting']['name']})")
    else:
        figure, ax = plt.subplots(figsize=(8, 5.5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for number, setting in enumerate(results["settings"]):
            color = colors[number % len(colors)]
            closed = sorted(
                (p for p in setting["points"] if p["mode"] == "closed"), key=lambda p: p["concurrency"]
            )
            opened = sorted((p for p in setting["points"] if p["mode"] == "open"), key=lambda p: p["rate"])
            for series, marker in ((closed, "o"), (opened, "s")):
                series = [p for p in series if p["latency_ms"]["p50"] is not None]
                if not series:
                    continue
                x = [p["sentences_per_s"] for p in series]
                label = setting["name"] + ("" if marker == "o" else " (open loop)")
                ax.plot(
                    x,
                    [p["latency_ms"]["p50"] for p in series],
                    "-",
                    marker=marker,
                    color=color,
                    label=f"{label} p50",
                )
                ax.plot(
                    x,
                    [p["latency_ms"]["p99"] for p in series],
                    "--",
                    marker=marker,
                    color=color,
                    alpha=0.7,
                    label=f"{label} p99",
                )
                for p in series:
                    if p["mode"] == "closed":
                        ax.annotate(
                            str(p["concurrency"]),
                            (p["sentences_per_s"], p["latency_ms"]["p99"]),
                            textcoords="offset points",
                            xytext=(3, 3),
                            fontsize=7,
                            color=color,
                        )
            half = setting.get("half_saturation", {}).get("point")
            if half and half["latency_ms"]["p99"] is not None:
                ax.plot(
                    [half["sentences_per_s"]],
                    [half["latency_ms"]["p99"]],
                    "*",
                    markersize=12,
                    color=color,
                    label=f"{setting['name']} p99 at half saturation",
                )
        ax.set_yscale("log")
        ax.set_xlabel("throughput (sentences/s)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title("latency vs throughput (labels: concurrent clients)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


