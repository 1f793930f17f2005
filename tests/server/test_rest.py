"""KServe v2 over HTTP/REST against an in-process server (the tiny model): the same answers as over gRPC,
JSON and binary tensors, errors as {"error"} with their HTTP status, bearer tokens."""

from __future__ import annotations

import json
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api.translator.v1 import translator_pb2 as pb
from service.server.app import TranslatorServer
from service.server.kserve import serialize_bytes
from tests.support.metrics import scrape, value
from tests.support.server import HOST, Client, make_config, running, slow_config, slow_engine
from tests.support.waiting import wait_for

TEXTS = ["the big dog sees her", "a cat", "the red house with a small dog"]


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        length = self.headers.get("Inference-Header-Content-Length")
        return json.loads(self.body[: int(length)] if length else self.body)


def call(port: int, method: str, path: str, body: bytes | dict | None = None, **headers: str) -> Answer:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return Answer(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.headers, error.read())


def text_input(texts: list[str], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": "TEXT", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}


@pytest.fixture(scope="module")
def rest(server: TranslatorServer) -> int:
    assert server.http_port
    return server.http_port


def test_rest_health_and_metadata(rest: int) -> None:
    assert call(rest, "GET", "/v2/health/live").status == 200
    assert call(rest, "GET", "/v2/health/ready").status == 200
    assert call(rest, "GET", "/v2/models/tiny/ready").status == 200
    assert call(rest, "GET", "/v2/models/tiny/versions/1/ready").status == 200
    assert call(rest, "GET", "/v2").json()["name"] == "translator"
    metadata = call(rest, "GET", "/v2/models/tiny").json()
    assert (metadata["name"], metadata["versions"]) == ("tiny", ["1"])
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in metadata["outputs"]][:2] == ["TRANSLATION", "CROSS_ATTENTION"]
    assert call(rest, "GET", "/v2/models/tiny/versions/1").json() == metadata
    unknown = call(rest, "GET", "/v2/models/other/ready")
    assert unknown.status == 404 and "'other'" in unknown.json()["error"]
    assert call(rest, "GET", "/v2/models/tiny/versions/2").status == 404


def test_rest_infer_json_matches_grpc(rest: int, client: Client) -> None:
    body = {
        "id": "rest-1",
        "inputs": [text_input(TEXTS)],
        "parameters": {"beam_size": 2, "max_length": 8, "length_penalty": 0.5},
        "outputs": [{"name": n} for n in ("TRANSLATION", "CROSS_ATTENTION", "TARGET_LENGTH")],
    }
    answer = call(rest, "POST", "/v2/models/tiny/infer", body)
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
    document = answer.json()
    assert (document["model_name"], document["model_version"], document["id"]) == ("tiny", "1", "rest-1")
    out = {o["name"]: o for o in document["outputs"]}
    options = pb.TranslateOptions(
        beam_size=2, max_length=8, length_penalty=0.5, attention=pb.AttentionRequest(kinds=[pb.CROSS])
    )
    expected = client.translator.Translate(pb.TranslateRequest(texts=TEXTS, options=options)).translations
    assert out["TRANSLATION"]["data"] == [t.text for t in expected]
    # What the model was not trained for, per text (JSON lists in the output's parameters, as over gRPC).
    unknown = json.loads(out["TRANSLATION"]["parameters"]["unknown_words"])
    assert unknown == [list(t.unknown_words) for t in expected]
    assert out["TARGET_LENGTH"]["data"] == [len(t.target_tokens) for t in expected]
    maps = out["CROSS_ATTENTION"]
    cross = np.array(maps["data"], dtype=np.float32).reshape(maps["shape"])
    first = expected[0]
    steps, width = len(first.target_tokens), len(first.source_tokens)
    weights = np.array(first.attention[0].weights.data).reshape(2, 4, steps, width)
    np.testing.assert_allclose(cross[0, :, :, :steps, :width], weights, atol=1e-6)


