"""The gRPC API definitions: generated code in step with proto/, the KServe v2 wire format, service shapes."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.api import generate
from service.api.inference import grpc_service_pb2 as kserve
from service.api.inference import grpc_service_pb2_grpc as kserve_grpc
from service.api.translator.v1 import translator_pb2 as tr
from service.api.translator.v1 import translator_pb2_grpc as tr_grpc
from tests.conftest import ROOT

API_DIR = ROOT / "service" / "api"
PROTO_ROOT = ROOT / "proto"
HOW_TO_FIX = "regenerate with `python -m service.api.generate` (from the repository root) and commit it"


# ---------------------------------------------------------------------------------------------------------
# Generated code is up to date
# ---------------------------------------------------------------------------------------------------------


def _generator_version_of_checked_in_code() -> str:
    text = (API_DIR / "translator" / "v1" / "translator_pb2_grpc.py").read_text()
    match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.MULTILINE)
    assert match, "translator_pb2_grpc.py lacks GRPC_GENERATED_VERSION: " + HOW_TO_FIX
    return match.group(1)


def _generated_tree(folder: Path) -> dict[str, bytes]:
    """Files of a generated tree: the generated modules and the sub-package __init__ files."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and (path.name.endswith(generate.GENERATED_SUFFIXES)
                               or (path.name == "__init__.py" and path.parent != folder))
    }


def test_checked_in_code_is_exactly_what_the_generator_writes(tmp_path: Path) -> None:
    installed = importlib.metadata.version("grpcio-tools")
    recorded = _generator_version_of_checked_in_code()
    if installed != recorded:
        pytest.skip(f"service/api was generated with grpcio-tools {recorded}, {installed} is installed: "
                    "byte-for-byte comparison only makes sense with the same version "
                    "(test_checked_in_descriptors_match_the_proto_files still checks the content)")
    result = subprocess.run([sys.executable, "-m", "service.api.generate", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the generator failed:\n{result.stdout}\n{result.stderr}"

    expected = _generated_tree(tmp_path)
    actual = _generated_tree(API_DIR)
    assert expected, "the generator wrote nothing"
    problems = [f"missing: service/api/{name}" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"no longer generated: service/api/{name}"
                 for name in sorted(actual.keys() - expected.keys())]
    problems += [f"outdated: service/api/{name}" for name in sorted(expected.keys() & actual.keys())
                 if expected[name] != actual[name]]
    assert not problems, "service/api is stale:\n  " + "\n  ".join(problems) + "\n" + HOW_TO_FIX


def test_generation_is_reproducible() -> None:
    first = generate.generate_files()
    second = generate.generate_files()
    assert first == second
    expected = {"translator/v1/translator_pb2.py", "translator/v1/translator_pb2.pyi",
                "translator/v1/translator_pb2_grpc.py", "translator/__init__.py", "translator/v1/__init__.py",
                "inference/grpc_service_pb2.py", "inference/grpc_service_pb2.pyi",
                "inference/grpc_service_pb2_grpc.py", "inference/__init__.py"}
    assert expected <= first.keys()


def _strip_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def test_checked_in_descriptors_match_the_proto_files(tmp_path: Path) -> None:
    """Independent of the grpcio-tools version: the schema embedded in service/api is that of proto/."""
    from grpc_tools import protoc

    protos = generate.find_protos(PROTO_ROOT)
    out = tmp_path / "descriptors.pb"
    status = protoc.main(["protoc", f"--proto_path={PROTO_ROOT}", f"--descriptor_set_out={out}",
                          *(str(PROTO_ROOT / proto) for proto in protos)])
    assert status == 0
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    compiled = {file.name: file for file in descriptor_set.file}
    assert sorted(compiled) == protos

    for name, expected in compiled.items():
        module_name = "service.api." + name.removesuffix(".proto").replace("/", ".") + "_pb2"
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            pytest.fail(f"{module_name} does not import ({error}): {HOW_TO_FIX}")
        embedded = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        _strip_json_names(expected.message_type)
        _strip_json_names(embedded.message_type)
        assert embedded == expected, f"{module_name} does not match proto/{name}: {HOW_TO_FIX}"


def test_generated_code_imports_only_through_the_package() -> None:
    bare = re.compile(r"^\s*(from|import)\s+(translator|inference)\b", re.MULTILINE)
    for path in sorted(API_DIR.rglob("*")):
        if path.is_file() and path.name.endswith(generate.GENERATED_SUFFIXES):
            assert not bare.search(path.read_text()), f"{path} imports a top-level package: {HOW_TO_FIX}"
    assert tr.TranslateRequest.__module__ == "service.api.translator.v1.translator_pb2"
    assert kserve.ModelInferRequest.__module__ == "service.api.inference.grpc_service_pb2"


def test_check_mode_and_stale_file_removal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0

    stale = tmp_path / "inference" / "old_service_pb2.py"
    stale.write_text("# from a deleted .proto\n")
    edited = tmp_path / "translator" / "v1" / "translator_pb2.py"
    edited.write_bytes(edited.read_bytes() + b"# edited by hand\n")
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1
    report = capsys.readouterr().err
    assert "outdated: translator/v1/translator_pb2.py" in report
    assert "no longer generated: inference/old_service_pb2.py" in report
    assert "python -m service.api.generate" in report

    assert generate.main(["--out", str(tmp_path)]) == 0
    assert not stale.exists()
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0


def test_import_rewriting() -> None:
    own = {"translator.v1.translator_pb2", "translator.v1.translator_pb2_grpc", "top_pb2"}
    source = "\n".join([
        "from translator.v1 import translator_pb2 as translator_dot_v1_dot_translator__pb2",
        "import top_pb2 as top__pb2",
        "from google.protobuf import descriptor as _descriptor",
        "from other.v1 import other_pb2 as other__pb2",
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'translator.v1.translator_pb2', _globals)",
    ])
    assert generate.rewrite_module_paths(source, own).split("\n") == [
        "from service.api.translator.v1 import translator_pb2 as translator_dot_v1_dot_translator__pb2",
        "from service.api import top_pb2 as top__pb2",
        "from google.protobuf import descriptor as _descriptor",
        "from other.v1 import other_pb2 as other__pb2",
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'service.api.translator.v1.translator_pb2',"
        " _globals)",
    ]


# ---------------------------------------------------------------------------------------------------------
# Field layouts
# ---------------------------------------------------------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "bytes",
}


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED  # protobuf before `is_repeated` existed


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return field.message_type.full_name
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.full_name
    return _SCALARS[field.type]


