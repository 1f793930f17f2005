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
import http.client
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.results import run_folder, write_run_json
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

DEFAULT_SENTENCES = Path(__file__).resolve().parent / "data" / "test_sentences.txt"
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
SATURATION_CONCURRENCY = 64  # closed loop at this many clients measures the saturation throughput
BOUND_FACTOR = 2.0  # p99 at half of saturation must stay within this factor of unloaded p50 + queue delay
MAX_SOAK_S = 24 * 3600.0
MIN_SLOPE_SPAN_S = 50.0  # the soak reports an RSS trend only over at least this many seconds
SERVER_DEFAULT_DELAY_MS = ServerConfig().max_queue_delay_ms
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel: clients that are distinct
]


def progress(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Settings and workload
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One server configuration: a name and `translator-serve` settings (ServerConfig field names)."""

    name: str
    values: dict[str, str] = field(default_factory=dict)

    @property
    def max_batch_size(self) -> int:
        return int(self.values.get("max_batch_size", ServerConfig().max_batch_size))

    @property
    def queue_delay_ms(self) -> float:
        """The longest a sentence may wait for company: none when every batch is full at one sentence."""
        if self.max_batch_size == 1:
            return 0.0
        return float(self.values.get("max_queue_delay_ms", SERVER_DEFAULT_DELAY_MS))

    def flags(self) -> list[str]:
        return [item for key, value in self.values.items() for item in (f"--{key.replace('_', '-')}", value)]


def parse_batching(spec: str) -> list[Setting]:
    """`name:key=value,key=value;name2:...` (keys: translator-serve settings, `_` or `-`) into Settings."""
    known = {f.name for f in fields(ServerConfig)}
    settings, names = [], set()
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, _, body = part.partition(":")
        name = name.strip()
        if not name or name in names:
            raise ValueError(f"batching setting {part!r}: needs a unique name before ':'")
        values = {}
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in known:
                raise ValueError(f"batching setting {name}: {item!r} is not key=value with a known setting")
            if key in ("host", "port", "metrics_port", "model_repository", "model"):
                raise ValueError(f"batching setting {name}: {key} is chosen by the load generator")
            values[key] = value.strip()
        settings.append(Setting(name, values))
        names.add(name)
    if not settings:
        raise ValueError(f"no batching setting in {spec!r}")
    return settings


def parse_numbers(text: str, kind: type = int) -> list[Any]:
    """'1,8,64' -> [1, 8, 64]: positive (finite) numbers separated by commas, none empty."""
    parse = positive_int if kind is int else positive_float
    try:
        return [parse(part) for part in text.replace(" ", "").split(",")]
    except argparse.ArgumentTypeError:
        expected = "positive numbers separated by commas"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def read_sentences(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


@dataclass
class Workload:
    """What each request carries: texts drawn at random (mixed lengths) from the sentence file."""

    sentences: list[str]
    texts_per_request: int = 1
    attention: tuple[str, ...] = ()
    beam_size: int | None = None
    max_length: int | None = None

    def options(self) -> pb.TranslateOptions:
        options = pb.TranslateOptions()
        if self.beam_size is not None:
            options.beam_size = self.beam_size
        if self.max_length is not None:
            options.max_length = self.max_length
        if self.attention:
            options.attention.kinds.extend(KIND_ENUMS[kind] for kind in self.attention)
        return options

    def request(self, rng: random.Random) -> pb.TranslateRequest:
        texts = [rng.choice(self.sentences) for _ in range(self.texts_per_request)]
        return pb.TranslateRequest(texts=texts, options=self.options())

    def describe(self) -> dict[str, Any]:
        lengths = [len(s.split()) for s in self.sentences]
        return {
            "sentences": len(self.sentences),
            "words_min": min(lengths),
            "words_mean": round(float(np.mean(lengths)), 2),
            "words_max": max(lengths),
            "texts_per_request": self.texts_per_request,
            "attention": list(self.attention),
            "beam_size": self.beam_size,
            "max_length": self.max_length,
        }


# ---------------------------------------------------------------------------------------------------------
# Servers: a spawned `translator-serve`, or one that is already running
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    address: str  # host:port of the gRPC server
    metrics: str | None = None  # host:port of its /metrics endpoint
    pid: int | None = None  # its process (RSS and CPU are read from /proc when known)
    log: Path | None = None  # a spawned server's log (JSON lines)
    process: subprocess.Popen | None = None  # a spawned server's process


class ServerStartError(RuntimeError):
    pass


def _log_entries(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


@contextmanager
def spawn_server(
    setting: Setting,
    repository: Path,
    model: str,
    *,
    extra: dict[str, str] | None = None,
    startup_timeout_s: float = 180.0,
    log_dir: Path | None = None,
    python_args: Sequence[str] = ("-m", "service.server.app"),
    env: dict[str, str] | None = None,
    stop_timeout_s: float = 40.0,
) -> Iterator[Target]:
    """`python -m service.server.app` on free 127.0.0.1 ports with this setting; stopped by SIGTERM at exit.

    `python_args` replaces `-m service.server.app` (tests start servers with injected faults that way); the
    server
    flags follow it. Raises ServerStartError, with the end of the server's log, when it does not get ready.
    """
    values = {**(extra or {}), **setting.values}
    command = [
        sys.executable,
        *python_args,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--model-repository",
        str(repository),
        "--model",
        model,
        *Setting(setting.name, values).flags(),
    ]
    folder = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="translator-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"server-{setting.name}-{os.getpid()}-{time.monotonic_ns()}.log"
    environment = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        end = time.monotonic() + startup_timeout_s
        listening = None
        while True:
            entries = list(_log_entries(log_path))
            listening = next((e for e in entries if e.get("message") == "listening"), None)
            if listening and any(e.get("message") == "ready" for e in entries):
                break
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise ServerStartError(
                    f"server {setting.name!r} exited with status {process.returncode} before it was ready; "
                    f"its log ({log_path}) ends with:\n{tail}"
                )
            if time.monotonic() > end:
                raise ServerStartError(f"server {setting.name!r} not ready after {startup_timeout_s:.0f} s")
            time.sleep(0.05)
        yield Target(
            f"127.0.0.1:{listening['port']}",
            f"127.0.0.1:{listening['metrics_port']}",
            process.pid,
            log_path,
            process,
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if log_dir is None and process.returncode == 0:  # a clean run: its temporary log is not needed
            shutil.rmtree(folder, ignore_errors=True)


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first); OSError once it has gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """A process and its children (the server and its lane processes)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(proc_stat(int(entry.name))[1])
        except OSError:
            continue  # exited meanwhile
        if parent == pid:
            children.append(int(entry.name))
    return [pid, *children]


def own_rss_mib(pid: int) -> float:
    """VmRSS of one process in MiB; OSError once it has gone, ValueError if /proc does not say (a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def tree_total(pid: int | None, measure: Callable[[int], float]) -> float | None:
    """`measure` summed over a process and its live children (the server's lanes); None where /proc cannot
    tell for the process itself (a child that exits meanwhile is left out)."""
    if pid is None:
        return None
    total = 0.0
    for member in process_tree(pid):
        try:
            total += measure(member)
        except (OSError, ValueError, IndexError):
            if member == pid:
                return None
    return total


def rss_mib(pid: int | None) -> float | None:
    """VmRSS of a process and its children (the server's lanes) in MiB."""
    return tree_total(pid, own_rss_mib)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its live children, all their threads."""
    return tree_total(pid, own_cpu_seconds)


def scrape(metrics: str | None, timeout: float = 5.0) -> dict[tuple[str, tuple], float] | None:
    """Every sample of the server's /metrics as {(name, sorted labels): value}; None when unavailable."""
    if metrics is None:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=timeout) as answer:
            text = answer.read().decode()
    except (OSError, http.client.HTTPException):  # down, or not an HTTP endpoint (a gRPC port given)
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metric_value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )


def server_delta(
    before: dict[tuple[str, tuple], float] | None, after: dict[tuple[str, tuple], float] | None
) -> dict[str, Any]:
    """What the server's metrics say about a measurement window: mean batch size, queue wait, compute."""
    if before is None or after is None:
        return {}

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    batches = delta("translator_batch_size_sentences_count")
    sentences = delta("translator_batch_size_sentences_sum")
    waits = delta("translator_queue_wait_seconds_count")
    return {
        "batches": int(batches),
        "batched_sentences": int(sentences),
        "mean_batch_size": round(sentences / batches, 2) if batches else None,
        "mean_batch_tokens": round(delta("translator_batch_size_tokens_sum") / batches, 1)
        if batches
        else None,
        "mean_queue_wait_ms": round(delta("translator_queue_wait_seconds_sum") / waits * 1000, 3)
        if waits
        else None,
        "compute_s": {
            stage: round(delta("translator_compute_duration_seconds_sum", stage=stage), 3)
            for stage in ("encode", "decode")
        },
        "dropped_sentences": int(delta("translator_dropped_sentences_total")),
    }


# ---------------------------------------------------------------------------------------------------------
# Load generation (grpc.aio)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    scheduled: float  # perf_counter: when the request was due (open loop) or sent (closed loop)
    end: float  # perf_counter: when its answer (or error) arrived
    code: str  # gRPC status code name
    texts: int
    tokens: int  # target tokens received ("</s>" included)
    sent: float | None = None  # perf_counter: when it really left (open loop: later than due when behind)


def summarize(samples: Sequence[Sample], seconds: float) -> dict[str, Any]:
    """Throughput over `seconds` and latency percentiles of the OK answers among `samples`."""
    codes = Counter(s.code for s in samples)
    ok = [s for s in samples if s.code == "OK"]
    latencies = np.array([(s.end - s.scheduled) * 1000 for s in ok]) if ok else np.zeros(0)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)), 3) if latencies.size else None

    lags = np.array([(s.sent - s.scheduled) * 1000 for s in samples if s.sent is not None])
    summary = {
        "duration_s": round(seconds, 3),
        "requests": len(samples),
        "ok": len(ok),
        "errors": {code: count for code, count in sorted(codes.items()) if code != "OK"},
        "error_count": len(samples) - len(ok),
        "requests_per_s": round(len(ok) / seconds, 3) if seconds > 0 else None,
        "sentences_per_s": round(sum(s.texts for s in ok) / seconds, 3) if seconds > 0 else None,
        "tokens_per_s": round(sum(s.tokens for s in ok) / seconds, 3) if seconds > 0 else None,
        "latency_ms": {
            "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99),
            "max": round(float(latencies.max()), 3) if latencies.size else None,
            "mean": round(float(latencies.mean()), 3) if latencies.size else None,
        },
    }
    if lags.size:  # how far behind schedule the client sent: a loaded client inflates open-loop latency
        summary["send_lag_ms"] = {
            "p99": round(float(np.percentile(lags, 99)), 3),
            "max": round(float(lags.max()), 3),
        }
    return summary


