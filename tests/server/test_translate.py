"""The real gRPC server over real sockets (127.0.0.1), serving the tiny test model.

Most tests share one in-process server; the lifecycle tests (shutdown by signal) run `translator-serve` as a
subprocess, and the overload tests get their own small servers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.api.inference import grpc_service_pb2 as kpb
from service.api.inference import grpc_service_pb2_grpc as kpb_grpc
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.core.options import TranslateOptions
from service.engine.engine import Engine
from service.engine.lane_process import ProcessRunningBatch
from service.scheduler.metrics import ALL_METRICS
from service.server.app import TranslatorServer
from service.server.config import ROOT, ServerConfig, build_parser, env_name, load_config
from service.server.kserve import deserialize_bytes, serialize_bytes
from tests.conftest import DEFAULT_REPOSITORY, WORDS

HOST = "127.0.0.1"
SERVICES = ("translator.v1.Translator", "inference.GRPCInferenceService")


def sentences(count: int, seed: int = 0, longest: int = 10) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(count)]


def make_config(repository: Path, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = dict(
        host=HOST,
        port=0,
        metrics_port=0,
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
    server = TranslatorServer(config, engine=engine)
    server.start()
    try:
        server.load()
        yield server
    finally:
        server.stop(0.5)


class Client:
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


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name` with these labels (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, message: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {message}")
        time.sleep(0.01)


def wait_for_increase(port: int, before: str, name: str, message: str, **labels: str) -> None:
    """Wait until the metric `name{labels}` scraped from `port` is one more than in the `before` scrape."""
    wait_for(
        lambda: value(scrape(port), name, **labels) == 1 + value(before, name, **labels), message=message
    )


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


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_repository: Path) -> Engine:
    return Engine.load(tiny_repository, "tiny", device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(tiny_repository: Path) -> Iterator[TranslatorServer]:
    with running(make_config(tiny_repository)) as instance:
        yield instance


@pytest.fixture
def client(server: TranslatorServer) -> Iterator[Client]:
    assert server.port
    connection = Client(server.port)
    yield connection
    connection.close()


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


@pytest.fixture(scope="module")
def slow(tiny_repository: Path) -> Iterator[tuple[TranslatorServer, SlowBackend]]:
    engine, backend = slow_engine(tiny_repository)
    config = slow_config(tiny_repository, iteration_batching="on")
    with running(config, engine=engine) as instance:
        yield instance, backend


# ---------------------------------------------------------------------------------------------------------
# Translator API
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translations_equal_the_engines(client: Client, reference: Engine, beam_size: int) -> None:
    texts = [*sentences(6, seed=beam_size), "the zebra sees a cat"]
    options = pb.TranslateOptions(beam_size=beam_size, max_length=12, length_penalty=0.8)
    answer = client.translator.Translate(pb.TranslateRequest(texts=texts, options=options))
    expected = reference.translate(
        texts, TranslateOptions(beam_size=beam_size, max_length=12, length_penalty=0.8)
    )
    assert len(answer.translations) == len(texts)
    for got, want in zip(answer.translations, expected, strict=True):
        assert got.text == want.text
        assert list(got.target_tokens) == want.target_tokens
        assert list(got.source_tokens) == want.source_tokens
        assert list(got.unknown_words) == want.unknown_words
        assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-5)
        assert got.log_prob == pytest.approx(want.log_prob, rel=1e-4, abs=1e-5)
        assert not got.attention
        timings = got.timings
        assert timings.queue_ms >= 0 and timings.compute_ms > 0
        assert timings.total_ms >= timings.queue_ms + timings.compute_ms - 0.01
    assert list(answer.translations[-1].unknown_words) == ["zebra"]


def test_attention_maps_follow_the_selection(client: Client, reference: Engine) -> None:
    text = "the big dog sees a small cat"
    kinds = [pb.ENCODER_SELF, pb.CROSS, pb.DECODER_SELF]
    request = pb.TranslateRequest(
        texts=[text],
        options=pb.TranslateOptions(
            max_length=8, attention=pb.AttentionRequest(kinds=kinds, layers=[1], heads=[3, 0])
        ),
    )
    (got,) = client.translator.Translate(request).translations
    (want,) = reference.translate(
        [text], TranslateOptions(max_length=8, attention=frozenset({"cross", "decoder_self", "encoder_self"}))
    )
    target, source = list(got.target_tokens), list(got.source_tokens)
    expected = {
        pb.CROSS: (want.cross_attention, target, source),
        pb.DECODER_SELF: (want.decoder_self_attention, target, ["<s>", *target[:-1]]),
        pb.ENCODER_SELF: (want.encoder_attention, source, source),
    }
    assert [m.kind for m in got.attention] == kinds
    for attention_map in got.attention:
        weights, rows, columns = expected[attention_map.kind]
        assert list(attention_map.layers) == [1] and list(attention_map.heads) == [3, 0]
        assert list(attention_map.row_tokens) == rows and list(attention_map.column_tokens) == columns
        shape = list(attention_map.weights.shape)
        assert shape == [1, 2, len(rows), len(columns)]
        array = np.array(attention_map.weights.data, dtype=np.float32).reshape(shape)
        np.testing.assert_allclose(array, weights[[1]][:, [3, 0]], atol=1e-5)
        np.testing.assert_allclose(array.sum(axis=-1), 1.0, atol=1e-4)
        if attention_map.kind == pb.DECODER_SELF:
            assert np.all(np.triu(array, k=1) == 0)  # causal: nothing above the diagonal

    everything = pb.TranslateRequest(
        texts=[text],
        options=pb.TranslateOptions(max_length=8, attention=pb.AttentionRequest(kinds=[pb.CROSS])),
    )
    (full,) = client.translator.Translate(everything).translations
    assert list(full.attention[0].layers) == [0, 1] and list(full.attention[0].heads) == [0, 1, 2, 3]


@pytest.mark.parametrize("beam_size", [1, 2])
def test_special_tokens_typed_in_a_text_are_unknown_words(client: Client, beam_size: int) -> None:
    """"<pad>", "</s>" and "<s>" written by a user are words the vocabulary lacks, like any other."""
    typed = "the big dog <pad> sees </s> a <s> cat"
    plain = "the big dog zqx sees zqx a zqx cat"
    options = pb.TranslateOptions(
        beam_size=beam_size,
        replace_unknowns=True,
        attention=pb.AttentionRequest(kinds=[pb.CROSS, pb.ENCODER_SELF]),
    )
    got, want, _ = client.translator.Translate(
        pb.TranslateRequest(texts=[typed, plain, "the cat sees a dog"], options=options)
    ).translations
    assert list(got.unknown_words) == ["<pad>", "</s>", "<s>"]
    assert list(got.source_tokens) == list(want.source_tokens) and len(got.source_tokens) == 10
    assert list(got.target_tokens) == list(want.target_tokens) and got.score == pytest.approx(want.score)
    for attention_map in got.attention:
        assert list(attention_map.column_tokens) == list(got.source_tokens)
        assert list(attention_map.weights.shape)[-1] == len(got.source_tokens)


def test_concurrent_callers_are_batched_and_get_their_own_results(
    server: TranslatorServer, client: Client, reference: Engine
) -> None:
    assert server.metrics_port
    texts = sentences(24, seed=7)
    requests = [texts[i : i + 1] if i % 3 else texts[i : i + 2] for i in range(24)]  # some callers send two
    options = pb.TranslateOptions(max_length=10)
    expected = dict(zip(texts, reference.translate(texts, TranslateOptions(max_length=10)), strict=True))
    before = scrape(server.metrics_port)
    barrier = threading.Barrier(len(requests))

    def call(mine: list[str]) -> list[str]:
        barrier.wait()
        answer = client.translator.Translate(pb.TranslateRequest(texts=mine, options=options), timeout=30)
        return [t.text for t in answer.translations]

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(call, requests))
    for mine, got in zip(requests, answers, strict=True):
        assert got == [expected[text].text for text in mine]
    after = scrape(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    batches = delta("translator_batch_size_sentences_count")
    single = delta("translator_batch_size_sentences_bucket", le="1.0")
    assert delta("translator_batch_size_sentences_sum") == sum(len(r) for r in requests)
    assert batches - single >= 1, "no batch held more than one sentence"
    assert batches < len(requests)
    assert delta("translator_requests_total", method="Translate", code="OK") == len(requests)


@pytest.mark.parametrize("beam_size", [1, 2])
def test_stream_sends_every_token_then_the_translation(client: Client, beam_size: int) -> None:
    text = "the red cat sees a dog"
    options = pb.TranslateOptions(beam_size=beam_size, max_length=9)
    messages = list(client.translator.TranslateStream(pb.TranslateStreamRequest(text=text, options=options)))
    events, last = messages[:-1], messages[-1]
    assert all(m.WhichOneof("event") == "token" for m in events) and last.WhichOneof("event") == "translation"
    (batch,) = client.translator.Translate(pb.TranslateRequest(texts=[text], options=options)).translations
    assert [e.token.index for e in events] == list(range(len(events)))
    assert (
        [e.token.token for e in events] == list(batch.target_tokens) == list(last.translation.target_tokens)
    )
    assert last.translation.text == batch.text
    assert last.translation.timings.total_ms > 0


def test_iteration_batching_in_lane_processes(tiny_repository: Path, reference: Engine) -> None:
    """Requests join running batches in the lane processes: each gets what the engine gives it alone, and a
    streamed one its tokens as they come."""
    config = make_config(
        tiny_repository, iteration_batching="on", lane_processes="on", threads=2, max_queue_delay_ms=1.0,
        quality_sample_rate=0.0,  # a sampled request runs as a whole batch, with maps
    )
    texts = sentences(24, seed=3)
    expected = [t.text for t in reference.translate(texts)]
    with running(config) as server:
        engine = server.runtime.engine
        assert server.port and engine and engine.lane_processes
        opened: list[int] = []
        open_batch = engine.running_batch

        def counted_batch(*args: Any, **kwargs: Any) -> Any:
            batch = open_batch(*args, **kwargs)
            assert isinstance(batch, ProcessRunningBatch)
            opened.append(batch.pid)
            return batch

        engine.running_batch = counted_batch  # type: ignore[method-assign]
        client = Client(server.port)
        try:

            def translate(text: str) -> str:
                (got,) = client.translator.Translate(pb.TranslateRequest(texts=[text])).translations
                return got.text

            def stream(text: str) -> tuple[list[str], pb.Translation]:
                messages = list(client.translator.TranslateStream(pb.TranslateStreamRequest(text=text)))
                return [m.token.token for m in messages[:-1]], messages[-1].translation

            with ThreadPoolExecutor(8) as pool:
                streamed = [pool.submit(stream, text) for text in texts[:4]]
                answers = list(pool.map(translate, texts))
            assert answers == expected
            for future, want in zip(streamed, expected, strict=False):
                tokens, translation = future.result()
                assert translation.text == want and tokens == list(translation.target_tokens)
            assert opened, "no running batch went to a lane process"
        finally:
            client.close()


def test_invisible_format_characters_are_not_part_of_a_word(client: Client) -> None:
    """A zero-width space, byte-order mark or soft hyphen pasted into a text does not make a word unknown."""
    clean, pasted = client.translator.Translate(
        pb.TranslateRequest(texts=["the big dog sees her", "\ufeffthe b\u200big dog se\u00ades her"])
    ).translations
    assert pasted.text == clean.text and list(pasted.source_tokens) == list(clean.source_tokens)
    assert list(pasted.unknown_words) == []


def test_model_info_reports_the_settings(client: Client, server: TranslatorServer) -> None:
    info = client.translator.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.version, info.execution_provider) == ("tiny", "1", "CPUExecutionProvider")
    assert (info.architecture.d_model, info.architecture.n_heads, info.architecture.n_decoder_layers) == (
        32,
        4,
        2,
    )
    assert info.source_vocab_size == info.target_vocab_size > 4
    assert (info.batching.max_batch_size, info.batching.max_batch_tokens, info.batching.max_queue_size) == (
        64,
        4096,
        1024,
    )
    assert info.batching.max_queue_delay_ms == 20.0
    limits = info.limits
    assert (
        limits.max_texts_per_request,
        limits.max_tokens_per_text,
        limits.max_beam_size,
        limits.max_length,
    ) == (8, 16, 4, 64)


def test_model_info_carries_the_default_models_evaluation() -> None:
    """model.json keeps its metrics by split; the API names them `<split>_<metric>`."""
    config = make_config(DEFAULT_REPOSITORY, model="toy-en-es", threads=1, lane_processes="off")
    description = json.loads((DEFAULT_REPOSITORY / "toy-en-es/1/model.json").read_text())
    stored = description["training"]["metrics"]
    with running(config) as server:
        assert server.port
        client = Client(server.port)
        try:
            metrics = dict(client.translator.GetModelInfo(pb.GetModelInfoRequest()).training_metrics)
        finally:
            client.close()
    assert metrics["valid_bleu"] == pytest.approx(stored["valid"]["bleu"])
    assert metrics["test_exact_match"] == pytest.approx(stored["test"]["exact_match"])
    assert "test_aer_per_layer_head" not in metrics  # a list per layer and head is no single number
    assert all(name.split("_", 1)[0] in stored for name in metrics)


BAD_TRANSLATE = [
    (pb.TranslateRequest(), ["texts is empty"]),
    (pb.TranslateRequest(texts=["the dog", "  "]), ["texts[1]", "empty"]),
    (pb.TranslateRequest(texts=["\u200b\ufeff\u00ad\u2060"]), ["texts[0]", "empty"]),  # invisible characters
    (pb.TranslateRequest(texts=["the"] * 9), ["9 texts", "max_texts_per_request=8"]),
    (pb.TranslateRequest(texts=[" ".join(["dog"] * 17)]), ["17 tokens", "max_tokens_per_text=16"]),
    (
        pb.TranslateRequest(texts=["a"], options=pb.TranslateOptions(beam_size=0)),
        ["beam_size", "max_beam_size=4", "got 0"],
    ),
    (pb.TranslateRequest(texts=["a"], options=pb.TranslateOptions(beam_size=1000)), ["got 1000"]),
    (pb.TranslateRequest(texts=["a"], options=pb.TranslateOptions(max_length=0)), ["max_length", "got 0"]),
    (
        pb.TranslateRequest(texts=["a"], options=pb.TranslateOptions(max_length=65)),
        ["max_length=64", "got 65"],
    ),
    (pb.TranslateRequest(texts=["a"], options=pb.TranslateOptions(length_penalty=-1)), ["length_penalty"]),
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(attention=pb.AttentionRequest(kinds=[pb.CROSS], layers=[5])),
        ),
        ["layers [5]", "2 decoder layers"],
    ),
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(attention=pb.AttentionRequest(kinds=[pb.CROSS], heads=[0, 4])),
        ),
        ["heads [4]", "4 heads"],
    ),
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(attention=pb.AttentionRequest(kinds=[pb.ATTENTION_KIND_UNSPECIFIED])),
        ),
        ["ATTENTION_KIND_UNSPECIFIED"],
    ),
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(attention=pb.AttentionRequest(kinds=[pb.CROSS, pb.CROSS])),
        ),
        ["once"],
    ),
    # Client-controlled lists are refused by their length before anything looks at their elements.
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(
                attention=pb.AttentionRequest(kinds=[pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF, pb.CROSS])
            ),
        ),
        ["attention.kinds has 4 entries", "3 attention kinds"],
    ),
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(attention=pb.AttentionRequest(kinds=[pb.CROSS], layers=[0, 1, 0])),
        ),
        ["attention.layers has 3 entries", "2 layers"],
    ),
    (
        pb.TranslateRequest(
            texts=["a"],
            options=pb.TranslateOptions(attention=pb.AttentionRequest(kinds=[pb.CROSS], heads=[0] * 50_000)),
        ),
        ["attention.heads has 50000 entries", "4 heads"],
    ),
]


def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(client: Client) -> None:
    for request, needles in BAD_TRANSLATE:
        with pytest.raises(grpc.RpcError) as failure:
            client.translator.Translate(request, timeout=10)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        for needle in needles:
            assert needle in failure.value.details(), (needle, failure.value.details())
    with pytest.raises(grpc.RpcError) as failure:
        list(client.translator.TranslateStream(pb.TranslateStreamRequest(text=" "), timeout=10))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in failure.value.details()
    assert client.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=10).translations[0]


def test_huge_text_is_refused_before_it_is_tokenized(
    server: TranslatorServer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_tokens_per_text=16 allows 16 x 64 = 1024 characters; tokenizing a multi-megabyte text first froze
    # the server only to refuse it for its tokens afterwards.
    assert server.runtime.engine is not None
    vocabulary = server.runtime.engine.vocabulary
    tokenized: list[int] = []
    encode_source = vocabulary.encode_source

    def spy(text: str) -> Any:
        tokenized.append(len(text))
        return encode_source(text)

    monkeypatch.setattr(vocabulary, "encode_source", spy)
    huge = "dog " * 20_000  # 80000 characters, within max_receive_message_bytes
    needles = ["80000 characters", "1024 allowed", "max_tokens_per_text=16"]
    calls = [
        lambda: client.translator.Translate(pb.TranslateRequest(texts=["the cat", huge]), timeout=10),
        lambda: list(client.translator.TranslateStream(pb.TranslateStreamRequest(text=huge), timeout=10)),
        lambda: client.kserve.ModelInfer(infer_request(["the cat", huge]), timeout=10),
    ]
    for call, name in zip(calls, ("texts[1]", "text", "TEXT[1]"), strict=True):
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for needle in (name, *needles):
            assert needle in failure.value.details(), (needle, failure.value.details())
    assert all(length <= 1024 for length in tokenized), tokenized
    exactly = " ".join(["dog"] * 16) + " " * (1024 - 63)  # 1024 characters, 16 tokens: accepted
    assert len(exactly) == 1024
    assert client.translator.Translate(pb.TranslateRequest(texts=[exactly]), timeout=10).translations


def test_malformed_request_is_counted_with_a_duration(server: TranslatorServer, client: Client) -> None:
    assert server.metrics_port
    labels = {"method": "Translate", "code": "INVALID_ARGUMENT"}
    before = scrape(server.metrics_port)
    raw = client.channel.unary_unary("/translator.v1.Translator/Translate")
    with pytest.raises(grpc.RpcError) as failure:
        raw(b"\xff\xff\xff", timeout=10)  # no protobuf message
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(server.metrics_port)
    for name in ("translator_requests_total", "translator_request_duration_seconds_count"):
        assert value(after, name, **labels) - value(before, name, **labels) == 1, name


# ---------------------------------------------------------------------------------------------------------
# KServe v2
# ---------------------------------------------------------------------------------------------------------


def infer_request(
    texts: list[str],
    *,
    raw: bool = True,
    shape: list[int] | None = None,
    outputs: tuple[str, ...] = (),
    **parameters: Any,
) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(
        name="TEXT", datatype="BYTES", shape=shape if shape is not None else [len(texts)]
    )
    request = kpb.ModelInferRequest(
        model_name="tiny",
        id="req-1",
        inputs=[tensor],
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )
    encoded = [t.encode() for t in texts]
    if raw:
        request.raw_input_contents.append(serialize_bytes(encoded))
    else:
        request.inputs[0].contents.bytes_contents.extend(encoded)
    for name, setting in parameters.items():
        if isinstance(setting, bool):
            request.parameters[name].bool_param = setting
        elif isinstance(setting, int):
            request.parameters[name].int64_param = setting
        elif isinstance(setting, float):
            request.parameters[name].double_param = setting
        else:
            request.parameters[name].string_param = setting
    return request


def outputs_of(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Like tritonclient's InferResult.as_numpy: raw_output_contents by output position."""
    dtypes = {"FP32": "<f4", "INT32": "<i4"}
    arrays = {}
    assert not any(o.HasField("contents") for o in response.outputs)
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            array = np.array(deserialize_bytes(raw, output.name), dtype=object)
        else:
            array = np.frombuffer(raw, dtype=dtypes[output.datatype])
        arrays[output.name] = array.reshape(list(output.shape))
    return arrays


