"""Servers for the benchmarks and the system tests: `translator-serve` processes started with chosen settings
(`spawn_server`, a `Setting` each), or one already running (`Target`); their processes' CPU and memory, and
their Prometheus metrics.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service.server.config import ROOT, ServerConfig

SERVER_DEFAULT_DELAY_MS = ServerConfig().max_queue_delay_ms


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
            if key in ("host", "port", "metrics_port", "http_port", "model_repository", "model"):
                raise ValueError(f"batching setting {name}: {key} is chosen by the load generator")
            values[key] = value.strip()
        settings.append(Setting(name, values))
        names.add(name)
    if not settings:
        raise ValueError(f"no batching setting in {spec!r}")
    return settings





@dataclass
class Target:
    address: str  # host:port of the gRPC server
    metrics: str | None = None  # host:port of its /metrics endpoint
    pid: int | None = None  # its process (RSS and CPU are read from /proc when known)
    log: Path | None = None  # a spawned server's log (JSON lines)
    process: subprocess.Popen | None = None  # a spawned server's process
    http: str | None = None  # host:port of its KServe v2 REST endpoint


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
        "--http-port",
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
            f"127.0.0.1:{listening['metrics_port']}" if listening.get("metrics_port") else None,
            process.pid,
            log_path,
            process,
            f"127.0.0.1:{listening['http_port']}" if listening.get("http_port") else None,
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


