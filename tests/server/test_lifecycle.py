"""The server's life: reflection, event loops, health while loading and stopping, metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import generate_latest

from service.api.inference import grpc_service_pb2 as kpb
from service.api.translator.v1 import translator_pb2 as pb
from service.scheduler.metrics import ALL_METRICS
from service.server.app import TranslatorServer
from service.server.config import env_name
from tests.conftest import ROOT
from tests.support.metrics import scrape, value
from tests.support.processes import logged
from tests.support.server import HOST, Client, make_config, running, slow_config, slow_engine
from tests.support.texts import sentences
from tests.support.waiting import wait_for

SERVICES = ("translator.v1.Translator", "inference.GRPCInferenceService")


def test_reflection_lists_every_service(client: Client) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(client.reflection.ServerReflectionInfo(iter([request])))
    names = {service.name for service in answer.list_services_response.service}
    assert names >= {*SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    v1 = client.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (answer,) = list(v1(iter([request])))
    assert {service.name for service in answer.list_services_response.service} == names
    symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="translator.v1.Translator")
    (answer,) = list(client.reflection.ServerReflectionInfo(iter([symbol])))
    assert answer.file_descriptor_response.file_descriptor_proto  # enough for grpcurl to call it


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_the_server_runs_on_either_event_loop(tiny_repository: Path, event_loop: str) -> None:
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")  # a dependency, except on Windows
    with running(make_config(tiny_repository, event_loop=event_loop)) as server:
        assert server.port and server._loop is not None
        assert type(server._loop).__module__.split(".")[0] == event_loop
        client = Client(server.port)
        options = pb.TranslateOptions(max_length=4, attention=pb.AttentionRequest(kinds=[pb.CROSS]))
        answer = client.translator.Translate(pb.TranslateRequest(texts=["the cat", "a dog"], options=options))
        assert [len(t.target_tokens) for t in answer.translations] == [4, 4]
        assert all(t.attention for t in answer.translations)
        client.close()


def test_answers_with_maps_are_built_off_the_event_loop(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building an answer with attention maps takes tens of milliseconds for a large request: it runs on a
    worker thread, not on the loop that serves every other call; a plain answer is built on the loop."""
    from service.server import translator_api

    threads: list[str] = []
    build = translator_api.translation_message

    def recording(*args: Any, **kwargs: Any) -> pb.Translation:
        threads.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr(translator_api, "translation_message", recording)
    plain = pb.TranslateOptions(max_length=4)
    maps = pb.TranslateOptions(max_length=4, attention=pb.AttentionRequest(kinds=[pb.CROSS]))
    # No batch sampled for the attention metrics: those are built off the loop too.
    with running(make_config(tiny_repository, quality_sample_rate=0.0)) as server:
        assert server.port
        client = Client(server.port)
        client.translator.Translate(pb.TranslateRequest(texts=["the cat"], options=plain))
        client.translator.Translate(pb.TranslateRequest(texts=["the cat"], options=maps))
        client.close()
    assert threads[0] == "grpc-loop" and threads[1] != "grpc-loop", threads


def test_health_is_not_serving_until_the_model_is_loaded(tiny_repository: Path) -> None:
    server = TranslatorServer(make_config(tiny_repository))
    server.start()
    assert server.port
    client = Client(server.port)
    try:
        for name in ("", *SERVICES):
            status = client.health.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.kserve.ServerLive(kpb.ServerLiveRequest()).live
        assert not client.kserve.ServerReady(kpb.ServerReadyRequest()).ready
        with pytest.raises(grpc.RpcError) as failure:
            client.translator.Translate(pb.TranslateRequest(texts=["the cat"]))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in failure.value.details()
        server.load()
        for name in ("", *SERVICES):
            status = client.health.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert client.kserve.ServerReady(kpb.ServerReadyRequest()).ready
        # The warm-up's translations are no served traffic: they are in none of the serving metrics.
        assert server.metrics_port
        text = scrape(server.metrics_port)
        for name in (
            "translator_batch_size_sentences_count",
            "translator_queue_wait_seconds_count",
            "translator_generated_tokens_total",
            "translator_translation_mean_logprob_count",
            "translator_cross_attention_entropy_nats_count",
        ):
            assert value(text, name) == 0, name
        for stage in ("encode", "decode"):
            assert value(text, "translator_compute_duration_seconds_count", stage=stage) == 0, stage
    finally:
        client.close()
        server.stop(0.5)