def test_kserve_infer_raw_with_attention_and_lengths(client: Client) -> None:
    texts = ["the big dog sees her", "a cat", "the red house with a small dog"]
    request = infer_request(
        texts,
        shape=[3, 1],
        beam_size=2,
        max_length=8,
        length_penalty=0.5,
        outputs=("TRANSLATION", "CROSS_ATTENTION", "SOURCE_LENGTH", "TARGET_LENGTH"),
    )
    response = client.kserve.ModelInfer(request)
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "req-1")
    out = outputs_of(response)
    options = pb.TranslateOptions(
        beam_size=2, max_length=8, length_penalty=0.5, attention=pb.AttentionRequest(kinds=[pb.CROSS])
    )
    expected = client.translator.Translate(pb.TranslateRequest(texts=texts, options=options)).translations
    assert out["TRANSLATION"].shape == (3, 1)
    assert [b.decode() for b in out["TRANSLATION"][:, 0]] == [t.text for t in expected]
    assert out["SOURCE_LENGTH"].tolist() == [len(t.source_tokens) for t in expected]
    assert out["TARGET_LENGTH"].tolist() == [len(t.target_tokens) for t in expected]
    cross = out["CROSS_ATTENTION"]
    assert cross.shape == (3, 2, 4, max(out["TARGET_LENGTH"]), max(out["SOURCE_LENGTH"]))
    for row, translation in enumerate(expected):
        steps, width = len(translation.target_tokens), len(translation.source_tokens)
        weights = np.array(translation.attention[0].weights.data).reshape(2, 4, steps, width)
        np.testing.assert_allclose(cross[row, :, :, :steps, :width], weights, atol=1e-6)
        assert not cross[row, :, :, steps:].any() and not cross[row, :, :, :, width:].any()  # zero padding