def _describe(field: FieldDescriptor) -> str:
    """The field's wire-relevant type as .proto text: 'int64', 'repeated bytes', 'map<string, x.Y>'."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return f"map<{_type_name(key)}, {_type_name(value)}>"
    text = _type_name(field)
    if _is_repeated(field):
        return "repeated " + text
    if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
        return f"oneof {field.containing_oneof.name} {text}"
    if field.has_presence and field.type != FieldDescriptor.TYPE_MESSAGE:
        return "optional " + text
    return text


def _layout(message: Descriptor) -> dict[str, tuple[int, str]]:
    return {field.name: (field.number, _describe(field)) for field in message.fields}


PARAMETERS = "map<string, inference.InferParameter>"

# The KServe v2 / Open Inference Protocol messages, as published by KServe (grpc_predict_v2.proto) and
# Triton (grpc_service.proto, which adds double_param and uint64_param to InferParameter).
KSERVE_LAYOUT: dict[str, dict[str, tuple[int, str]]] = {
    "ServerLiveRequest": {},
    "ServerLiveResponse": {"live": (1, "bool")},
    "ServerReadyRequest": {},
    "ServerReadyResponse": {"ready": (1, "bool")},
    "ModelReadyRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelReadyResponse": {"ready": (1, "bool")},
    "ServerMetadataRequest": {},
    "ServerMetadataResponse": {"name": (1, "string"), "version": (2, "string"),
                               "extensions": (3, "repeated string")},
    "ModelMetadataRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelMetadataResponse": {
        "name": (1, "string"),
        "versions": (2, "repeated string"),
        "platform": (3, "string"),
        "inputs": (4, "repeated inference.ModelMetadataResponse.TensorMetadata"),
        "outputs": (5, "repeated inference.ModelMetadataResponse.TensorMetadata"),
    },
    "ModelMetadataResponse.TensorMetadata": {"name": (1, "string"), "datatype": (2, "string"),
                                             "shape": (3, "repeated int64")},
    "InferParameter": {
        "bool_param": (1, "oneof parameter_choice bool"),
        "int64_param": (2, "oneof parameter_choice int64"),
        "string_param": (3, "oneof parameter_choice string"),
        "double_param": (4, "oneof parameter_choice double"),
        "uint64_param": (5, "oneof parameter_choice uint64"),
    },
    "InferTensorContents": {
        "bool_contents": (1, "repeated bool"),
        "int_contents": (2, "repeated int32"),
        "int64_contents": (3, "repeated int64"),
        "uint_contents": (4, "repeated uint32"),
        "uint64_contents": (5, "repeated uint64"),
        "fp32_contents": (6, "repeated float"),
        "fp64_contents": (7, "repeated double"),
        "bytes_contents": (8, "repeated bytes"),
    },
    "ModelInferRequest": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "id": (3, "string"),
        "parameters": (4, PARAMETERS),
        "inputs": (5, "repeated inference.ModelInferRequest.InferInputTensor"),
        "outputs": (6, "repeated inference.ModelInferRequest.InferRequestedOutputTensor"),
        "raw_input_contents": (7, "repeated bytes"),
    },
    "ModelInferRequest.InferInputTensor": {
        "name": (1, "string"),
        "datatype": (2, "string"),
        "shape": (3, "repeated int64"),
        "parameters": (4, PARAMETERS),
        "contents": (5, "inference.InferTensorContents"),
    },
    "ModelInferRequest.InferRequestedOutputTensor": {"name": (1, "string"), "parameters": (2, PARAMETERS)},
    "ModelInferResponse": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "id": (3, "string"),
        "parameters": (4, PARAMETERS),
        "outputs": (5, "repeated inference.ModelInferResponse.InferOutputTensor"),
        "raw_output_contents": (6, "repeated bytes"),
    },
    "ModelInferResponse.InferOutputTensor": {
        "name": (1, "string"),
        "datatype": (2, "string"),
        "shape": (3, "repeated int64"),
        "parameters": (4, PARAMETERS),
        "contents": (5, "inference.InferTensorContents"),
    },
    # Triton's extensions (grpc_service.proto, and the subset of model_config.proto's messages served),
    # numbered as Triton numbers them.
    "ModelConfigRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelConfigResponse": {"config": (1, "inference.ModelConfig")},
    "ModelConfig": {
        "name": (1, "string"),
        "platform": (2, "string"),
        "backend": (17, "string"),
        "max_batch_size": (4, "int32"),
        "input": (5, "repeated inference.ModelInput"),
        "output": (6, "repeated inference.ModelOutput"),
        "dynamic_batching": (11, "inference.ModelDynamicBatching"),
        "parameters": (14, "map<string, inference.ModelParameter>"),
    },
    "ModelInput": {"name": (1, "string"), "data_type": (2, "inference.DataType"),
                   "dims": (4, "repeated int64"), "optional": (8, "bool")},
    "ModelOutput": {"name": (1, "string"), "data_type": (2, "inference.DataType"),
                    "dims": (3, "repeated int64")},
    "ModelDynamicBatching": {"preferred_batch_size": (1, "repeated int32"),
                             "max_queue_delay_microseconds": (2, "uint64"), "preserve_ordering": (3, "bool")},
    "ModelParameter": {"string_value": (1, "string")},
    "ModelStatisticsRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelStatisticsResponse": {"model_stats": (1, "repeated inference.ModelStatistics")},
    "ModelStatistics": {
        "name": (1, "string"),
        "version": (2, "string"),
        "last_inference": (3, "uint64"),
        "inference_count": (4, "uint64"),
        "execution_count": (5, "uint64"),
        "inference_stats": (6, "inference.InferStatistics"),
    },
    "InferStatistics": {
        name: (number, "inference.StatisticDuration")
        for number, name in enumerate(
            ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"), start=1
        )
    },
    "StatisticDuration": {"count": (1, "uint64"), "ns": (2, "uint64")},
    "RepositoryIndexRequest": {"repository_name": (1, "string"), "ready": (2, "bool")},
    "RepositoryIndexResponse": {"models": (1, "repeated inference.RepositoryIndexResponse.ModelIndex")},
    "RepositoryIndexResponse.ModelIndex": {"name": (1, "string"), "version": (2, "string"),
                                           "state": (3, "string"), "reason": (4, "string")},
}

# model_config.proto's DataType, as Triton numbers it.
TRITON_DATATYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                    "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
                    "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]


def _message(module, dotted: str) -> Descriptor:
    descriptor = module.DESCRIPTOR.message_types_by_name[dotted.split(".")[0]]
    for part in dotted.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[part]
    return descriptor


def _all_messages(module) -> set[str]:
    names = set()

    def visit(descriptor: Descriptor, prefix: str) -> None:
        if descriptor.GetOptions().map_entry:
            return
        names.add(prefix + descriptor.name)
        for nested in descriptor.nested_types:
            visit(nested, prefix + descriptor.name + ".")

    for descriptor in module.DESCRIPTOR.message_types_by_name.values():
        visit(descriptor, "")
    return names


def test_kserve_package_and_message_set() -> None:
    assert kserve.DESCRIPTOR.package == "inference"
    assert _all_messages(kserve) == set(KSERVE_LAYOUT)
    assert set(kserve.DESCRIPTOR.enum_types_by_name) == {"DataType"}
    assert [(v.name, v.number) for v in kserve.DataType.DESCRIPTOR.values] == [
        (name, number) for number, name in enumerate(TRITON_DATATYPES)
    ]


@pytest.mark.parametrize("message", sorted(KSERVE_LAYOUT))
def test_kserve_field_names_numbers_and_types(message: str) -> None:
    assert _layout(_message(kserve, message)) == KSERVE_LAYOUT[message]


def test_kserve_key_field_numbers_spelled_out() -> None:
    """The numbers clients depend on most, read straight off the generated classes."""
    request = kserve.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert [request[name].number for name in ("model_name", "model_version", "id", "parameters", "inputs",
                                              "outputs", "raw_input_contents")] == [1, 2, 3, 4, 5, 6, 7]
    tensor = kserve.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name
    assert [tensor[name].number for name in ("name", "datatype", "shape", "parameters", "contents")] == [
        1, 2, 3, 4, 5]
    requested = kserve.ModelInferRequest.InferRequestedOutputTensor.DESCRIPTOR.fields_by_name
    assert [requested["name"].number, requested["parameters"].number] == [1, 2]
    response = kserve.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert [response[name].number for name in ("model_name", "model_version", "id", "parameters", "outputs",
                                               "raw_output_contents")] == [1, 2, 3, 4, 5, 6]
    output = kserve.ModelInferResponse.InferOutputTensor.DESCRIPTOR.fields_by_name
    assert [output[name].number for name in ("name", "datatype", "shape", "parameters", "contents")] == [
        1, 2, 3, 4, 5]
    parameter = kserve.InferParameter.DESCRIPTOR
    assert [parameter.fields_by_name[name].number for name in (
        "bool_param", "int64_param", "string_param", "double_param", "uint64_param")] == [1, 2, 3, 4, 5]
    assert [field.name for field in parameter.oneofs_by_name["parameter_choice"].fields] == [
        "bool_param", "int64_param", "string_param", "double_param", "uint64_param"]
    contents = kserve.InferTensorContents.DESCRIPTOR.fields_by_name
    assert [contents[name].number for name in (
        "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
        "fp32_contents", "fp64_contents", "bytes_contents")] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_kserve_wire_bytes_are_the_protocol_encoding() -> None:
    """A ModelInferRequest encodes to the bytes the protocol's field numbers and wire types dictate."""
    request = kserve.ModelInferRequest(model_name="m", id="7")
    request.parameters["p"].int64_param = 5
    tensor = request.inputs.add(name="x", datatype="INT64", shape=[2])
    tensor.contents.int64_contents.extend([3, 4])
    request.raw_input_contents.append(b"\x01")

    def tag(number: int, wire_type: int) -> bytes:
        return bytes([number << 3 | wire_type])

    def delimited(number: int, payload: bytes) -> bytes:
        return tag(number, 2) + bytes([len(payload)]) + payload

    parameter = tag(2, 0) + bytes([5])  # InferParameter.int64_param = 2 (varint)
    entry = delimited(1, b"p") + delimited(2, parameter)  # map entry: key = 1, value = 2
    contents = delimited(3, bytes([3, 4]))  # InferTensorContents.int64_contents = 3 (packed)
    input_tensor = (delimited(1, b"x") + delimited(2, b"INT64") + delimited(3, bytes([2]))  # shape, packed
                    + delimited(5, contents))
    expected = (delimited(1, b"m") + delimited(3, b"7") + delimited(4, entry) + delimited(5, input_tensor)
                + delimited(7, b"\x01"))
    assert request.SerializeToString(deterministic=True) == expected
    assert kserve.ModelInferRequest.FromString(expected) == request