def test_health_watch_and_list_follow_loading_and_shutdown(tiny_repository: Path) -> None:
    """What an orchestrator watching grpc.health.v1 sees: NOT_SERVING while the model loads, SERVING once it
    is warm, NOT_SERVING as soon as shutdown begins (before the in-flight calls are done); then the watch
    ends, so that it does not hold the server for the grace period (it did: 30 s with the default)."""
    server = TranslatorServer(make_config(tiny_repository))
    server.start()
    assert server.port
    client = Client(server.port)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    stopping = threading.Thread(target=server.stop, args=(30.0,))

    def statuses() -> dict[str, int]:
        listed = client.health.List(health_pb2.HealthListRequest()).statuses
        return {name: answer.status for name, answer in listed.items()}

    try:
        watch = client.health.Watch(health_pb2.HealthCheckRequest(service=SERVICES[0]), timeout=60)
        assert next(watch).status == not_serving
        assert statuses() == dict.fromkeys(("", *SERVICES), not_serving)
        server.load()
        assert next(watch).status == serving
        assert statuses() == dict.fromkeys(("", *SERVICES), serving)
        stopping.start()
        assert next(watch).status == not_serving
        assert list(watch) == []  # ended by the server, OK
        stopping.join(timeout=5.0)
        assert not stopping.is_alive(), "an open health watch held the shutdown"
    finally:
        client.close()
        if stopping.ident is None:
            server.stop(0.5)
        else:
            stopping.join()


def test_metrics_endpoint_serves_every_named_metric(server: TranslatorServer, client: Client) -> None:
    assert server.metrics_port
    client.translator.Translate(
        pb.TranslateRequest(
            texts=["the dog sees the cat"],
            options=pb.TranslateOptions(max_length=6, attention=pb.AttentionRequest(kinds=[pb.CROSS])),
        )
    )
    with pytest.raises(grpc.RpcError):
        client.translator.Translate(pb.TranslateRequest())
    text = scrape(server.metrics_port)
    for name in ALL_METRICS:
        assert f"# TYPE {name} " in text, name
    assert (
        value(text, "translator_model_info", model="tiny", version="1", provider="CPUExecutionProvider",
              precision="float32") == 1
    )
    assert value(text, "translator_requests_total", method="Translate", code="INVALID_ARGUMENT") >= 1
    assert value(text, "translator_request_duration_seconds_count", method="Translate", code="OK") >= 1
    for stage in ("encode", "decode"):
        assert value(text, "translator_compute_duration_seconds_count", stage=stage) >= 1
    for histogram in (
        "translator_queue_wait_seconds",
        "translator_batch_size_tokens",
        "translator_translation_mean_logprob",
        "translator_cross_attention_entropy_nats",
    ):
        assert value(text, f"{histogram}_count") >= 1, histogram
    assert value(text, "translator_generated_tokens_total") >= 6
    assert value(text, "translator_queue_depth_sentences") == 0
    assert value(text, "translator_inflight_requests") == 0


def test_shutdown_fails_unfinished_calls_with_unavailable(tiny_repository: Path) -> None:
    engine, backend = slow_engine(tiny_repository)
    config = slow_config(tiny_repository)
    with running(config, engine=engine) as server:
        assert server.port
        client = Client(server.port)
        long = pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=200))
        warm_up_steps = backend.steps
        call = client.translator.Translate.future(long, timeout=30)  # 4 s of decoding
        wait_for(lambda: backend.steps > warm_up_steps, message="decoding to start")
        started = time.monotonic()
        server.stop(1.0)
        assert time.monotonic() - started < 3.0  # not the 4 s of decoding
        with pytest.raises(grpc.RpcError) as failure:
            call.result(timeout=5)
        # Failed by the batcher just before the grace period ended, not cancelled by gRPC at its end.
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
        assert "shut down before this request completed" in failure.value.details()
        client.close()
    text = generate_latest(server.metrics.registry).decode()
    assert value(text, "translator_dropped_sentences_total", reason="shutdown", stage="decoding") == 1
    for stage in ("queued", "decoding"):
        assert value(text, "translator_dropped_sentences_total", reason="cancelled", stage=stage) == 0
    assert value(text, "translator_requests_total", method="Translate", code="UNAVAILABLE") == 1