def test_kserve_infer_typed_contents_returns_only_translation(client: Client, reference: Engine) -> None:
    texts = ["the cat sees the dog", "a big red house"]
    response = client.kserve.ModelInfer(infer_request(texts, raw=False, max_length=12))
    out = outputs_of(response)
    assert list(out) == ["TRANSLATION"] and out["TRANSLATION"].shape == (2,)
    expected = reference.translate(texts, TranslateOptions(max_length=12))
    assert [b.decode() for b in out["TRANSLATION"]] == [t.text for t in expected]


def test_kserve_health_and_metadata(client: Client) -> None:
    assert client.kserve.ServerLive(kpb.ServerLiveRequest()).live
    assert client.kserve.ServerReady(kpb.ServerReadyRequest()).ready
    assert client.kserve.ModelReady(kpb.ModelReadyRequest(name="tiny")).ready
    assert client.kserve.ModelReady(kpb.ModelReadyRequest(name="tiny", version="1")).ready
    assert not client.kserve.ModelReady(kpb.ModelReadyRequest(name="tiny", version="2")).ready
    assert not client.kserve.ModelReady(kpb.ModelReadyRequest(name="other")).ready
    assert client.kserve.ServerMetadata(kpb.ServerMetadataRequest()).name == "translator"
    metadata = client.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="tiny"))
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("tiny", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("TEXT", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("TRANSLATION", "BYTES", [-1]),
        ("CROSS_ATTENTION", "FP32", [-1, 2, 4, -1, -1]),
        ("SOURCE_LENGTH", "INT32", [-1]),
        ("TARGET_LENGTH", "INT32", [-1]),
    ]
    with pytest.raises(grpc.RpcError) as failure:
        client.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="other"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND and "'other'" in failure.value.details()


def test_kserve_model_config_statistics_and_repository_index(tiny_repository: Path, tmp_path: Path) -> None:
    """Triton's extensions: the config describes what ModelMetadata does plus the batcher's settings; the
    statistics count what /metrics counts; the index lists every model version, the served one READY."""
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository, repository)
    shutil.copytree(repository / "tiny" / "1", repository / "tiny" / "2")  # the server takes the latest
    shutil.copytree(repository / "tiny", repository / "other")
    shutil.copytree(repository / "tiny" / "1", repository / "other" / "10")  # sorted as a number
    shutil.copytree(repository / "tiny" / "1", repository / "tiny" / "01")  # version 1 again: listed once
    (repository / "drafts").mkdir()  # a model folder with no version
    (repository / ".git").mkdir()  # not a model
    (repository / "README.md").write_text("not a model either")
    with running(make_config(repository, max_queue_delay_ms=7.0, max_batch_size=12)) as server:
        assert server.port and server.metrics_port
        kserve = Client(server.port).kserve
        config = kserve.ModelConfig(kpb.ModelConfigRequest(name="tiny")).config
        metadata = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="tiny"))
        names = {kpb.TYPE_STRING: "BYTES", kpb.TYPE_FP32: "FP32", kpb.TYPE_INT32: "INT32"}
        assert [(t.name, names[t.data_type], list(t.dims)) for t in (*config.input, *config.output)] == [
            (t.name, t.datatype, list(t.shape)) for t in (*metadata.inputs, *metadata.outputs)
        ]
        assert (config.name, config.max_batch_size) == ("tiny", 0)
        batching = config.dynamic_batching
        assert (list(batching.preferred_batch_size), batching.max_queue_delay_microseconds) == ([12], 7000)
        assert config.parameters["max_texts_per_request"].string_value == "8"
        with pytest.raises(grpc.RpcError) as failure:
            kserve.ModelConfig(kpb.ModelConfigRequest(name="tiny", version="1"))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND

        for texts in (["the cat", "a dog"], ["the red house"]):
            kserve.ModelInfer(infer_request(texts, max_length=6))
        with pytest.raises(grpc.RpcError):
            kserve.ModelInfer(infer_request([""]))
        [stats] = kserve.ModelStatistics(kpb.ModelStatisticsRequest()).model_stats
        assert (stats.name, stats.version, stats.inference_count) == ("tiny", "2", 3)
        scraped = scrape(server.metrics_port)
        batches = value(scraped, "translator_batch_size_sentences_count")
        assert stats.execution_count == batches == stats.inference_stats.compute_infer.count
        assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (2, 1)
        assert stats.inference_stats.queue.count == 3 and stats.last_inference > 0
        encode = value(scraped, "translator_compute_duration_seconds_sum", stage="encode")
        decode = value(scraped, "translator_compute_duration_seconds_sum", stage="decode")
        assert stats.inference_stats.compute_infer.ns == pytest.approx((encode + decode) * 1e9, rel=1e-6)

        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [
            ("drafts", "", "UNAVAILABLE"),
            ("other", "1", "UNAVAILABLE"), ("other", "2", "UNAVAILABLE"), ("other", "10", "UNAVAILABLE"),
            ("tiny", "1", "UNAVAILABLE"), ("tiny", "2", "READY"),
        ]
        assert "no version folder" in index.models[0].reason
        assert "serves tiny version 2" in index.models[1].reason
        ready = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True))
        assert [(m.name, m.version) for m in ready.models] == [("tiny", "2")]