# ---------------------------------------------------------------------------------------------------------
# translator.v1 layout (locked: renumbering a field breaks deployed clients)
# ---------------------------------------------------------------------------------------------------------

TRANSLATOR_LAYOUT: dict[str, dict[str, tuple[int, str]]] = {
    "TranslateRequest": {"texts": (1, "repeated string"), "options": (2, "translator.v1.TranslateOptions")},
    "TranslateOptions": {
        "beam_size": (1, "optional int32"),
        "max_length": (2, "optional int32"),
        "length_penalty": (3, "optional float"),
        "replace_unknowns": (4, "bool"),
        "attention": (5, "translator.v1.AttentionRequest"),
    },
    "AttentionRequest": {"kinds": (1, "repeated translator.v1.AttentionKind"),
                         "layers": (2, "repeated int32"), "heads": (3, "repeated int32")},
    "TranslateStreamRequest": {"text": (1, "string"), "options": (2, "translator.v1.TranslateOptions")},
    "GetModelInfoRequest": {},
    "TranslateResponse": {"translations": (1, "repeated translator.v1.Translation")},
    "Translation": {
        "text": (1, "string"),
        "source_tokens": (2, "repeated string"),
        "target_tokens": (3, "repeated string"),
        "score": (4, "float"),
        "log_prob": (5, "float"),
        "unknown_words": (6, "repeated string"),
        "attention": (7, "repeated translator.v1.AttentionMap"),
        "timings": (8, "translator.v1.Timings"),
        "longer_than_training": (9, "bool"),
    },
    "AttentionMap": {
        "kind": (1, "translator.v1.AttentionKind"),
        "layers": (2, "repeated int32"),
        "heads": (3, "repeated int32"),
        "weights": (4, "translator.v1.Tensor"),
        "row_tokens": (5, "repeated string"),
        "column_tokens": (6, "repeated string"),
    },
    "Tensor": {"shape": (1, "repeated int64"), "data": (2, "repeated float")},
    "Timings": {"queue_ms": (1, "double"), "compute_ms": (2, "double"), "total_ms": (3, "double")},
    "TranslateStreamResponse": {"token": (1, "oneof event translator.v1.TokenEvent"),
                                "translation": (2, "oneof event translator.v1.Translation")},
    "TokenEvent": {"index": (1, "int32"), "token_id": (2, "int32"), "token": (3, "string")},
    "ModelInfo": {
        "name": (1, "string"),
        "version": (2, "string"),
        "architecture": (3, "translator.v1.Architecture"),
        "source_vocab_size": (4, "int32"),
        "target_vocab_size": (5, "int32"),
        "execution_provider": (6, "string"),
        "batching": (7, "translator.v1.BatchingSettings"),
        "limits": (8, "translator.v1.Limits"),
        "training_metrics": (9, "map<string, double>"),
        "precision": (10, "string"),
    },
    "Architecture": {"d_model": (1, "int32"), "n_heads": (2, "int32"), "n_encoder_layers": (3, "int32"),
                     "n_decoder_layers": (4, "int32"), "d_ff": (5, "int32")},
    "BatchingSettings": {"max_batch_size": (1, "int32"), "max_batch_tokens": (2, "int32"),
                         "max_queue_delay_ms": (3, "double"), "max_queue_size": (4, "int32")},
    "Limits": {"max_texts_per_request": (1, "int32"), "max_tokens_per_text": (2, "int32"),
               "max_beam_size": (3, "int32"), "max_length": (4, "int32")},
}


