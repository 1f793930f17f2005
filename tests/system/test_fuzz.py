"""Fuzzing ONE real `translator-serve` subprocess (127.0.0.1, the tiny model) through every method.

Hypothesis generates requests (random unicode, control characters, huge and empty strings, out-of-range
options, malformed KServe tensors, shapes and parameters) and raw protobuf bytes, valid, mutated or random,
sent to every method of every service (a generic channel.unary_unary / unary_stream / stream_stream with no
serializers). The contract:

- no answer is INTERNAL or UNKNOWN (nor UNAVAILABLE: the server never goes away); a failing request gets
  INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED; DEADLINE_EXCEEDED only where the request itself set a
  short deadline (KServe's `timeout` parameter), since every call's own deadline is generous;
- over KServe REST (JSON bodies from the same requests, any JSON value, mutated bytes, binary tensors with
  lying lengths, any model path), an answer is 200, 400, 404, 413 or 429 (504 only with a `timeout`
  parameter), never 500, and an error body is `{"error": "..."}`;
- the server keeps serving: a health check and a good translation every CHECK_EVERY calls and at the end, the
  process alive, no ERROR in its log, no INTERNAL/UNKNOWN in its request metrics.

Example counts are bounded (EXAMPLES below, scaled by $FUZZ_EXAMPLES_SCALE for a longer run); the totals are
printed at the end of the run (terminal summary: "fuzz: ...").
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.servers import Setting, Target, metric_value, scrape, spawn_server
from service.api.inference import grpc_service_pb2 as kpb
from service.api.translator.v1 import translator_pb2 as pb
from service.server.kserve import OUTPUT_DATATYPES, PARAMETERS, serialize_bytes
from tests.conftest import WORDS
from tests.support.processes import log_entries

pytestmark = pytest.mark.timeout(600)

SCALE = max(1.0, float(os.environ.get("FUZZ_EXAMPLES_SCALE", "1")))
EXAMPLES = {
    "translate": 250,
    "translate_stream": 150,
    "kserve_infer": 250,
    "kserve_metadata": 150,
    "raw_bytes": 300,
    "rest_infer": 250,
}
CHECK_EVERY = 100  # calls between two liveness checks
CALL_TIMEOUT_S = 30.0  # far above any legitimate answer of the tiny model under these limits
LIMITS = {
    "max_texts_per_request": "8",
    "max_tokens_per_text": "32",
    "max_beam_size": "4",
    "max_length_limit": "48",
    "max_message_bytes": "1000000",
    "max_queue_size": "64",
}
MESSAGE_BYTES = 1_000_000
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)


def _settings(name: str) -> Callable[[Any], Any]:
    return settings(
        max_examples=int(EXAMPLES[name] * SCALE),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------------------------
# The server and the bookkeeping
# ---------------------------------------------------------------------------------------------------------


class Fuzzer:
    """One channel to the fuzzed server; every call goes through `check`, which enforces the contract."""

    def __init__(self, target: Target) -> None:
        self.target = target
        limit = 64 * 1024 * 1024  # the client accepts anything: the server's own limits are what is tested
        self.channel = grpc.insecure_channel(
            target.address,
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
        )
        self.codes: Counter[str] = Counter()
        self.examples: Counter[str] = Counter()
        self.calls = 0

    def unary(
        self, method: str, request: bytes, timeout: float = CALL_TIMEOUT_S
    ) -> tuple[grpc.StatusCode, bytes]:
        call = self.channel.unary_unary(method)
        try:
            return grpc.StatusCode.OK, call(request, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details().encode()

    def stream(
        self, method: str, request: bytes, limit: int | None = None, timeout: float = CALL_TIMEOUT_S
    ) -> tuple[grpc.StatusCode, list[bytes]]:
        """Read the answers (at most `limit`, then cancel: for endless streams such as Health.Watch)."""
        call = self.channel.unary_stream(method)(request, timeout=timeout)
        received: list[bytes] = []
        try:
            for message in call:
                received.append(message)
                if limit is not None and len(received) >= limit:
                    call.cancel()
                    return grpc.StatusCode.OK, received
        except grpc.RpcError as error:
            return error.code(), received
        return grpc.StatusCode.OK, received

    def bidi(self, method: str, requests: list[bytes]) -> tuple[grpc.StatusCode, list[bytes]]:
        call = self.channel.stream_stream(method)(iter(requests), timeout=CALL_TIMEOUT_S)
        try:
            return grpc.StatusCode.OK, list(call)
        except grpc.RpcError as error:
            return error.code(), []

    def check(self, kind: str, code: grpc.StatusCode, allowed: set[grpc.StatusCode], what: object) -> None:
        self.codes[code.name] += 1
        self.examples[kind] += 1
        self.calls += 1
        assert code in allowed, f"{kind}: {code.name} for {str(what)[:600]}"
        if self.calls % CHECK_EVERY == 0:
            self.alive()

    def alive(self) -> None:
        """The process runs, health says SERVING, and a good translation comes back."""
        process = self.target.process
        assert process is not None and process.poll() is None, f"the server exited: {self.log_tail()}"
        code, answer = self.unary(
            "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest().SerializeToString(), 10
        )
        assert code == grpc.StatusCode.OK, (code, answer)
        assert (
            health_pb2.HealthCheckResponse.FromString(answer).status == health_pb2.HealthCheckResponse.SERVING
        )
        request = pb.TranslateRequest(texts=["the big dog sees the cat"]).SerializeToString()
        code, answer = self.unary("/translator.v1.Translator/Translate", request, 10)
        assert code == grpc.StatusCode.OK, (code, answer)
        assert len(pb.TranslateResponse.FromString(answer).translations) == 1

    def log_tail(self) -> str:
        return self.target.log.read_text(errors="replace")[-3000:] if self.target.log else ""


@pytest.fixture(scope="module")
def fuzzer(
    tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Fuzzer]:
    setting = Setting("fuzz", {**LIMITS, "max_queue_delay_ms": "2", "quality_sample_rate": "0.5"})
    extra = {"threads": "1", "max_concurrent_rpcs": "8", "grace_period_s": "2"}
    with spawn_server(
        setting, tiny_repository, "tiny", extra=extra, log_dir=tmp_path_factory.mktemp("fuzz")
    ) as target:
        instance = Fuzzer(target)
        yield instance
        instance.channel.close()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        print(
            f"\nfuzz: {sum(instance.examples.values())} generated calls "
            f"({', '.join(f'{k} {v}' for k, v in sorted(instance.examples.items()))}); "
            f"status codes {dict(sorted(instance.codes.items()))}",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------

sentences = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)
# The vocabulary's special tokens written as words, among ordinary ones.
with_special_tokens = st.lists(
    st.sampled_from([*WORDS[:20], "<pad>", "<s>", "</s>", "<unk>"]), min_size=1, max_size=40
).map(" ".join)
huge = st.builds(
    lambda word, count: (word + " ") * count,
    st.sampled_from(["dog", "é", "\x00", ""]),
    st.integers(0, 300_000),
)
texts = st.one_of(
    sentences,
    with_special_tokens,
    st.text(max_size=60),  # any unicode but surrogates (which protobuf strings cannot hold)
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Co"]), max_size=40),
    st.builds(lambda a, b: a + " " + b, sentences, st.text(max_size=20)),
    st.just(""),
    st.just(" \t\n"),
    huge,
)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def wild_options(draw: st.DrawFn) -> pb.TranslateOptions:
    """Any value of every field: mostly out of range."""
    options = pb.TranslateOptions()
    if draw(st.booleans()):
        options.beam_size = draw(st.one_of(st.integers(-2, 6), INT32))
    if draw(st.booleans()):
        options.max_length = draw(st.one_of(st.integers(-2, 60), INT32))
    if draw(st.booleans()):
        options.length_penalty = draw(st.one_of(st.floats(0, 3, width=32), floats32))
    options.replace_unknowns = draw(st.booleans())
    if draw(st.booleans()):
        options.attention.kinds.extend(draw(st.lists(st.one_of(st.integers(-1, 5), INT32), max_size=4)))
        options.attention.layers.extend(draw(st.lists(st.one_of(st.integers(-1, 3), INT32), max_size=4)))
        options.attention.heads.extend(draw(st.lists(st.one_of(st.integers(-1, 5), INT32), max_size=5)))
    return options


@st.composite
def fair_options(draw: st.DrawFn) -> pb.TranslateOptions:
    """Values within the fuzzed server's limits (2 layers, 4 heads), so the texts reach the engine."""
    options = pb.TranslateOptions(replace_unknowns=draw(st.booleans()))
    if draw(st.booleans()):
        options.beam_size = draw(st.integers(1, 4))
    if draw(st.booleans()):
        options.max_length = draw(st.integers(1, 48))
    if draw(st.booleans()):
        options.length_penalty = draw(st.one_of(st.floats(0, 100, width=32), st.sampled_from([0.0, 100.0])))
    kinds = draw(st.lists(st.sampled_from([pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF]), unique=True))
    options.attention.kinds.extend(kinds)
    if kinds:
        options.attention.layers.extend(draw(st.lists(st.integers(0, 1), unique=True)))
        options.attention.heads.extend(draw(st.lists(st.integers(0, 3), unique=True)))
    return options