def _bad_kserve() -> list[tuple[str, kpb.ModelInferRequest, grpc.StatusCode, str]]:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = []

    def case(name: str, code: grpc.StatusCode, needle: str, **kwargs: Any) -> kpb.ModelInferRequest:
        request = infer_request(["the cat", "a dog"], **kwargs)
        cases.append((name, request, code, needle))
        return request

    case("wrong input name", invalid, "unknown input 'SRC'").inputs[0].name = "SRC"
    case("wrong datatype", invalid, "datatype BYTES, got 'FP32'").inputs[0].datatype = "FP32"
    case("shape vs elements", invalid, "shape [3] (3 elements) but 2 elements", shape=[3])
    case("bad shape", invalid, "shape [N] or [N, 1], got [2, 2]", shape=[2, 2])
    case("malformed raw", invalid, "malformed BYTES").raw_input_contents[0] = b"\x09\x00\x00\x00abc"
    both = case("raw and typed", invalid, "one form or the other")
    both.inputs[0].contents.bytes_contents.append(b"x")
    case("unknown output", invalid, "unknown output 'LOGITS'", outputs=("LOGITS",))
    case("unknown parameter", invalid, "unknown parameter 'temperature'", temperature=0.5)
    case("wrong parameter type", invalid, "beam_size must be a int64_param", beam_size="4")
    case("beam size limit", invalid, "max_beam_size=4, got 9", beam_size=9)
    case("unknown model", grpc.StatusCode.NOT_FOUND, "unknown model 'nope'").model_name = "nope"
    case("unknown version", grpc.StatusCode.NOT_FOUND, "no version '3'").model_version = "3"
    case("not utf-8", invalid, "TEXT[1] is not valid UTF-8").raw_input_contents[0] = serialize_bytes(
        [b"ok", b"\xff\xfe"]
    )
    case("empty text", invalid, "TEXT[0]: the text is empty", shape=[2]).raw_input_contents[0] = (
        serialize_bytes([b"", b"a"])
    )
    case("too many outputs", invalid, "outputs has 5 entries", outputs=("TRANSLATION",) * 5)
    # Event.wait overflowed on ~9.2e15 us (INTERNAL); the most accepted is 1e14 us (1e8 s).
    case(
        "huge timeout",
        invalid,
        "parameter timeout must be between 0 (none) and 100000000000000 microseconds",
        timeout=2**62,
    )
    return cases


