"""The KServe v2 (Triton) API: inference, health, metadata, config, statistics, index, bad tensors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.inference import grpc_service_pb2 as kpb
from service.api.translator.v1 import translator_pb2 as pb
from service.core.options import TranslateOptions
from service.engine.engine import Engine
from service.server.kserve import serialize_bytes
from tests.support.kserve import infer_request, outputs_of
from tests.support.metrics import scrape, value
from tests.support.server import Client, make_config, running
from tests.support.texts import sentences


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