translate_options = st.one_of(fair_options(), wild_options())


@st.composite
def infer_parameter(draw: st.DrawFn) -> kpb.InferParameter:
    which = draw(
        st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param", None])
    )
    parameter = kpb.InferParameter()
    values = {
        "bool_param": st.booleans(),
        "int64_param": st.one_of(st.integers(-5, 300), INT64),
        "string_param": st.text(max_size=10),
        "double_param": st.floats(allow_nan=True, allow_infinity=True),
        "uint64_param": st.one_of(st.integers(0, 300), UINT64),
    }
    if which is not None:
        setattr(parameter, which, draw(values[which]))
    return parameter


@st.composite
def fair_infer_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """Well-formed KServe requests within the limits, with fuzzed texts: they reach the engine."""
    elements = [t.encode("utf-8") for t in draw(st.lists(texts, min_size=1, max_size=8))]
    request = kpb.ModelInferRequest(model_name="tiny", model_version=draw(st.sampled_from(["", "1"])))
    shape = [len(elements)] if draw(st.booleans()) else [len(elements), 1]
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=shape)
    if draw(st.booleans()):
        request.raw_input_contents.append(serialize_bytes(elements))
    else:
        tensor.contents.bytes_contents.extend(elements)
    for name in draw(st.lists(st.sampled_from(sorted(OUTPUT_DATATYPES)), unique=True)):
        request.outputs.add(name=name)
    values = {
        "beam_size": st.integers(1, 4).map(lambda v: kpb.InferParameter(int64_param=v)),
        "max_length": st.integers(1, 48).map(lambda v: kpb.InferParameter(int64_param=v)),
        "length_penalty": st.floats(0, 100).map(lambda v: kpb.InferParameter(double_param=v)),
        "replace_unknowns": st.booleans().map(lambda v: kpb.InferParameter(bool_param=v)),
        "timeout": st.integers(1, 10**7).map(lambda v: kpb.InferParameter(int64_param=v)),
        "priority": st.integers(0, 10).map(lambda v: kpb.InferParameter(int64_param=v)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(values)), unique=True)):
        request.parameters[key].CopyFrom(draw(values[key]))
    return request


