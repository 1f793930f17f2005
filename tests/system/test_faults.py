"""Faults against real `translator-serve` subprocesses on 127.0.0.1 (the tiny model), under concurrent load.

tests/server/ already covers, one call at a time and mostly in-process: a cancelled stream stopping
its decoding, a deadline freeing queued and running work, one over-full queue, and SIGTERM with four queued
calls. Here the same faults hit separate server processes under concurrent load, plus what it does not
cover: unary calls cancelled mid-decode, a client process killed with its streams unread, a burst that
overflows the queue and the recovery after it, SIGTERM while clients keep sending, and a corrupt or missing
model at start-up.

"Slow" servers run `service.server.app.main` with the engine's decoder steps slowed down and "</s>" forbidden
(SLOW_LAUNCHER), so that decoding lasts long enough to be interrupted deterministically.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.servers import Setting, Target, metric_value, process_tree, scrape, spawn_server
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.core.model_format import sha256
from tests.conftest import ROOT
from tests.support.processes import log_entries, process_alive
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

# Every decoder step of the engine sleeps $FAULTS_STEP_S and "</s>" is never chosen, so every translation
# lasts max_length steps: in the server process and in its lane processes alike.
SLOW_ENGINE = """
import os, sys, time
import numpy as np
from service.engine import runner as runner_module

STEP_S = float(os.environ["FAULTS_STEP_S"])

class Slow:
    def __init__(self, inner, eos_id):
        self.inner, self.eos_id = inner, eos_id

    def step(self, *args, **kwargs):
        time.sleep(STEP_S)
        result = list(self.inner.step(*args, **kwargs))
        log_probs = np.array(result[1])
        log_probs[:, self.eos_id] = -np.inf
        result[1] = log_probs
        return tuple(result)

    def __getattr__(self, name):
        return getattr(self.inner, name)

original = runner_module.Runner.__init__

