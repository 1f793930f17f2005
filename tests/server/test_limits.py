"""What the server refuses: bad and malformed requests, oversized requests and answers, full queues."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from service.api.translator.v1 import translator_pb2 as pb
from service.server.app import TranslatorServer
from tests.conftest import WORDS
from tests.support.kserve import infer_request
from tests.support.metrics import scrape, value
from tests.support.server import Client, make_config, running, slow_config, slow_engine
from tests.support.texts import sentences
from tests.support.waiting import wait_for

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