@st.composite
def wild_infer_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """Any model, tensors, shapes, contents, outputs and parameters: mostly malformed."""
    request = kpb.ModelInferRequest(
        model_name=draw(
            st.one_of(st.just("tiny"), st.sampled_from(["", "other", "TINY"]), st.text(max_size=8))
        ),
        model_version=draw(st.one_of(st.sampled_from(["", "1", "2", "01", "-1"]), st.text(max_size=5))),
        id=draw(st.text(max_size=10)),
    )
    elements = draw(
        st.lists(st.one_of(texts.map(lambda t: t.encode("utf-8")), st.binary(max_size=30)), max_size=10)
    )
    for _ in range(draw(st.integers(0, 2) if draw(st.integers(0, 9)) == 0 else st.just(1))):
        tensor = request.inputs.add(
            name=draw(st.one_of(st.just("TEXT"), st.sampled_from(["text", "", "SRC"]), st.text(max_size=6))),
            datatype=draw(st.one_of(st.just("BYTES"), st.sampled_from(["FP32", "INT32", "", "STRING"]))),
        )
        shape_kind = draw(st.integers(0, 4))
        if shape_kind == 0:
            tensor.shape.extend([len(elements)])
        elif shape_kind == 1:
            tensor.shape.extend([len(elements), 1])
        else:
            tensor.shape.extend(draw(st.lists(st.one_of(st.integers(-2, 12), INT64), max_size=4)))
        form = draw(st.sampled_from(["raw", "typed", "raw_garbage", "other_typed", "none", "both"]))
        if form in ("raw", "both"):
            request.raw_input_contents.append(serialize_bytes(elements))
        if form == "raw_garbage":
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        if form in ("typed", "both"):
            tensor.contents.bytes_contents.extend(elements)
        if form == "other_typed":
            field = draw(
                st.sampled_from(["int_contents", "fp32_contents", "bool_contents", "uint64_contents"])
            )
            values = {
                "int_contents": st.lists(INT32, max_size=4),
                "fp32_contents": st.lists(floats32, max_size=4),
                "bool_contents": st.lists(st.booleans(), max_size=4),
                "uint64_contents": st.lists(UINT64, max_size=4),
            }[field]
            getattr(tensor.contents, field).extend(draw(values))
        for key in draw(st.lists(st.text(max_size=5), max_size=2)):
            tensor.parameters[key].CopyFrom(draw(infer_parameter()))
    for name in draw(
        st.lists(st.one_of(st.sampled_from(sorted(OUTPUT_DATATYPES)), st.text(max_size=8)), max_size=4)
    ):
        output = request.outputs.add(name=name)
        if draw(st.integers(0, 9)) == 0:
            output.parameters["binary_data"].CopyFrom(draw(infer_parameter()))
    keys = st.one_of(st.sampled_from(PARAMETERS), st.text(max_size=8))
    for key in draw(st.lists(keys, max_size=4, unique=True)):
        request.parameters[key].CopyFrom(draw(infer_parameter()))
    return request