@pytest.mark.parametrize("name, request_, code, needle", _bad_kserve(), ids=[c[0] for c in _bad_kserve()])
def test_kserve_bad_tensors(
    client: Client, name: str, request_: kpb.ModelInferRequest, code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        client.kserve.ModelInfer(request_, timeout=10)
    assert failure.value.code() == code
    assert needle in failure.value.details()


# ---------------------------------------------------------------------------------------------------------
# Reflection, health, metrics
# ---------------------------------------------------------------------------------------------------------


def test_kserve_timeout_parameter_is_bounded(client: Client) -> None:
    # Without a gRPC deadline the `timeout` parameter alone sets the wait: ~9.2e15 us overflowed (INTERNAL).
    with pytest.raises(grpc.RpcError) as failure:
        client.kserve.ModelInfer(infer_request(["the cat"], timeout=2**62))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout must be between 0 (none) and 100000000000000 microseconds" in failure.value.details()
    out = outputs_of(client.kserve.ModelInfer(infer_request(["the cat"], timeout=10**14)))
    assert out["TRANSLATION"].shape == (1,)
    # 0 is Triton's "no timeout" (tritonclient sends it as given).
    out = outputs_of(client.kserve.ModelInfer(infer_request(["the cat"], timeout=0)))
    assert out["TRANSLATION"].shape == (1,)


def test_kserve_output_parameters(client: Client) -> None:
    """`binary_data` (how HTTP encodes an output; gRPC outputs are raw anyway) is accepted, others refused."""
    request = infer_request(["the cat"], outputs=("TRANSLATION",))
    request.outputs[0].parameters["binary_data"].bool_param = True
    assert outputs_of(client.kserve.ModelInfer(request))["TRANSLATION"].shape == (1,)
    request.outputs[0].parameters["classification"].int64_param = 2
    with pytest.raises(grpc.RpcError) as failure:
        client.kserve.ModelInfer(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "other than binary_data are not supported (got classification)" in failure.value.details()


def test_kserve_oversized_maps_are_refused_from_their_size(client: Client, tiny_repository: Path) -> None:
    """Refused before the padded maps are built: the size named is that of the maps alone."""
    texts = sentences(8, seed=5, longest=16)
    options = pb.TranslateOptions(max_length=64, attention=pb.AttentionRequest(kinds=[pb.CROSS]))
    maps = [
        t.attention[0].weights.shape
        for t in client.translator.Translate(pb.TranslateRequest(texts=texts, options=options)).translations
    ]
    layers, heads = maps[0][:2]
    size = len(maps) * layers * heads * max(m[2] for m in maps) * max(m[3] for m in maps) * 4
    limit = size // 2
    with running(make_config(tiny_repository, max_message_bytes=limit)) as small:
        assert small.port
        other = Client(small.port)
        try:
            request = infer_request(texts, max_length=64, outputs=("TRANSLATION", "CROSS_ATTENTION"))
            with pytest.raises(grpc.RpcError) as failure:
                other.kserve.ModelInfer(request, timeout=10)
        finally:
            other.close()
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"the answer would be {size} bytes, more than max_message_bytes={limit}" in failure.value.details()


def test_message_size_limits(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as failure:  # refused by gRPC itself, before any handler runs
        client.translator.Translate(pb.TranslateRequest(texts=["dog " * 30_000]), timeout=10)
    # max_receive_message_bytes=100000 (what the server accepts), not max_message_bytes (what it sends).
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "100000" in failure.value.details()
    big = pb.TranslateRequest(
        texts=sentences(2, seed=5, longest=16),
        options=pb.TranslateOptions(
            max_length=64, attention=pb.AttentionRequest(kinds=[pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF])
        ),
    )
    answer = client.translator.Translate(big, timeout=10)
    assert 100_000 < answer.ByteSize() <= 300_000  # larger than any request may be: sent all the same
    kinds = [pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF]
    request = pb.TranslateRequest(
        texts=sentences(8, seed=5, longest=16),
        options=pb.TranslateOptions(max_length=64, attention=pb.AttentionRequest(kinds=kinds)),
    )
    with pytest.raises(grpc.RpcError) as failure:  # the answer would be too big: say so, and what to change
        client.translator.Translate(request, timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_bytes=300000" in failure.value.details()


def test_oversized_maps_are_refused_before_the_answer_is_built(client: Client, tiny_repository: Path) -> None:
    """Translate: refused from the maps' size once they are computed (the size named is the maps' alone, not
    the built message's), and before any work when the maps cannot fit even at one target token each (the
    encoder maps are known from the request). Before, a 1 GB answer was built, ~4 GB of memory at the peak,
    only to be refused."""
    kinds = [pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF]
    options = pb.TranslateOptions(max_length=64, attention=pb.AttentionRequest(kinds=kinds))
    short = sentences(2, seed=5, longest=16)
    answer = client.translator.Translate(pb.TranslateRequest(texts=short, options=options))
    size = sum(int(np.prod(m.weights.shape)) * 4 for t in answer.translations for m in t.attention)
    architecture = client.translator.GetModelInfo(pb.GetModelInfoRequest()).architecture
    encoder_cells = architecture.n_encoder_layers * architecture.n_heads
    decoder_cells = architecture.n_decoder_layers * architecture.n_heads
    long = [" ".join(random.Random(seed).choices(WORDS, k=40)) for seed in range(8)]
    with running(make_config(tiny_repository, max_message_bytes=size - 1, max_tokens_per_text=48)) as small:
        assert small.port and small.metrics_port
        other = Client(small.port)

        def encoded() -> float:
            metrics = scrape(small.metrics_port)
            return value(metrics, "translator_compute_duration_seconds_count", stage="encode")

        try:
            with pytest.raises(grpc.RpcError) as failure:
                other.translator.Translate(pb.TranslateRequest(texts=short, options=options), timeout=10)
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"the answer would be {size} bytes, more than" in failure.value.details()
            one_token = pb.TranslateOptions(max_length=1)
            plain = other.translator.Translate(pb.TranslateRequest(texts=long, options=one_token))
            # One target token each: encoder maps S x S, cross 1 x S, decoder self 1 x 1.
            lengths = [len(t.source_tokens) for t in plain.translations]
            least = 4 * sum(encoder_cells * s * s + decoder_cells * (s + 1) for s in lengths)
            before = encoded()
            with pytest.raises(grpc.RpcError) as failure:
                other.translator.Translate(pb.TranslateRequest(texts=long, options=options), timeout=10)
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"the answer would be at least {least} bytes, more than" in failure.value.details()
            assert encoded() == before  # nothing computed
        finally:
            other.close()


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
        value(text, "translator_model_info", model="tiny", version="1", provider="CPUExecutionProvider") == 1
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


# ---------------------------------------------------------------------------------------------------------
# Overload, deadlines, cancellation
# ---------------------------------------------------------------------------------------------------------


def test_full_queue_gives_resource_exhausted_at_once(tiny_repository: Path) -> None:
    config = make_config(tiny_repository, max_queue_size=4, max_texts_per_request=4, max_queue_delay_ms=700.0)
    with running(config) as server, ThreadPoolExecutor(1) as pool:
        assert server.port and server.runtime.batcher
        client = Client(server.port)
        waiting = pool.submit(
            client.translator.Translate, pb.TranslateRequest(texts=["the cat"] * 3), timeout=10
        )
        batcher = server.runtime.batcher
        wait_for(lambda: batcher.depth == 3, message="three queued sentences")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            client.translator.Translate(pb.TranslateRequest(texts=["a dog", "a cat"]), timeout=10)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size=4" in failure.value.details()
        assert time.monotonic() - started < 0.5  # refused at once, not after the queue delay
        assert len(waiting.result().translations) == 3
        # The refused job was never queued: nothing of it may be counted as dropped (its call's end used to
        # "cancel" it: 2 sentences dropped while "decoding").
        assert server.metrics_port
        text = scrape(server.metrics_port)
        for reason in ("cancelled", "deadline_exceeded", "shutdown", "error"):
            for stage in ("queued", "decoding"):
                dropped = value(text, "translator_dropped_sentences_total", reason=reason, stage=stage)
                assert dropped == 0, (reason, stage)
        client.close()


def test_a_call_cancelled_while_queued_leaves_the_queue(tiny_repository: Path) -> None:
    engine, _ = slow_engine(tiny_repository)
    config = slow_config(tiny_repository, batch_workers=1)
    with running(config, engine=engine) as server:
        assert server.port and server.metrics_port and server.runtime.batcher
        batcher = server.runtime.batcher
        client = Client(server.port)
        before = scrape(server.metrics_port)

        # One 60-step batch (~1.2 s) holds the only worker; a call with another search waits behind it.
        busy = client.translator.Translate.future(
            pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=60)), timeout=30
        )
        wait_for(lambda: value(scrape(server.metrics_port), "translator_inflight_requests") == 1)
        options = pb.TranslateOptions(max_length=20, length_penalty=0.8)
        waiting = client.translator.Translate.future(
            pb.TranslateRequest(texts=["a dog"], options=options), timeout=30
        )
        wait_for(lambda: batcher.depth == 1, message="the second call to be queued")
        waiting.cancel()
        wait_for(lambda: batcher.depth == 0, message="the cancelled call to leave the queue")
        dropped = "translator_dropped_sentences_total"
        message = "its sentence dropped as cancelled"
        wait_for_increase(server.metrics_port, before, dropped, message, reason="cancelled", stage="queued")
        assert not busy.done() and len(busy.result().translations[0].target_tokens) == 60
        message = "the call counted as CANCELLED"
        requests = "translator_requests_total"
        wait_for_increase(
            server.metrics_port, before, requests, message, method="Translate", code="CANCELLED"
        )
        client.close()


def test_calls_beyond_max_concurrent_rpcs_are_refused_and_health_keeps_answering(
    tiny_repository: Path,
) -> None:
    engine, _ = slow_engine(tiny_repository)
    config = slow_config(tiny_repository, max_concurrent_rpcs=2)
    assert config.grpc_call_limit == 258  # room beyond the translation calls
    with running(config, engine=engine) as server, ThreadPoolExecutor(16) as pool:
        assert server.port and server.metrics_port
        client = Client(server.port)
        long = pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=150))
        busy = [client.translator.Translate.future(long, timeout=30) for _ in range(2)]
        wait_for(lambda: server.metrics.inflight._value.get() == 2, message="two calls in flight")
        started = time.monotonic()
        extra = [
            pool.submit(client.translator.Translate, pb.TranslateRequest(texts=["a dog"]), timeout=10)
            for _ in range(12)
        ]
        health = client.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert client.translator.GetModelInfo(pb.GetModelInfoRequest(), timeout=2).name == "tiny"
        for call in extra:
            with pytest.raises(grpc.RpcError) as failure:
                call.result()
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_rpcs=2" in failure.value.details()
        assert time.monotonic() - started < 2.0  # refused at once, long before the 3 s the busy calls take
        assert all(not call.done() for call in busy)
        text = scrape(server.metrics_port)
        assert value(text, "translator_requests_total", method="Translate", code="RESOURCE_EXHAUSTED") == 12
        for call in busy:
            call.cancel()
        wait_for(lambda: server.metrics.inflight._value.get() == 0, message="the busy calls to end")
        assert client.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=10).translations
        client.close()


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