def test_translator_package_and_message_set() -> None:
    assert tr.DESCRIPTOR.package == "translator.v1"
    assert _all_messages(tr) == set(TRANSLATOR_LAYOUT)
    kinds = tr.DESCRIPTOR.enum_types_by_name["AttentionKind"]
    assert {value.name: value.number for value in kinds.values} == {
        "ATTENTION_KIND_UNSPECIFIED": 0, "CROSS": 1, "DECODER_SELF": 2, "ENCODER_SELF": 3}
    assert set(tr.DESCRIPTOR.enum_types_by_name) == {"AttentionKind"}


@pytest.mark.parametrize("message", sorted(TRANSLATOR_LAYOUT))
def test_translator_field_names_numbers_and_types(message: str) -> None:
    assert _layout(_message(tr, message)) == TRANSLATOR_LAYOUT[message]


def test_translator_semantics_of_the_encoding() -> None:
    options = tr.TranslateOptions()
    assert not options.HasField("beam_size")  # unset means "server default", distinct from 0
    options.beam_size = 0
    assert options.HasField("beam_size")
    assert tr.Tensor.DESCRIPTOR.fields_by_name["data"].is_packed

    weights = tr.Tensor(shape=[1, 2, 2, 3], data=[0.5] * 12)
    translation = tr.Translation(
        text="el gato", source_tokens=["the", "cat", "</s>"], target_tokens=["el", "gato", "</s>"],
        score=-0.1, log_prob=-0.3, unknown_words=[],
        attention=[tr.AttentionMap(kind=tr.CROSS, layers=[0], heads=[0, 1], weights=weights,
                                   row_tokens=["el", "gato", "</s>"], column_tokens=["the", "cat", "</s>"])],
        timings=tr.Timings(queue_ms=1.5, compute_ms=2.0, total_ms=4.0),
    )
    event = tr.TranslateStreamResponse(translation=translation)
    parsed = tr.TranslateStreamResponse.FromString(event.SerializeToString())
    assert parsed.WhichOneof("event") == "translation"
    assert parsed.translation.attention[0].weights.data[11] == pytest.approx(0.5)
    assert tr.TranslateStreamResponse(token=tr.TokenEvent(index=0, token_id=5, token="el")).WhichOneof(
        "event") == "token"