infer_requests = st.one_of(fair_infer_requests(), wild_infer_requests())


VALID = {
    "/translator.v1.Translator/Translate": pb.TranslateRequest(texts=["the cat"]),
    "/translator.v1.Translator/TranslateStream": pb.TranslateStreamRequest(
        text="a dog", options=pb.TranslateOptions(max_length=5)
    ),
    "/translator.v1.Translator/GetModelInfo": pb.GetModelInfoRequest(),
    "/inference.GRPCInferenceService/ServerLive": kpb.ServerLiveRequest(),
    "/inference.GRPCInferenceService/ServerReady": kpb.ServerReadyRequest(),
    "/inference.GRPCInferenceService/ModelReady": kpb.ModelReadyRequest(name="tiny"),
    "/inference.GRPCInferenceService/ServerMetadata": kpb.ServerMetadataRequest(),
    "/inference.GRPCInferenceService/ModelMetadata": kpb.ModelMetadataRequest(name="tiny", version="1"),
    "/inference.GRPCInferenceService/ModelConfig": kpb.ModelConfigRequest(name="tiny", version="1"),
    "/inference.GRPCInferenceService/ModelStatistics": kpb.ModelStatisticsRequest(name="tiny"),
    "/inference.GRPCInferenceService/RepositoryIndex": kpb.RepositoryIndexRequest(ready=True),
    "/inference.GRPCInferenceService/ModelInfer": kpb.ModelInferRequest(
        model_name="tiny",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])],
        raw_input_contents=[serialize_bytes([b"the red cat"])],
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in sorted(OUTPUT_DATATYPES)],
    ),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest(service="translator.v1.Translator"),
    "/grpc.health.v1.Health/List": health_pb2.HealthListRequest(),
    "/grpc.health.v1.Health/Watch": health_pb2.HealthCheckRequest(),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="translator.v1.Translator"
    ),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": reflection_pb2.ServerReflectionRequest(
        list_services=""
    ),
}
STREAMING = {"/translator.v1.Translator/TranslateStream", "/grpc.health.v1.Health/Watch"}
BIDI = {m for m in VALID if m.endswith("/ServerReflectionInfo")}


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid message with bytes flipped, inserted, deleted or cut off."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and data:
            del data[position : position + draw(st.integers(1, 4))]
        elif action == "truncate":
            del data[position:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@st.composite
def raw_calls(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(VALID)))
    valid = VALID[method].SerializeToString()
    data = draw(
        st.one_of(
            st.binary(max_size=200),
            mutated(valid),
            st.just(valid),
            st.sampled_from(
                [b"\xff", b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\xc3\x28", b"\x80" * 12]
            ),
        )
    )
    return method, data


# JSON's \\ud800 escapes make strings protobuf cannot hold; integers go past 64 bits.
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | surrogates,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def rest_body(request: kpb.ModelInferRequest) -> dict[str, Any]:
    """The REST (JSON) form of a gRPC infer request, as far as JSON can carry it."""
    tensor = request.inputs[0] if request.inputs else None
    inputs = []
    if tensor is not None:
        elements = list(tensor.contents.bytes_contents)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                       "data": [e.decode("utf-8", "replace") for e in elements]})
    parameters = {}
    for key, value in request.parameters.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            parameters[key] = getattr(value, which)  # NaN and infinities are written as Python's json does
    outputs = [{"name": o.name} for o in request.outputs]
    return {"inputs": inputs, "outputs": outputs, "parameters": parameters}