def test_deadline_exceeded_frees_queued_and_running_work(slow: tuple[TranslatorServer, SlowBackend]) -> None:
    server, backend = slow
    assert server.port and server.metrics_port and server.runtime.batcher
    client = Client(server.port)
    before = scrape(server.metrics_port)
    earlier_steps = backend.steps  # the warm-up (and earlier tests) decoded through this backend too
    with ThreadPoolExecutor(1) as pool:
        # A long request occupies the worker; one with other options and a short deadline waits behind it.
        busy = pool.submit(
            client.translator.Translate,
            pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=25)),
            timeout=30,
        )
        wait_for(lambda: backend.steps > earlier_steps, message="decoding to start")
        with pytest.raises(grpc.RpcError) as failure:
            client.translator.Translate(
                pb.TranslateRequest(
                    texts=["a dog"], options=pb.TranslateOptions(max_length=26, length_penalty=0.9)
                ),
                timeout=0.15,
            )
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server.runtime.batcher.depth == 0, message="the queue to empty")  # type: ignore[union-attr]
        assert len(busy.result().translations[0].target_tokens) == 25
    # A request whose deadline passes during decoding has its rows dropped: the steps stop.
    with pytest.raises(grpc.RpcError) as failure:
        client.translator.Translate(
            pb.TranslateRequest(texts=["the big dog"], options=pb.TranslateOptions(max_length=200)),
            timeout=0.3,
        )
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def dropped_while_decoding() -> float:
        return value(
            scrape(server.metrics_port),
            "translator_dropped_sentences_total",
            reason="deadline_exceeded",
            stage="decoding",
        )

    baseline = value(
        before, "translator_dropped_sentences_total", reason="deadline_exceeded", stage="decoding"
    )
    # On a busy machine the worker may notice the deadline a little late: wait for the drop, then the steps
    # must stand still.
    wait_for(lambda: dropped_while_decoding() - baseline == 1, message="the decoding rows to be dropped")
    time.sleep(0.05)  # a step already under way when the rows were dropped still ends
    steps = backend.steps
    time.sleep(0.2)
    assert backend.steps == steps
    after = scrape(server.metrics_port)
    for stage in ("queued", "decoding"):
        dropped = value(after, "translator_dropped_sentences_total", reason="deadline_exceeded", stage=stage)
        assert (
            dropped
            - value(before, "translator_dropped_sentences_total", reason="deadline_exceeded", stage=stage)
            == 1
        ), stage
    assert value(after, "translator_queue_depth_sentences") == 0
    # KServe clients set Triton's `timeout` parameter (microseconds) rather than a gRPC deadline.
    with pytest.raises(grpc.RpcError) as failure:
        client.kserve.ModelInfer(infer_request(["the big dog"], max_length=200, timeout=100_000), timeout=10)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client.close()