class Driver:
    """Channels to one server and the two load shapes; construct inside the event loop."""

    def __init__(self, target: Target, workload: Workload, *, channels: int, timeout_s: float, seed: int):
        self.target = target
        self.workload = workload
        self.timeout_s = timeout_s
        self.seed = seed
        self._channels = [
            grpc.aio.insecure_channel(target.address, options=CHANNEL_OPTIONS)
            for _ in range(max(1, channels))
        ]
        self._stubs = [pb_grpc.TranslatorStub(channel) for channel in self._channels]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def ready(self, timeout_s: float = 15.0) -> None:
        """One good translation, so connection set-up is not part of any measurement."""
        try:
            for channel in self._channels:
                await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError:
            raise ServerStartError(
                f"cannot connect to {self.target.address} within {timeout_s:g} s"
            ) from None
        request = self.workload.request(random.Random(self.seed))
        await self._stubs[0].Translate(request, timeout=max(timeout_s, self.timeout_s))

    async def _call(self, stub: pb_grpc.TranslatorStub, request: pb.TranslateRequest) -> tuple[str, int]:
        try:
            response = await stub.Translate(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            return error.code().name, 0
        return "OK", sum(len(t.target_tokens) for t in response.translations)

    async def _observe(self, at: float, into: dict[str, Any]) -> None:
        """At perf_counter time `at`: the server's metrics and CPU, and this process's CPU."""
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        into["time"] = time.perf_counter()
        into["client_cpu_s"] = time.process_time()
        into["server_cpu_s"] = cpu_seconds(self.target.pid)
        into["rss_mib"] = rss_mib(self.target.pid)
        loop = asyncio.get_running_loop()
        into["metrics"] = await loop.run_in_executor(None, scrape, self.target.metrics)

    @staticmethod
    def _resources(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
        span = end["time"] - start["time"]
        result: dict[str, Any] = {
            "client_cpu_percent": round((end["client_cpu_s"] - start["client_cpu_s"]) / span * 100, 1)
        }
        if start.get("server_cpu_s") is not None and end.get("server_cpu_s") is not None:
            result["server_cpu_percent"] = round(
                (end["server_cpu_s"] - start["server_cpu_s"]) / span * 100, 1
            )
        if end.get("rss_mib") is not None:
            result["server_rss_mib"] = round(end["rss_mib"], 1)
        return result

    async def closed_loop(
        self, concurrency: int, warmup_s: float, duration_s: float, max_requests: int
    ) -> dict[str, Any]:
        """`concurrency` clients, each sending its next request as soon as the previous one is answered."""
        samples: list[Sample] = []
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
        budget = [max_requests]
        first: dict[str, Any] = {}
        last: dict[str, Any] = {}

        async def client(index: int) -> None:
            rng = random.Random(self.seed * 1_000_003 + index)
            stub = self._stubs[index % len(self._stubs)]
            while time.perf_counter() < stop_at and budget[0] > 0:
                budget[0] -= 1
                request = self.workload.request(rng)
                sent = time.perf_counter()
                code, tokens = await self._call(stub, request)
                samples.append(Sample(sent, time.perf_counter(), code, len(request.texts), tokens))

        watchers = [
            asyncio.create_task(self._observe(measure_from, first)),
            asyncio.create_task(self._observe(stop_at, last)),
        ]
        await asyncio.wait_for(
            asyncio.gather(*(client(i) for i in range(concurrency))),
            warmup_s + duration_s + self.timeout_s + 30,
        )
        await asyncio.gather(*watchers)
        window = [s for s in samples if measure_from <= s.end <= stop_at]
        point = {"mode": "closed", "concurrency": concurrency, "rate": None}
        point.update(summarize(window, duration_s))
        point["budget_exhausted"] = budget[0] <= 0
        point["server"] = server_delta(first.get("metrics"), last.get("metrics"))
        point.update(self._resources(first, last))
        return point

    async def open_loop(
        self,
        rate: float,
        warmup_s: float,
        duration_s: float,
        max_requests: int,
        *,
        arrivals: str = "poisson",
        max_inflight: int = 4096,
        window_s: float | None = None,
        rss_interval_s: float | None = None,
    ) -> dict[str, Any]:
        """Requests arrive at `rate` per second whatever the answers do; latency counts from the due time
        (no coordinated omission). Past `max_inflight` outstanding calls an arrival is counted as
        CLIENT_OVERLOAD instead of sent."""
        rng = random.Random(self.seed)
        pick = random.Random(self.seed + 1)
        samples: list[Sample] = []
        pending: set[asyncio.Task] = set()
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
        first: dict[str, Any] = {}
        last: dict[str, Any] = {}
        rss: list[tuple[float, float]] = []

        async def one(index: int, due: float, request: pb.TranslateRequest) -> None:
            sent = time.perf_counter()
            code, tokens = await self._call(self._stubs[index % len(self._stubs)], request)
            samples.append(Sample(due, time.perf_counter(), code, len(request.texts), tokens, sent))

        async def sample_rss() -> None:
            assert rss_interval_s
            while time.perf_counter() < stop_at:
                value = rss_mib(self.target.pid)
                if value is not None:
                    rss.append((time.perf_counter() - measure_from, value))
                await asyncio.sleep(rss_interval_s)

        watchers = [
            asyncio.create_task(self._observe(measure_from, first)),
            asyncio.create_task(self._observe(stop_at, last)),
        ]
        if rss_interval_s and self.target.pid is not None:
            watchers.append(asyncio.create_task(sample_rss()))
        due, index = start, 0
        while due < stop_at and index < max_requests:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = self.workload.request(pick)
            if len(pending) >= max_inflight:
                samples.append(Sample(due, due, "CLIENT_OVERLOAD", len(request.texts), 0))
            else:
                task = asyncio.create_task(one(index, due, request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            index += 1
            due += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        if pending:
            _, late = await asyncio.wait(set(pending), timeout=self.timeout_s + 10)
            for task in late:
                task.cancel()
        await asyncio.gather(*watchers)
        window = [s for s in samples if measure_from <= s.scheduled < stop_at]
        point: dict[str, Any] = {"mode": "open", "concurrency": None, "rate": rate, "arrivals": arrivals}
        point.update(summarize(window, duration_s))
        point["budget_exhausted"] = index >= max_requests
        point["server"] = server_delta(first.get("metrics"), last.get("metrics"))
        point.update(self._resources(first, last))
        if window_s:
            point["windows"] = []
            count = max(1, math.ceil(duration_s / window_s - 1e-9))
            for w in range(count):
                lo = measure_from + w * window_s
                hi = min(lo + window_s, stop_at)
                part = [s for s in window if lo <= s.scheduled < hi]
                entry = {"start_s": round(w * window_s, 3), **summarize(part, hi - lo)}
                values = [v for t, v in rss if w * window_s <= t < (w + 1) * window_s]
                entry["server_rss_mib"] = round(values[-1], 1) if values else None
                point["windows"].append(entry)
        if rss:
            point["rss_samples"] = [(round(t, 2), round(v, 2)) for t, v in rss]
        return point


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
        f"p50 {_ms(latency['p50'])} p99 {_ms(latency['p99'])} ms"
    )
    if batch is not None:
        text += f", mean batch {batch}"
    if point["error_count"]:
        text += f", errors {point['errors']}"
    return text


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


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
    if report:
        _add_comparisons(args, results)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


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
            measured = engine_rate(engine, point.get("server", {}).get("mean_batch_size"))
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
    growth: dict[str, Any] = {"start_mib": start, "end_mib": end}
    if start is not None and end is not None:
        growth["growth_mib"] = round(end - start, 2)
        growth["growth_percent"] = round((end - start) / start * 100, 2) if start else None
    if len(samples) >= 4:
        times, values = np.array([t for t, _ in samples]), np.array([v for _, v in samples])
        half = times >= times[len(times) // 2]  # after the warm-up effects (arenas, caches) have settled
        growth["max_mib"] = round(float(values.max()), 2)
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
# Output: table and plot
# ---------------------------------------------------------------------------------------------------------


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
                    _ms(latency["p50"]),
                    _ms(latency["p95"]),
                    _ms(latency["p99"]),
                    _ms(latency["max"]),
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
                f"p99 {_ms(h.get('p99_ms'))} ms vs bound {_ms(h.get('bound_ms'))} ms "
                f"(= {BOUND_FACTOR:g} x ({_ms(h['unloaded_p50_ms'])} + {h['max_queue_delay_ms']:g})): "
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
        f"p50 {_ms(point['latency_ms']['p50'])} p99 {_ms(point['latency_ms']['p99'])} "
        f"max {_ms(point['latency_ms']['max'])} ms",
        f"server RSS: {memory.get('start_mib') and round(memory['start_mib'], 1)} -> "
        f"{memory.get('end_mib') and round(memory['end_mib'], 1)} MiB "
        f"(growth {memory.get('growth_mib')} MiB, "
        f"second-half slope {memory.get('second_half_slope_mib_per_hour')} MiB/h)",
        "window  req/s    p50     p99     max  errors  RSS MiB",
    ]
    for w in point.get("windows", []):
        lines.append(
            f"{w['start_s']:6.0f}  {w['requests_per_s'] or 0:5.1f}  {_ms(w['latency_ms']['p50']):>5}  "
            f"{_ms(w['latency_ms']['p99']):>6}  {_ms(w['latency_ms']['max']):>6}  {w['error_count']:6d}  "
            f"{_ms(w.get('server_rss_mib'))}"
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
        folder = run_folder("soak" if args.soak else "load")
        (folder / "report.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, folder / "plot.png")
        write_run_json(folder, ["translator-bench", "load", *(argv or sys.argv[1:])], {"device": args.device})
        progress(f"kept in {folder}")
    if args.soak and not results["passed"]:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