# ---------------------------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------------------------

# (method, request, response, client streaming, server streaming)
KSERVE_METHODS = [
    ("ServerLive", "inference.ServerLiveRequest", "inference.ServerLiveResponse", False, False),
    ("ServerReady", "inference.ServerReadyRequest", "inference.ServerReadyResponse", False, False),
    ("ModelReady", "inference.ModelReadyRequest", "inference.ModelReadyResponse", False, False),
    ("ServerMetadata", "inference.ServerMetadataRequest", "inference.ServerMetadataResponse", False, False),
    ("ModelMetadata", "inference.ModelMetadataRequest", "inference.ModelMetadataResponse", False, False),
    ("ModelInfer", "inference.ModelInferRequest", "inference.ModelInferResponse", False, False),
    ("ModelConfig", "inference.ModelConfigRequest", "inference.ModelConfigResponse", False, False),
    ("ModelStatistics", "inference.ModelStatisticsRequest", "inference.ModelStatisticsResponse",
     False, False),
    ("RepositoryIndex", "inference.RepositoryIndexRequest", "inference.RepositoryIndexResponse",
     False, False),
]
TRANSLATOR_METHODS = [
    ("Translate", "translator.v1.TranslateRequest", "translator.v1.TranslateResponse", False, False),
    ("TranslateStream", "translator.v1.TranslateStreamRequest", "translator.v1.TranslateStreamResponse",
     False, True),
    ("GetModelInfo", "translator.v1.GetModelInfoRequest", "translator.v1.ModelInfo", False, False),
]