class PastDeadlineContext:
    """What a handler's context looks like once gRPC has ended the call at its deadline."""

    def __init__(self) -> None:
        self.aborted: list[grpc.StatusCode] = []

    def time_remaining(self) -> float:
        return 0.0

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append(code)
        raise AssertionError("aborted a call that gRPC had already ended")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_failure_found_after_the_deadline_is_not_sent_again(streaming: bool) -> None:
    """gRPC answered DEADLINE_EXCEEDED already: aborting again makes it log an error for a timeout."""
    import asyncio

    from service.scheduler.metrics import ServerMetrics
    from service.scheduler.status import RequestFailed, Status
    from service.server.accounting import tracked, tracked_stream
    from service.server.runtime import Runtime

    class Servicer:
        def __init__(self) -> None:
            self.runtime = Runtime(config=ServerConfig(), metrics=ServerMetrics())

        @tracked("Translate")
        async def unary(self, request: Any, context: Any) -> Any:
            raise RequestFailed(Status.DEADLINE_EXCEEDED, "the deadline passed while queued")

        @tracked_stream("TranslateStream")
        async def stream(self, request: Any, context: Any) -> Any:
            raise RequestFailed(Status.DEADLINE_EXCEEDED, "the deadline passed while decoding")
            yield  # an async generator

    async def call(servicer: Servicer, context: PastDeadlineContext) -> None:
        if streaming:
            async for _ in servicer.stream(None, context):
                pass
        else:
            await servicer.unary(None, context)

    servicer, context = Servicer(), PastDeadlineContext()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call(servicer, context))
    assert context.aborted == []
    method = "TranslateStream" if streaming else "Translate"
    counted = servicer.runtime.metrics.requests.labels(method=method, code="DEADLINE_EXCEEDED")._value.get()
    assert counted == 1


class BeforeDeadlineContext(PastDeadlineContext):
    """A handler's context when the client's cancel arrives just before the server's copy of the deadline."""

    def time_remaining(self) -> float:
        return 0.005


def test_a_call_its_deadline_timer_dropped_counts_as_deadline_exceeded() -> None:
    """The server's timer expires the job at its deadline; the client, at its side of the same deadline, then
    cancels the call before the server's clock has passed it. The call is recorded DEADLINE_EXCEEDED, the
    reason its sentence was dropped for (it was recorded CANCELLED: 1 run in ~8 of
    test_faults.py::test_deadlines_shorter_than_the_queue_wait saw the counts disagree)."""
    import asyncio

    from service.scheduler.job import Job
    from service.scheduler.metrics import ServerMetrics
    from service.server.accounting import tracked
    from service.server.runtime import Runtime, Submitted, Work
    from tests.test_batcher import make, source

    batcher, engine, batcher_metrics = make()

    class Servicer:
        def __init__(self) -> None:
            self.runtime = Runtime(config=ServerConfig(), metrics=ServerMetrics())

        @tracked("Translate")
        async def unary(self, request: Any, context: Any) -> Any:
            job = Job([source(4)], TranslateOptions(), deadline=time.monotonic() + 0.001)
            batcher.submit(job)
            work = Work(job.sources, job.options)
            with Submitted(engine, batcher, job, work, context):  # type: ignore[arg-type]
                batcher.expire(job)  # what Submitted's deadline timer does
                raise asyncio.CancelledError  # grpc.aio ending the call on the client's cancel

    servicer = Servicer()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(servicer.unary(None, BeforeDeadlineContext()))
    requests = servicer.runtime.metrics.requests
    assert requests.labels(method="Translate", code="DEADLINE_EXCEEDED")._value.get() == 1
    assert requests.labels(method="Translate", code="CANCELLED")._value.get() == 0
    dropped = batcher_metrics.dropped_sentences
    assert dropped.labels(reason="deadline_exceeded", stage="queued")._value.get() == 1


def test_a_request_joins_the_running_batch(slow: tuple[TranslatorServer, SlowBackend]) -> None:
    """Iteration-level batching: with one worker, a short request arriving while a long one decodes joins
    its batch at the next step and is answered long before the long one ends."""
    server, backend = slow
    assert server.port and server.runtime.batcher and server.runtime.batcher.settings.workers == 1
    client = Client(server.port)
    earlier_steps = backend.steps
    with ThreadPoolExecutor(1) as pool:
        long_call = pool.submit(
            client.translator.Translate,
            pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=60)),  # 1.2 s
            timeout=30,
        )
        wait_for(lambda: backend.steps > earlier_steps + 2, message="decoding to start")
        started = time.monotonic()
        short = client.translator.Translate(
            pb.TranslateRequest(texts=["a dog"], options=pb.TranslateOptions(max_length=4)), timeout=30
        )
        assert time.monotonic() - started < 0.6 and not long_call.done()
        assert len(short.translations[0].target_tokens) == 4
        assert len(long_call.result().translations[0].target_tokens) == 60
    client.close()


