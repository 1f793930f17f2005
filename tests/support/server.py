"""The in-process server harness: configurations, running servers, gRPC clients, a slowed engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from service.api.inference import grpc_service_pb2_grpc as kpb_grpc
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.engine.engine import Engine
from service.server.app import TranslatorServer
from service.server.config import ServerConfig

HOST = "127.0.0.1"


def make_config(repository: Path, **overrides: Any) -> ServerConfig:
    """Small limits for the tiny model `tiny` of `repository`, on free loopback ports; `overrides` win."""
    values: dict[str, Any] = dict(
        host=HOST,
        port=0,
        metrics_port=0,
        http_port=0,
        model_repository=repository,
        model="tiny",
        threads=1,
        max_concurrent_rpcs=32,
        max_queue_delay_ms=20.0,
        max_texts_per_request=8,
        max_tokens_per_text=16,
        max_beam_size=4,
        max_length_limit=64,
        quality_sample_rate=1.0,
        grace_period_s=2.0,
        max_message_bytes=300_000,
        max_receive_message_bytes=100_000,
    )
    values.update(overrides)
    config = ServerConfig(**values)
    config.validate()
    return config


@contextmanager
def running(config: ServerConfig, engine: Engine | None = None) -> Iterator[TranslatorServer]:
    """A started server with its model loaded (or `engine`); stopped at exit."""
    server = TranslatorServer(config, engine=engine)
    server.start()
    try:
        server.load()
        yield server
    finally:
        server.stop(0.5)


class Client:
    """One channel to a server on 127.0.0.1 and a stub for each of its services."""

    def __init__(self, port: int, credentials: grpc.ChannelCredentials | None = None) -> None:
        address = f"{HOST}:{port}"
        self.channel = (
            grpc.secure_channel(address, credentials)
            if credentials is not None
            else grpc.insecure_channel(address)
        )
        self.translator = pb_grpc.TranslatorStub(self.channel)
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class SlowBackend:
    """Wraps the engine's backend: every step sleeps and "</s>" is never chosen, so decoding lasts."""

    def __init__(self, inner: Any, step_s: float, eos_id: int) -> None:
        self.inner, self.step_s, self.eos_id = inner, step_s, eos_id
        self.steps = 0

    def encode(self, src_ids: np.ndarray, with_attention: bool) -> Any:
        return self.inner.encode(src_ids, with_attention)

    def step(self, state: Any, tokens: np.ndarray, with_attention: bool) -> Any:
        time.sleep(self.step_s)
        self.steps += 1
        state, log_probs, cross, self_attention = self.inner.step(state, tokens, with_attention)
        log_probs = np.array(log_probs)
        log_probs[:, self.eos_id] = -np.inf
        return state, log_probs, cross, self_attention

    def select(self, state: Any, rows: np.ndarray) -> Any:
        return self.inner.select(state, rows)

    def merge(self, first: Any, second: Any) -> Any:
        return self.inner.merge(first, second)


def slow_engine(tiny_repository: Path) -> tuple[Engine, SlowBackend]:
    """The tiny model with every decoding step taking 20 ms: calls stay in flight long enough to act on."""
    engine = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    backend = SlowBackend(engine.runner.backend, step_s=0.02, eos_id=engine.vocabulary.eos_id)
    engine.runner.backend = backend
    return engine, backend


def slow_config(tiny_repository: Path, **overrides: Any) -> ServerConfig:
    """A server for `slow_engine`: batches start at once, long decodes allowed, no quality sampling."""
    values: dict[str, Any] = dict(max_queue_delay_ms=1.0, max_length_limit=256, quality_sample_rate=0.0)
    return make_config(tiny_repository, **{**values, **overrides})
