"""The load generator's clients: grpc.aio calls in closed loop (N clients) or open loop (a rate), and the
summary of their samples.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.servers import ServerStartError, Target, cpu_seconds, rss_mib, scrape, server_delta
from service.api.kinds import KIND_ENUMS
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc

DEFAULT_SENTENCES = Path(__file__).resolve().parent / "data" / "test_sentences.txt"

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel: clients that are distinct
]


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