def slowed(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.backend = Slow(self.backend, self.special_ids["eos"])

runner_module.Runner.__init__ = slowed
"""
# The real server (service.server.app.main, its flags after `-c CODE`), its lanes started the same way.
SLOW_LAUNCHER = (
    SLOW_ENGINE
    + "from service.engine import lane_process\n"
    + "from service.server import app as server\n"
    + "lane_process.LANE_COMMAND = [sys.executable, '-c', "
    + repr(SLOW_ENGINE + "from service.engine import lane_worker\nlane_worker.main()\n")
    + "]\n"
    + "sys.exit(server.main())\n"
)
BASE = {"threads": "1", "max_concurrent_rpcs": "64", "grace_period_s": "10", "quality_sample_rate": "0"}


@contextmanager
def serving(repository: Path, log_dir: Path, step_s: float | None = None, **values: str) -> Iterator[Target]:
    """A server subprocess (slowed when step_s is given); SIGTERM at exit."""
    setting = Setting("faults", {**BASE, **values})
    if step_s is None:
        with spawn_server(setting, repository, "tiny", log_dir=log_dir) as target:
            yield target
    else:
        with spawn_server(
            setting,
            repository,
            "tiny",
            log_dir=log_dir,
            python_args=("-c", SLOW_LAUNCHER),
            env={"FAULTS_STEP_S": str(step_s)},
        ) as target:
            yield target


class Metrics:
    """Readings of one server's /metrics; `delta` against the reading taken at construction."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.before = self.read()

    def read(self) -> dict:
        samples = scrape(self.target.metrics)
        assert samples is not None, "cannot read the server's metrics"
        return samples

    def now(self, name: str, **labels: str) -> float:
        return metric_value(self.read(), name, **labels)

    def delta(self, name: str, **labels: str) -> float:
        return metric_value(self.read(), name, **labels) - metric_value(self.before, name, **labels)


def stub(target: Target) -> tuple[grpc.Channel, pb_grpc.TranslatorStub]:
    channel = grpc.insecure_channel(target.address)
    return channel, pb_grpc.TranslatorStub(channel)


def request(text: str, max_length: int, length_penalty: float = 1.0) -> pb.TranslateRequest:
    options = pb.TranslateOptions(max_length=max_length, length_penalty=length_penalty)
    return pb.TranslateRequest(texts=[text], options=options)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def assert_serving(target: Target, within_s: float) -> None:
    """Health is SERVING and a short translation comes back within `within_s` seconds."""
    channel, translator = stub(target)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        answer = translator.Translate(request("the cat", 3), timeout=10)
        elapsed = time.monotonic() - started
        assert len(answer.translations[0].target_tokens) == 3
        assert elapsed < within_s, f"a 3-step translation took {elapsed:.2f} s: the worker was still busy"
    finally:
        channel.close()


def assert_idle(metrics: Metrics) -> None:
    wait_for(
        lambda: (
            metrics.now("translator_inflight_requests") == 0
            and metrics.now("translator_queue_depth_sentences") == 0
        ),
        message="no call in flight and an empty queue",
    )


# ---------------------------------------------------------------------------------------------------------
# Cancellation and disconnection
# ---------------------------------------------------------------------------------------------------------


def test_unary_calls_cancelled_mid_decode_under_load(tiny_repository: Path, tmp_path: Path) -> None:
    with serving(tiny_repository, tmp_path, step_s=0.01, max_queue_delay_ms="1") as target:
        metrics = Metrics(target)
        channel, translator = stub(target)
        stop = threading.Event()
        good: Counter[str] = Counter()

        def steady_client() -> None:  # keeps asking for short translations the whole time
            own, own_stub = stub(target)
            try:
                while not stop.is_set():
                    good[code_of(lambda: own_stub.Translate(request("a big dog", 3), timeout=30)).name] += 1
            finally:
                own.close()

        # Daemon threads, stopped however the test ends: a failure must not leave them calling forever.
        steady = [threading.Thread(target=steady_client, daemon=True) for _ in range(4)]
        for thread in steady:
            thread.start()
        try:
            # 12 calls that would decode 200 steps (2 s of sleeping) each, all in one batch.
            victims = [
                translator.Translate.future(request("the small red cat", 200), timeout=60) for _ in range(12)
            ]
            wait_for(lambda: metrics.now("translator_inflight_requests") >= 12, message="12 calls in flight")
            time.sleep(0.3)  # decoding under way
            for victim in victims:
                victim.cancel()
            cancelled_at = time.monotonic()
            assert all(v.cancelled() or v.exception().code() == grpc.StatusCode.CANCELLED for v in victims)
            wait_for(
                lambda: metrics.delta("translator_dropped_sentences_total", reason="cancelled") == 12,
                message="12 sentences dropped as cancelled",
            )
            # The worker left the cancelled rows at the next step: the steady clients get answers again long
            # before the 200 steps (2 s) would have ended.
            baseline = sum(good.values())
            wait_for(
                lambda: sum(good.values()) > baseline, timeout=1.5, message="a steady client to be answered"
            )
            assert time.monotonic() - cancelled_at < 1.5
        finally:
            channel.close()
            stop.set()
            for thread in steady:
                thread.join(timeout=30)
        assert set(good) == {"OK"} and good["OK"] > 0, good
        assert_idle(metrics)
        wait_for(
            lambda: metrics.delta("translator_requests_total", method="Translate", code="CANCELLED") == 12,
            message="12 cancelled calls counted",
        )
        assert_serving(target, within_s=1.0)


def test_client_process_killed_with_unread_streams(tiny_repository: Path, tmp_path: Path) -> None:
    with serving(tiny_repository, tmp_path, step_s=0.01, max_queue_delay_ms="1") as target:
        metrics = Metrics(target)
        # A client process opens 6 TranslateStream calls (200 steps each), never reads them, and is killed.
        code = (
            "import sys, time, grpc\n"
            "from service.api.translator.v1 import translator_pb2 as pb, translator_pb2_grpc as g\n"
            f"channel = grpc.insecure_channel({target.address!r})\n"
            "stub = g.TranslatorStub(channel)\n"
            "options = pb.TranslateOptions(max_length=200)\n"
            "calls = [stub.TranslateStream(pb.TranslateStreamRequest(text='the red cat', options=options))"
            " for _ in range(6)]\n"
            "print('opened', flush=True)\n"
            "time.sleep(60)\n"
        )
        client = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "opened"
            wait_for(lambda: metrics.now("translator_inflight_requests") == 6, message="6 streams in flight")
            time.sleep(0.3)  # decoding under way, tokens piling up unread
        finally:
            client.kill()
            client.wait(timeout=10)
        killed_at = time.monotonic()
        # The ones decoding leave at their next step, the queued ones leave the queue (a batch runs to its end
        # before the next starts, so some of the 6 were still waiting behind the first).
        wait_for(
            lambda: metrics.delta("translator_dropped_sentences_total", reason="cancelled") == 6,
            message="the 6 abandoned streams to be dropped",
        )
        assert metrics.delta("translator_dropped_sentences_total", reason="cancelled", stage="decoding") >= 1
        assert time.monotonic() - killed_at < 1.5  # long before their 200 steps (2 s) would have ended
        assert_idle(metrics)
        wait_for(
            lambda: (
                metrics.delta("translator_requests_total", method="TranslateStream", code="CANCELLED") == 6
            ),
            message="6 cancelled streams counted",
        )
        assert metrics.delta("translator_generated_tokens_total") == 0  # nothing delivered for them
        assert_serving(target, within_s=1.0)


# ---------------------------------------------------------------------------------------------------------
# Deadlines and overload
# ---------------------------------------------------------------------------------------------------------


def test_deadlines_shorter_than_the_queue_wait(tiny_repository: Path, tmp_path: Path) -> None:
    with serving(tiny_repository, tmp_path, step_s=0.01, max_queue_delay_ms="1") as target:
        metrics = Metrics(target)
        channel, translator = stub(target)
        # A 60-step batch (~0.6 s) holds the worker; 16 unary calls and 4 streams with another search (a
        # length penalty: they cannot join that batch) wait behind it with a 0.2 s deadline.
        busy = translator.Translate.future(request("the cat", 60), timeout=30)
        wait_for(lambda: metrics.now("translator_inflight_requests") == 1, message="the long call in flight")
        time.sleep(0.05)
        unary = [translator.Translate.future(request("a dog", 20, 0.8), timeout=0.2) for _ in range(16)]
        options = pb.TranslateOptions(max_length=20, length_penalty=0.8)
        streams = [
            translator.TranslateStream(pb.TranslateStreamRequest(text="a cat", options=options), timeout=0.2)
            for _ in range(4)
        ]
        codes = Counter(code_of(call.result).name for call in unary)
        codes.update(code_of(lambda s=stream: list(s)).name for stream in streams)
        assert codes == {"DEADLINE_EXCEEDED": 20}, codes
        wait_for(lambda: metrics.now("translator_queue_depth_sentences") == 0, message="the queue to empty")
        assert len(busy.result().translations[0].target_tokens) == 60
        assert_idle(metrics)
        # Each call that reached a handler is answered DEADLINE_EXCEEDED by the server and its sentence leaves
        # the queue (on a loaded machine gRPC may time a call out before any handler runs: not counted).

        def counts() -> tuple[float, float, float]:
            handled = sum(
                metrics.delta("translator_requests_total", method=method, code="DEADLINE_EXCEEDED")
                for method in ("Translate", "TranslateStream")
            )
            queued = metrics.delta(
                "translator_dropped_sentences_total", reason="deadline_exceeded", stage="queued"
            )
            late = metrics.delta(
                "translator_dropped_sentences_total", reason="deadline_exceeded", stage="decoding"
            )
            return queued, handled, late

        wait_for(lambda: counts()[0] == counts()[1], message="every handled deadline to drop its sentence")
        queued, handled, late = counts()
        assert queued >= 10 and late == 0, (queued, handled, late)
        channel.close()
        assert_serving(target, within_s=1.0)


def test_queue_overflow_under_a_burst_then_recovery(tiny_repository: Path, tmp_path: Path) -> None:
    values = {
        "max_queue_size": "8",
        "max_texts_per_request": "4",
        "max_batch_size": "4",
        "max_queue_delay_ms": "1",
    }
    with serving(tiny_repository, tmp_path, step_s=0.005, **values) as target:
        metrics = Metrics(target)
        channel, translator = stub(target)
        burst = [
            translator.Translate.future(
                pb.TranslateRequest(texts=["the cat", "a dog"], options=pb.TranslateOptions(max_length=20)),
                timeout=60,
            )
            for _ in range(48)
        ]
        codes = Counter(code_of(call.result).name for call in burst)
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes  # some refused, none failed otherwise
        for call in burst:
            if call.exception() is None:
                assert len(call.result().translations) == 2
            else:
                assert "max_queue_size=8" in call.exception().details()
        assert_idle(metrics)
        assert (
            metrics.delta("translator_requests_total", method="Translate", code="RESOURCE_EXHAUSTED")
            == codes["RESOURCE_EXHAUSTED"]
        )
        # Recovery: once the burst is over every request fits again.
        for _ in range(10):
            assert len(translator.Translate(request("the red dog", 5), timeout=10).translations) == 1
        channel.close()
        assert_idle(metrics)


# ---------------------------------------------------------------------------------------------------------
# A lane process killed under load
# ---------------------------------------------------------------------------------------------------------


def test_a_lane_killed_under_load_costs_no_internal_error(tiny_repository: Path, tmp_path: Path) -> None:
    """kill -9 of a lane process while calls decode on it: unary calls are answered (their rows are
    searched again on the other lane) or get UNAVAILABLE, which clients may retry; streams whose tokens
    already went out get UNAVAILABLE rather than the same tokens twice. No INTERNAL, no process id in
    any message, and the lane is replaced."""
    with serving(tiny_repository, tmp_path, step_s=0.01, threads="2", max_queue_delay_ms="1") as target:
        metrics = Metrics(target)
        lanes = process_tree(target.process.pid)[1:]
        assert len(lanes) == 2, lanes
        channel, translator = stub(target)
        texts = ["the cat", "a big dog", "the red house sees her", "we saw them"]
        unary = [translator.Translate.future(request(texts[i % 4], 40), timeout=30) for i in range(24)]
        streams = [translator.TranslateStream(pb.TranslateStreamRequest(
            text=texts[i % 4], options=pb.TranslateOptions(max_length=40)), timeout=30) for i in range(4)]
        time.sleep(0.15)  # every call is decoding (40 steps of 10 ms)
        os.kill(lanes[0], signal.SIGKILL)
        codes: Counter[str] = Counter()
        for call in unary:
            error = call.exception()
            codes["unary " + (error.code().name if error else "OK")] += 1
            if error is not None:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert "lane process" not in error.details() and str(lanes[0]) not in error.details()
            else:
                assert len(call.result().translations[0].target_tokens) == 40
        for stream in streams:
            try:
                messages = list(stream)
                codes["stream OK"] += 1
                assert messages[-1].HasField("translation")
            except grpc.RpcError as error:
                codes["stream " + error.code().name] += 1
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert str(lanes[0]) not in error.details()
        assert set(codes) <= {"unary OK", "unary UNAVAILABLE", "stream OK", "stream UNAVAILABLE"}, codes
        assert codes["unary OK"] == len(unary)  # no token of theirs went out: searched again, answered
        assert metrics.delta("translator_requests_total", method="Translate", code="INTERNAL") == 0
        lost = metrics.delta("translator_dropped_sentences_total", reason="lane_lost", stage="decoding")
        assert lost == codes["unary UNAVAILABLE"] + codes["stream UNAVAILABLE"], (lost, codes)
        wait_for(lambda: len(process_tree(target.process.pid)[1:]) == 2 and lanes[0] not in
                 process_tree(target.process.pid), message="the lane to be replaced")
        channel.close()
        assert_serving(target, within_s=5.0)
        assert_idle(metrics)


# ---------------------------------------------------------------------------------------------------------
# Shutdown under load
# ---------------------------------------------------------------------------------------------------------


def test_sigterm_while_clients_keep_sending(tiny_repository: Path, tmp_path: Path) -> None:
    with serving(tiny_repository, tmp_path, step_s=0.01, max_queue_delay_ms="1") as target:
        assert target.process is not None
        metrics = Metrics(target)
        calls: list[tuple[float, float, str]] = []  # (start, end, code) of every call
        lock = threading.Lock()

        def client() -> None:  # sends 40-step translations back to back until refused
            own, own_stub = stub(target)
            try:
                for _ in range(1000):
                    start = time.monotonic()
                    code = code_of(
                        lambda: own_stub.Translate(request("the big cat sees a dog", 40), timeout=30)
                    )
                    with lock:
                        calls.append((start, time.monotonic(), code.name))
                    if code != grpc.StatusCode.OK:
                        return
            finally:
                own.close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: metrics.now("translator_inflight_requests") == 8, message="8 calls in flight")
        lanes = process_tree(target.process.pid)[1:]
        assert lanes, "the server decodes in lane processes"
        time.sleep(0.15)  # well into their 40 steps (0.4 s)
        signalled = time.monotonic()
        # The lanes get the signal too (as from a terminal's Ctrl-C to the process group): they must go on
        # until the server has answered its in-flight calls, then exit with it.
        for pid in [target.process.pid, *lanes]:
            os.kill(pid, signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert target.process.wait(timeout=30) == 0
        wait_for(lambda: not any(process_alive(pid) for pid in lanes), message="the lane processes to exit")
        exited = time.monotonic()
        codes = Counter(code for _, _, code in calls)
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        # Calls surely at the server when the signal came (sent 50 ms before it, still running) completed.
        in_flight = [code for start, end, code in calls if start < signalled - 0.05 and end > signalled]
        timeline = [
            (round(start - signalled, 3), round(end - signalled, 3), code) for start, end, code in calls
        ]
        assert in_flight and set(in_flight) == {"OK"}, timeline
        # Every client was refused in the end: new calls get UNAVAILABLE once shutdown began.
        assert codes["UNAVAILABLE"] == 8, codes
        assert exited - signalled < 10, "shutdown took the whole grace period"
        assert target.log is not None
        messages = [entry.get("message") for entry in log_entries(target.log)]
        assert "shutting down" in messages and "stopped" in messages


# ---------------------------------------------------------------------------------------------------------
# A corrupt or missing model at start-up
# ---------------------------------------------------------------------------------------------------------


def _break(version: Path, how: str) -> tuple[list[str], str]:
    """Damage a copy of the tiny model; the extra server flags and the file the error must name."""

    def update_checksum(name: str) -> None:
        description = json.loads((version / "model.json").read_text())
        description["checksums"][name] = sha256(version / name)
        (version / "model.json").write_text(json.dumps(description))

    if how == "missing decoder":
        (version / "decoder.onnx").unlink()
        return [], str(version / "decoder.onnx")
    if how == "corrupt encoder":
        (version / "encoder.onnx").write_bytes(b"\x08\x07 not an onnx graph")
        return [], str(version / "encoder.onnx")
    if how == "corrupt decoder, checksum updated":
        data = (version / "decoder.onnx").read_bytes()
        (version / "decoder.onnx").write_bytes(data[: len(data) // 3])
        update_checksum("decoder.onnx")
        return [], str(version / "decoder.onnx")
    if how == "graphs swapped, checksums updated":
        encoder, decoder = (version / "encoder.onnx").read_bytes(), (version / "decoder.onnx").read_bytes()
        (version / "encoder.onnx").write_bytes(decoder)
        (version / "decoder.onnx").write_bytes(encoder)
        update_checksum("encoder.onnx")
        update_checksum("decoder.onnx")
        return [], str(version / "encoder.onnx")
    if how == "corrupt tokenizer, checksum updated":
        (version / "tokenizer.json").write_text('{"version": "1.0", "model": {')
        update_checksum("tokenizer.json")
        return [], str(version / "tokenizer.json")
    if how == "model.json not JSON":
        (version / "model.json").write_text("{ not json")
        return [], str(version / "model.json")
    if how == "missing model":
        return ["--model", "absent"], str(version.parent.parent / "absent")
    if how == "missing version":
        return ["--model-version", "7"], str(version.parent / "7")
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing decoder",
        "corrupt encoder",
        "corrupt decoder, checksum updated",
        "graphs swapped, checksums updated",
        "corrupt tokenizer, checksum updated",
        "model.json not JSON",
        "missing model",
        "missing version",
    ],
)
def test_corrupt_or_missing_model_fails_fast_naming_the_file(
    tiny_repository: Path, tmp_path: Path, how: str
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository, repository)
    flags, named = _break(repository / "tiny" / "1", how)
    command = [sys.executable, "-m", "service.server.app", "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "0", "--http-port", "0"]
    command += ["--model-repository", str(repository), "--model", "tiny", *flags]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode != 0, done.stderr[-2000:]
    assert elapsed < 30, f"took {elapsed:.1f} s to give up"
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"')]
    errors = [entry for entry in errors if entry.get("level") == "ERROR"]
    assert [entry["message"] for entry in errors] == ["cannot serve"], done.stderr[-2000:]
    assert named in errors[0]["error"], errors[0]["error"]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


# Runs the real server with every batch of the engine failing: the warm-up's translations fail.
BROKEN_ENGINE_LAUNCHER = """
import sys
from service.scheduler import batcher
from service.server import app as server

def broken(self, *args):
    raise RuntimeError("the engine is broken")

batcher.Batcher._run_batch = batcher.Batcher._run_stream = broken
sys.exit(server.main())
"""


def test_failed_warm_up_exits_non_zero_with_one_clear_line(tiny_repository: Path) -> None:
    command = [sys.executable, "-c", BROKEN_ENGINE_LAUNCHER, "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "0", "--http-port", "0"]
    command += ["--model-repository", str(tiny_repository), "--model", "tiny"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"')]
    [failure] = [entry for entry in entries if entry.get("message") == "cannot serve"]
    assert failure["level"] == "ERROR"
    assert "warm-up translation failed: INTERNAL" in failure["error"], failure
    assert "the engine is broken" in failure["error"], failure
    # No uncaught exception: every line is a JSON log entry (a traceback would be printed raw).
    raw = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert not raw, done.stderr[-3000:]