@st.composite
def rest_calls(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    model = draw(st.one_of(st.just("tiny"), st.sampled_from(["other", "tiny/versions/1", "tiny/versions/9"])))
    valid = json.dumps(rest_body(draw(infer_requests))).encode()
    headers: dict[str, str] = {}
    kind = draw(st.sampled_from(["json", "wild field", "any json", "deep", "mutated", "binary"]))
    if kind == "json":
        body = valid
    elif kind == "wild field":  # one field of a good body replaced by any JSON value
        document = json.loads(valid)
        tensor = document["inputs"][0] if document["inputs"] else {}
        fields = ["id", "parameters", "outputs", "inputs", "name", "shape", "data", "param"]
        where = draw(st.sampled_from(fields))
        value = draw(json_values)
        if where in ("name", "shape", "data"):
            tensor[where] = value
        elif where == "param":
            document["parameters"][draw(st.one_of(st.sampled_from(PARAMETERS), surrogates))] = value
        else:
            document[where] = value
        body = json.dumps(document).encode()
    elif kind == "deep":
        body = b"[" * draw(st.integers(1, 100_000))
    elif kind == "any json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "mutated":
        body = draw(mutated(valid))
    else:  # Triton's binary extension, with honest or lying sizes
        texts_ = [t.encode("utf-8") for t in draw(st.lists(texts, min_size=1, max_size=4))]
        raw = serialize_bytes(texts_)
        size = draw(st.one_of(st.just(len(raw)), st.integers(-5, len(raw) + 10)))
        header = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts_)],
                                         "parameters": {"binary_data_size": size}}],
                             "parameters": {"binary_data_output": draw(st.booleans())}}).encode()
        body = header + raw
        headers["Inference-Header-Content-Length"] = draw(
            # header values travel as latin-1: anything else the HTTP client itself refuses to send
            st.one_of(st.just(str(len(header))), st.integers(-3, len(body) + 5).map(str),
                      st.text(st.characters(max_codepoint=255, exclude_categories=["Cc"]), max_size=4))
        )
    return f"/v2/models/{model}/infer", body, headers


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


def _sent(message: Message) -> bytes:
    return message.SerializeToString()


@_settings("translate")
@given(texts=st.lists(texts, max_size=10), options=translate_options)
def test_fuzz_translate(fuzzer: Fuzzer, texts: list[str], options: pb.TranslateOptions) -> None:
    request = pb.TranslateRequest(texts=texts, options=options)
    code, answer = fuzzer.unary("/translator.v1.Translator/Translate", _sent(request))
    fuzzer.check("translate", code, ALLOWED, (texts[:3], options))
    if code == grpc.StatusCode.OK:
        assert len(pb.TranslateResponse.FromString(answer).translations) == len(texts)


@_settings("translate_stream")
@given(text=texts, options=translate_options)
def test_fuzz_translate_stream(fuzzer: Fuzzer, text: str, options: pb.TranslateOptions) -> None:
    request = pb.TranslateStreamRequest(text=text, options=options)
    code, messages = fuzzer.stream("/translator.v1.Translator/TranslateStream", _sent(request))
    fuzzer.check("translate_stream", code, ALLOWED, (text[:80], options))
    if code == grpc.StatusCode.OK:
        assert pb.TranslateStreamResponse.FromString(messages[-1]).HasField("translation")


@_settings("kserve_infer")
@given(request=infer_requests)
def test_fuzz_kserve_infer(fuzzer: Fuzzer, request: kpb.ModelInferRequest) -> None:
    code, _ = fuzzer.unary("/inference.GRPCInferenceService/ModelInfer", _sent(request))
    allowed = ALLOWED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if "timeout" in request.parameters else set())
    fuzzer.check("kserve_infer", code, allowed, request)