def test_sigterm_finishes_in_flight_calls_then_exits_0(tiny_repository: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "service.server.app",
        "--host",
        HOST,
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--model-repository",
        str(tiny_repository),
        "--model",
        "tiny",
        "--threads",
        "1",
        "--max-concurrent-rpcs",
        "8",
        "--grace-period-s",
        "10",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), env_name("max_queue_delay_ms"): "600"}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: process.poll() is not None or logged(log_path, "ready") is not None,
            timeout=30,
            message="the server to get ready",
        )
        listening = logged(log_path, "listening")
        assert process.poll() is None and listening is not None, log_path.read_text()
        client = Client(listening["port"])
        status = client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        info = client.translator.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.batching.max_queue_delay_ms == 600  # from the environment
        with ThreadPoolExecutor(4) as pool:
            calls = [
                pool.submit(
                    client.translator.Translate,
                    pb.TranslateRequest(texts=[text], options=pb.TranslateOptions(max_length=6)),
                    timeout=20,
                )
                for text in sentences(4, seed=11)
            ]
            wait_for(
                lambda: value(scrape(listening["metrics_port"]), "translator_queue_depth_sentences") == 4,
                message="four queued sentences",
            )
            process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                fresh = Client(listening["port"])
                try:
                    fresh.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=2)
                    return False
                except grpc.RpcError as error:
                    return error.code() == grpc.StatusCode.UNAVAILABLE
                finally:
                    fresh.close()

            wait_for(refused, timeout=5, message="new calls to be refused with UNAVAILABLE")
            for call in calls:  # the in-flight calls still get their answers
                assert len(call.result(timeout=20).translations) == 1
        client.close()
        assert process.wait(timeout=20) == 0, log_path.read_text()[-3000:]
        assert logged(log_path, "stopped") is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_server_that_began_draining_never_becomes_ready_again() -> None:
    """stop() may begin while load() warms up: the readiness that health, KServe and every call read stays
    DRAINING, and health says NOT_SERVING."""
    import asyncio

    from service.scheduler.metrics import ServerMetrics
    from service.server.config import ServerConfig
    from service.server.health import HealthService
    from service.server.runtime import Readiness, Runtime

    runtime = Runtime(ServerConfig(), ServerMetrics())
    health = HealthService(lambda: runtime.readiness, ("translator.v1.Translator",))

    async def check() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""), None)).status  # type: ignore[arg-type]

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.NOT_SERVING  # loading
    runtime.begin_draining()
    assert not runtime.become_ready()
    assert runtime.readiness is Readiness.DRAINING and not runtime.ready
    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.NOT_SERVING
    fresh = Runtime(ServerConfig(), ServerMetrics())
    assert fresh.become_ready() and fresh.ready and not fresh.become_ready()


@pytest.mark.parametrize("flag, name", [("--http-port", "REST port"), ("--metrics-port", "metrics port")])
def test_a_port_in_use_stops_the_start_naming_it(tiny_repository: Path, flag: str, name: str) -> None:
    """Triton's 8000 is often taken on a developer's machine: exit 1 with the port named, not a traceback."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(port)}
        flags = [item for pair in ports.items() for item in pair]
        command = [sys.executable, "-m", "service.server.app", "--host", HOST, "--model-repository",
                   str(tiny_repository), "--model", "tiny", *flags]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert f"{name} {HOST}:{port}" in output and "address already in use" in output.lower()
    assert "Traceback" not in output