def test_rest_binary_tensors_both_ways(rest: int) -> None:
    """Triton's binary extension: the JSON header, then each binary tensor's bytes, in order."""
    raw = serialize_bytes([t.encode() for t in TEXTS])
    header = json.dumps(
        {
            "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3, 1],
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "TRANSLATION", "parameters": {"binary_data": True}},
                        {"name": "TARGET_LENGTH", "parameters": {"binary_data": False}}],
        }
    ).encode()  # fmt: skip
    length = {"Inference-Header-Content-Length": str(len(header))}
    answer = call(rest, "POST", "/v2/models/tiny/infer", header + raw, **length)
    assert answer.status == 200, answer.body
    document = answer.json()
    translation, lengths = document["outputs"]
    assert translation["shape"] == [3, 1] and "data" not in translation
    size = translation["parameters"]["binary_data_size"]
    start = int(answer.headers["Inference-Header-Content-Length"])
    tail = answer.body[start:]
    assert len(tail) == size
    texts, offset = [], 0
    while offset < len(tail):
        (length,) = struct.unpack_from("<I", tail, offset)
        texts.append(tail[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    json_answer = call(rest, "POST", "/v2/models/tiny/infer", {"inputs": [text_input(TEXTS)]}).json()
    assert texts == json_answer["outputs"][0]["data"]
    assert len(lengths["data"]) == 3
    # binary_data_output: every output binary.
    body = {"inputs": [text_input(TEXTS)], "parameters": {"binary_data_output": True}}
    answer = call(rest, "POST", "/v2/models/tiny/infer", body)
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.json()["outputs"][0]["parameters"]["binary_data_size"] == size


def _bad() -> list[tuple[str, str, str, bytes | dict, int, str]]:
    infer = "/v2/models/tiny/infer"
    one = {"inputs": [text_input(["a"])]}
    return [
        ("not json", "POST", infer, b"{bad", 400, "not valid JSON"),
        ("not an object", "POST", infer, b"[1, 2]", 400, "the request body must be a JSON object"),
        ("no inputs", "POST", infer, {"inputs": []}, 400, "inputs must be a non-empty list"),
        ("shape vs data", "POST", infer, {"inputs": [text_input(["a cat"], [2])]}, 400,
         "shape [2] (2 elements) but 1 elements"),
        ("numbers as text", "POST", infer, {"inputs": [{**text_input([]), "shape": [1], "data": [3]}]}, 400,
         "BYTES data must be strings"),
        ("bad shape type", "POST", infer, {"inputs": [{**text_input(["a"]), "shape": "1"}]}, 400,
         "shape must be a list of integers"),
        ("empty text", "POST", infer, {"inputs": [text_input([""])]}, 400, "the text is empty"),
        ("unknown parameter", "POST", infer, {**one, "parameters": {"temperature": 1}}, 400,
         "unknown parameter 'temperature'"),
        ("beam too big", "POST", infer, {**one, "parameters": {"beam_size": 99}}, 400,
         "max_beam_size=4, got 99"),
        ("unknown output", "POST", infer, {**one, "outputs": [{"name": "LOGITS"}]}, 400,
         "unknown output 'LOGITS'"),
        ("outputs not a list", "POST", infer, {**one, "outputs": {"name": "X"}}, 400,
         "outputs must be a list"),
        ("binary size past the body", "POST", infer,
         {"inputs": [{**text_input([]), "shape": [1], "parameters": {"binary_data_size": 40}}]}, 400,
         "does not fit the 0 binary bytes left"),
        ("unknown model", "POST", "/v2/models/nope/infer", {"inputs": [text_input(["a"])]}, 404,
         "unknown model 'nope'"),
        ("unknown route", "GET", "/v3/anything", b"", 404, "no route GET /v3/anything"),
        ("wrong method", "GET", infer, b"", 405, "GET is not allowed"),
        ("too large", "POST", infer, b"x" * 200_000, 413, "exceeds --max-receive-message-bytes=100000"),
    ]  # fmt: skip


@pytest.mark.parametrize("name, method, path, body, status, needle", _bad(), ids=[c[0] for c in _bad()])
def test_rest_bad_requests(
    rest: int, name: str, method: str, path: str, body: Any, status: int, needle: str
) -> None:
    answer = call(rest, method, path, body or None)
    assert answer.status == status, answer.body
    assert needle in answer.json()["error"]


def test_rest_calls_are_counted_like_grpc_calls(rest: int, server: TranslatorServer) -> None:
    assert server.metrics_port
    before = scrape(server.metrics_port)
    assert call(rest, "POST", "/v2/models/tiny/infer", {"inputs": [text_input(["a cat"])]}).status == 200
    assert call(rest, "POST", "/v2/models/tiny/infer", {"inputs": [text_input([""])]}).status == 400
    after = scrape(server.metrics_port)
    for code in ("OK", "INVALID_ARGUMENT"):
        name, labels = "translator_requests_total", {"method": "ModelInfer", "code": code}
        assert value(after, name, **labels) == value(before, name, **labels) + 1


@pytest.fixture(scope="module")
def guarded(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TranslatorServer]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("first-token\n")
    with running(make_config(tiny_repository, auth_tokens_file=tokens)) as instance:
        yield instance


def test_rest_needs_a_bearer_token_except_for_probes(guarded: TranslatorServer) -> None:
    port = guarded.http_port
    assert port
    body = {"inputs": [text_input(["a cat"])]}
    refused = call(port, "POST", "/v2/models/tiny/infer", body)
    assert refused.status == 401 and "bearer token" in refused.json()["error"]
    assert call(port, "POST", "/v2/models/tiny/infer", body, Authorization="Bearer wrong").status == 401
    assert call(port, "GET", "/v2/models/tiny", Authorization="Bearer wrong").status == 401
    assert call(port, "POST", "/v2/models/tiny/infer", body, Authorization="Bearer first-token").status == 200
    for probe in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready"):
        assert call(port, "GET", probe).status == 200


def test_rest_inputs_found_by_review(rest: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4,301-digit integer, a boolean binary_data_size, a body that never arrives, a JSON answer past
    --max-message-bytes: each a 4xx naming it, never a 500."""
    from service.server import kserve_rest

    infer = "/v2/models/tiny/infer"
    answer = call(rest, "POST", infer, b'{"id": ' + b"1" * 4301 + b"}")
    assert answer.status == 400 and "not valid JSON" in answer.json()["error"]
    body = {"inputs": [{**text_input([]), "shape": [1], "parameters": {"binary_data_size": True}}]}
    answer = call(rest, "POST", infer, body)
    assert answer.status == 400 and "binary_data_size True" in answer.json()["error"]
    monkeypatch.setattr(kserve_rest, "BODY_TIMEOUT_S", 0.5)
    with socket.create_connection((HOST, rest), timeout=10) as sock:
        sock.sendall(b"POST " + infer.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in head


def test_rest_json_answers_are_bounded_by_max_message_bytes() -> None:
    """100,000 FP32 numbers are 400 kB raw but ~2 MB as JSON text: refused past the limit, naming the cure."""
    from service.api.inference import grpc_service_pb2 as kpb
    from service.scheduler.status import RequestFailed
    from service.server.kserve_rest import infer_response

    response = kpb.ModelInferResponse(model_name="tiny", model_version="1")
    response.outputs.add(name="CROSS_ATTENTION", datatype="FP32", shape=[100_000])
    response.raw_output_contents.append(np.random.default_rng(0).random(100_000, dtype=np.float32).tobytes())
    assert infer_response(response, {"CROSS_ATTENTION"}, 500_000).status == 200  # binary: 400 kB fits
    with pytest.raises(RequestFailed) as refused:
        infer_response(response, set(), 500_000)
    assert refused.value.code.name == "RESOURCE_EXHAUSTED"
    message = refused.value.message
    assert "more than max_message_bytes=500000" in message and "binary_data" in message


def test_rest_a_header_of_other_bytes_is_refused_not_a_crash(guarded: TranslatorServer) -> None:
    port = guarded.http_port
    assert port
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /v2/models/tiny HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 401"), head[:200]


def test_rest_a_client_that_does_not_read_its_answer_is_dropped(tiny_repository: Path) -> None:
    """An answer of ~17 MB that the client never reads: past --write-timeout-s its connection is dropped and
    counted; the server serves others meanwhile."""
    config = slow_config(tiny_repository, write_timeout_s=0.5, max_message_bytes=40_000_000,
                         max_tokens_per_text=64, max_texts_per_request=32)  # fmt: skip
    engine, backend = slow_engine(tiny_repository)
    backend.step_s = 0.0  # "</s>" forbidden: every text decodes its 256 steps
    with running(config, engine) as server:
        port = server.http_port
        assert port and server.metrics_port
        texts = [" ".join(["the small red cat"] * 16)] * 32
        parameters = {"max_length": 256, "binary_data_output": True}
        body = json.dumps({"inputs": [text_input(texts)], "parameters": parameters,
                           "outputs": [{"name": "CROSS_ATTENTION"}]}).encode()  # fmt: skip
        sock = socket.create_connection((HOST, port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
            name, labels = "translator_unread_answers_total", {"method": "REST", "reason": "slow_reader"}
            wait_for(lambda: value(scrape(server.metrics_port), name, **labels) == 1, timeout=60,
                     message="the stalled connection to be dropped")  # fmt: skip
            assert call(port, "GET", "/v2/health/ready").status == 200
        finally:
            sock.close()


def test_rest_while_draining_answers_503(tiny_repository: Path) -> None:
    """From SIGTERM on (draining), REST readiness and inference answer 503, as gRPC answers UNAVAILABLE."""
    with running(make_config(tiny_repository)) as server:
        port = server.http_port
        assert port
        body = {"inputs": [text_input(["a cat"])]}
        assert call(port, "POST", "/v2/models/tiny/infer", body).status == 200
        server.runtime.begin_draining()
        assert call(port, "GET", "/v2/health/ready").status == 503
        assert call(port, "GET", "/v2/health/live").status == 200
        answer = call(port, "POST", "/v2/models/tiny/infer", body)
        assert answer.status == 503 and "shutting down" in answer.json()["error"]