@_settings("kserve_metadata")
@given(
    method=st.sampled_from(["ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics",
                            "RepositoryIndex", "ServerLive", "ServerReady", "ServerMetadata"]),
    name=st.one_of(st.just("tiny"), st.text(max_size=12)),
    version=st.one_of(st.sampled_from(["", "1", "2"]), st.text(max_size=6)),
)
def test_fuzz_kserve_metadata(fuzzer: Fuzzer, method: str, name: str, version: str) -> None:
    message = {
        "ModelReady": kpb.ModelReadyRequest(name=name, version=version),
        "ModelMetadata": kpb.ModelMetadataRequest(name=name, version=version),
        "ModelConfig": kpb.ModelConfigRequest(name=name, version=version),
        "ModelStatistics": kpb.ModelStatisticsRequest(name=name, version=version),
        "RepositoryIndex": kpb.RepositoryIndexRequest(repository_name=name, ready=bool(version)),
        "ServerLive": kpb.ServerLiveRequest(),
        "ServerReady": kpb.ServerReadyRequest(),
        "ServerMetadata": kpb.ServerMetadataRequest(),
    }[method]
    code, _ = fuzzer.unary(f"/inference.GRPCInferenceService/{method}", _sent(message))
    fuzzer.check("kserve_metadata", code, ALLOWED, (method, name, version))


@_settings("raw_bytes")
@given(call=raw_calls())
def test_fuzz_raw_bytes_to_every_method(fuzzer: Fuzzer, call: tuple[str, bytes]) -> None:
    method, data = call
    if method in BIDI:
        code, _ = fuzzer.bidi(method, [data])
        allowed = ALLOWED
    elif method in STREAMING:
        # Health.Watch never ends by itself: read its first answer and hang up.
        code, _ = fuzzer.stream(method, data, limit=1 if method.endswith("/Watch") else None)
        allowed = ALLOWED
    else:
        code, _ = fuzzer.unary(method, data)
        allowed = ALLOWED
    fuzzer.check("raw_bytes", code, allowed, (method, data[:100]))


def test_every_method_is_fuzzed() -> None:
    """VALID covers every method the server registers (so "every method" stays true as the API grows)."""
    from service.api.inference import grpc_service_pb2
    from service.api.translator.v1 import translator_pb2

    served = {
        f"/{service.full_name}/{method.name}"
        for module in (translator_pb2, grpc_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served <= set(VALID), served - set(VALID)


def test_server_still_serves_after_fuzzing(fuzzer: Fuzzer) -> None:
    """Runs last: the server is alive and idle, counted no INTERNAL/UNKNOWN answer and logged no ERROR."""
    fuzzer.alive()
    end = time.monotonic() + 10
    while True:
        samples = scrape(fuzzer.target.metrics)
        assert samples is not None
        idle = (
            metric_value(samples, "translator_inflight_requests") == 0
            and metric_value(samples, "translator_queue_depth_sentences") == 0
        )
        if idle or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert idle, "calls still in flight or sentences still queued after fuzzing"
    for code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE"):
        assert metric_value(samples, "translator_requests_total", code=code) == 0, code
    assert fuzzer.target.log is not None
    entries = log_entries(fuzzer.target.log)
    errors = [entry for entry in entries if entry.get("level") in ("ERROR", "CRITICAL")]
    assert not errors, errors[:3]


@_settings("rest_infer")
@given(call=rest_calls())
def test_fuzz_rest_infer(fuzzer: Fuzzer, call: tuple[str, bytes, dict[str, str]]) -> None:
    path, body, headers = call
    assert fuzzer.target.http is not None
    host, port = fuzzer.target.http.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        # http.client refuses header values with control characters: send what it accepts.
        headers = {k: v for k, v in headers.items() if v.isprintable()}
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        status, data = answer.status, answer.read()
    finally:
        connection.close()
    allowed = {200, 400, 404, 413, 429} | ({504} if b'"timeout"' in body else set())
    fuzzer.codes[f"HTTP {status}"] += 1
    fuzzer.examples["rest_infer"] += 1
    assert status in allowed, f"rest_infer: HTTP {status} {data[:300]!r} for {path} {body[:300]!r}"
    if status != 200:
        assert isinstance(json.loads(data)["error"], str)