def _streaming(method) -> tuple[bool, bool]:
    proto = descriptor_pb2.MethodDescriptorProto()
    method.CopyToProto(proto)
    return proto.client_streaming, proto.server_streaming


@pytest.mark.parametrize(("module", "service", "expected"), [
    (kserve, "inference.GRPCInferenceService", KSERVE_METHODS),
    (tr, "translator.v1.Translator", TRANSLATOR_METHODS),
])
def test_service_methods(module, service: str, expected: list) -> None:
    assert [s.full_name for s in module.DESCRIPTOR.services_by_name.values()] == [service]
    descriptor = module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
    actual = [(m.name, m.input_type.full_name, m.output_type.full_name, *_streaming(m))
              for m in descriptor.methods]
    assert actual == expected


class _RecordingChannel:
    """Stands in for a grpc.Channel: records the method paths and kinds a stub asks for."""

    def __init__(self) -> None:
        self.calls: dict[str, str] = {}

    def _record(self, kind: str):
        def make(path, *args, **kwargs):
            self.calls[path] = kind
            return lambda *a, **k: None
        return make

    def __getattr__(self, kind: str):
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


def test_stubs_call_the_protocol_paths() -> None:
    channel = _RecordingChannel()
    kserve_grpc.GRPCInferenceServiceStub(channel)
    assert channel.calls == {f"/inference.GRPCInferenceService/{name}": "unary_unary"
                             for name, *_ in KSERVE_METHODS}

    channel = _RecordingChannel()
    tr_grpc.TranslatorStub(channel)
    assert channel.calls == {
        "/translator.v1.Translator/Translate": "unary_unary",
        "/translator.v1.Translator/TranslateStream": "unary_stream",
        "/translator.v1.Translator/GetModelInfo": "unary_unary",
    }
    assert hasattr(kserve_grpc, "add_GRPCInferenceServiceServicer_to_server")
    assert hasattr(tr_grpc, "add_TranslatorServicer_to_server")