def test_cancelled_stream_stops_decoding(slow: tuple[TranslatorServer, SlowBackend]) -> None:
    server, backend = slow
    assert server.port and server.metrics_port
    client = Client(server.port)
    before = scrape(server.metrics_port)
    call = client.translator.TranslateStream(
        pb.TranslateStreamRequest(text="the small cat", options=pb.TranslateOptions(max_length=200))
    )
    received = [next(call) for _ in range(3)]
    assert [m.token.index for m in received] == [0, 1, 2]
    call.cancel()
    message = "the cancelled row to be dropped"
    dropped = "translator_dropped_sentences_total"
    wait_for_increase(server.metrics_port, before, dropped, message, reason="cancelled", stage="decoding")
    time.sleep(0.05)
    steps = backend.steps
    time.sleep(0.15)
    assert backend.steps == steps, "decoding went on after the client cancelled"
    after = scrape(server.metrics_port)
    assert value(after, "translator_generated_tokens_total") == value(
        before, "translator_generated_tokens_total"
    )
    wait_for(
        lambda: (
            value(
                scrape(server.metrics_port),
                "translator_requests_total",
                method="TranslateStream",
                code="CANCELLED",
            )
            >= 1
        ),
        message="the cancelled call to be counted",
    )
    client.close()


# ---------------------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tiny_repository: Path, tmp_path: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        str(tmp_path / "ca.key"),
        "-out",
        str(tmp_path / "ca.pem"),
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        _openssl(
            "req",
            *ec,
            "-keyout",
            str(tmp_path / f"{name}.key"),
            "-out",
            str(tmp_path / f"{name}.csr"),
            "-subj",
            f"/CN={name}",
        )
        extension = tmp_path / f"{name}.ext"
        extension.write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(tmp_path / f"{name}.csr"),
            "-CA",
            str(tmp_path / "ca.pem"),
            "-CAkey",
            str(tmp_path / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(tmp_path / f"{name}.pem"),
            "-days",
            "1",
            "-extfile",
            str(extension),
        )
    config = make_config(
        tiny_repository,
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
    )
    ca = (tmp_path / "ca.pem").read_bytes()
    with running(config) as server:
        assert server.port
        trusted = Client(
            server.port,
            grpc.ssl_channel_credentials(
                ca, (tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes()
            ),
        )
        assert trusted.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=10).translations
        trusted.close()
        for credentials in (grpc.ssl_channel_credentials(ca), None):  # no client certificate; plaintext
            stranger = Client(server.port, credentials)
            with pytest.raises(grpc.RpcError) as failure:
                stranger.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=5)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            stranger.close()


# ---------------------------------------------------------------------------------------------------------
# Settings and the process lifecycle
# ---------------------------------------------------------------------------------------------------------


def test_settings_from_flags_environment_and_defaults() -> None:
    defaults = load_config([], environ={})
    assert (defaults.host, defaults.port, defaults.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert (defaults.model_repository, defaults.model, defaults.model_version) == (
        ROOT / "model_repository",
        "toy-en-es",
        None,
    )
    assert (
        defaults.max_batch_size,
        defaults.max_batch_tokens,
        defaults.max_queue_delay_ms,
        defaults.max_queue_size,
        defaults.grace_period_s,
    ) == (64, 4096, 5.0, 1024, 30.0)
    # What the server accepts and what it sends are limited apart; translation calls and threads too.
    assert (defaults.max_receive_message_bytes, defaults.max_message_bytes) == (4 * 1024**2, 64 * 1024**2)
    calls = (defaults.max_concurrent_rpcs, defaults.grpc_max_calls, defaults.grpc_call_limit)
    assert calls == (256, None, 512)
    environ = {env_name("port"): "7000", env_name("max_batch_size"): "8", env_name("tls_cert"): ""}
    environ[env_name("max_receive_message_bytes")] = "1000"
    config = load_config(["--port", "9000", "--model-version", "3"], environ=environ)
    assert (config.port, config.max_batch_size, config.model_version, config.tls_cert) == (9000, 8, 3, None)
    assert config.max_receive_message_bytes == 1000
    config = load_config(["--max-concurrent-rpcs", "4", "--grpc-max-calls", "5"], environ={})
    assert config.grpc_call_limit == 5
    for argv, environ in (
        ([], {env_name("port"): "eighty"}),
        (["--max-batch-size", "0"], {}),
        (["--tls-cert", "x.pem"], {}),
        (["--max-texts-per-request", "2000"], {}),
    ):
        with pytest.raises(SystemExit):
            load_config(argv, environ=environ)
    help_text = " ".join(build_parser().format_help().split())
    for name in (
        "TRANSLATOR_PORT",
        "TRANSLATOR_MAX_QUEUE_DELAY_MS",
        "TRANSLATOR_GRACE_PERIOD_S",
        "TRANSLATOR_MAX_RECEIVE_MESSAGE_BYTES",
        "TRANSLATOR_MAX_CONCURRENT_RPCS",
    ):
        assert name in help_text
    assert "(default: 8001; env TRANSLATOR_PORT)" in help_text
    assert "largest gRPC message the server sends" in help_text
    assert "rpcs + 256; env TRANSLATOR_GRPC_MAX_CALLS)" in help_text  # argparse may wrap at hyphens


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        # 1e13 ms overflowed the batcher's timed wait (OverflowError in the worker, retried forever).
        (["--max-queue-delay-ms", "1e13"], {}, "--max-queue-delay-ms must be between 0 and 60000"),
        ([], {"TRANSLATOR_MAX_QUEUE_DELAY_MS": "inf"}, "--max-queue-delay-ms must be between 0 and 60000"),
        (["--grace-period-s", "1e300"], {}, "--grace-period-s must be between 0 and 86400"),
        (["--max-receive-message-bytes", "3000000000"], {}, "--max-receive-message-bytes must be between 1"),
        (["--max-message-bytes", "0"], {}, "--max-message-bytes must be between 1"),
        (["--max-length-limit", "5000"], {}, "--max-length-limit must be between 1 and 1000"),
        (["--max-batch-tokens", "-1"], {}, "--max-batch-tokens must be between 0"),
        (["--threads", "0"], {}, "--threads must be between 1"),
        (["--model-version", "-2"], {}, "--model-version must be between 0"),
        (["--quality-sample-rate", "nan"], {}, "--quality-sample-rate must be between 0 and 1"),
        (["--grpc-max-calls", "8"], {}, "--grpc-max-calls must exceed --max-concurrent-rpcs (256)"),
    ],
)
def test_every_numeric_setting_is_bounded(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_config(argv, environ=environ)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


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

        def logged(message: str) -> dict[str, Any] | None:
            for line in log_path.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("message") == message:
                    return json.loads(line)
            return None

        wait_for(
            lambda: process.poll() is not None or logged("ready") is not None,
            timeout=30,
            message="the server to get ready",
        )
        listening = logged("listening")
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
        assert logged("stopped") is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
