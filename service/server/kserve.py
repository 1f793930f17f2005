"""KServe v2 / Open Inference Protocol: inference.GRPCInferenceService over the same engine and batcher.

The model is `<name>` (its folder in the repository) at version `<version>` (the version folder):

- input `TEXT`, BYTES, shape [N] or [N, 1]: the source texts;
- output `TRANSLATION`, BYTES, same shape as TEXT;
- outputs only sent when listed in `outputs` (they cost attention computation or are seldom wanted):
  `CROSS_ATTENTION` FP32 [N, L, H, T, S] (decoder layers, heads, target steps, source tokens; zero-padded to
  the longest T and S of the request), `SOURCE_LENGTH` / `TARGET_LENGTH` INT32 [N] (the real T and S).
- request parameters: `beam_size` (int), `max_length` (int), `length_penalty` (double or int),
  `replace_unknowns` (bool); Triton's `timeout` (int, microseconds, at most 1e14; 0: none) adds a deadline,
  `priority` is accepted and ignored.

Answers always use raw_output_contents, as Triton does: tritonclient's `InferResult.as_numpy` reads outputs
from there (typed contents only for BYTES), so raw is what every client understands.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np

from service.api.inference import grpc_service_pb2 as pb
from service.api.inference import grpc_service_pb2_grpc as pb_grpc
from service.core.model_format import ModelLoadError, available_versions
from service.engine.engine import Engine
from service.scheduler.job import TextResult
from service.scheduler.status import RequestFailed, Status, invalid
from service.server.accounting import tracked
from service.server.requests import Limits, encode_texts, longer_than_training, make_options, repeated_values
from service.server.runtime import Runtime, Work, submit_job

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "translator"
# KServe's health calls: open without a bearer token, like grpc.health.v1 (Triton's "health" protocol group).
PROBE_METHODS = ("ServerLive", "ServerReady", "ModelReady")
PLATFORM = "onnxruntime_onnx"
# Triton's names of the protocol extensions served (ModelConfig, ModelStatistics; RepositoryIndex alone is not
# the whole "model_repository" extension, which also loads and unloads models).
EXTENSIONS = ["model_configuration", "statistics"]

INPUT_TEXT = "TEXT"
OUTPUT_TRANSLATION = "TRANSLATION"
OUTPUT_CROSS_ATTENTION = "CROSS_ATTENTION"
OUTPUT_SOURCE_LENGTH = "SOURCE_LENGTH"
OUTPUT_TARGET_LENGTH = "TARGET_LENGTH"
OUTPUT_DATATYPES = {
    OUTPUT_TRANSLATION: "BYTES",
    OUTPUT_CROSS_ATTENTION: "FP32",
    OUTPUT_SOURCE_LENGTH: "INT32",
    OUTPUT_TARGET_LENGTH: "INT32",
}
PARAMETERS = ("beam_size", "max_length", "length_penalty", "replace_unknowns", "timeout", "priority")
# Triton's `timeout` is in microseconds; 1e8 s (as far as a gRPC deadline is taken for one) is the most
# accepted: a larger one would overflow the timed waits.
MAX_TIMEOUT_US = 10**14
_LENGTH = struct.Struct("<I")


def server_version() -> str:
    try:
        return metadata.version("translator")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def serialize_bytes(elements: list[bytes]) -> bytes:
    """The raw form of a BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def deserialize_bytes(buffer: bytes, where: str) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise invalid(
                f"{where}: malformed BYTES raw contents: {len(buffer) - offset} trailing bytes at offset "
                f"{offset} cannot hold a 4-byte length"
            )
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise invalid(
                f"{where}: malformed BYTES raw contents: element {len(elements)} claims {length} bytes "
                f"but only {len(buffer) - offset} remain"
            )
        elements.append(bytes(buffer[offset : offset + length]))
        offset += length
    return elements


TensorSpec = tuple[str, str, list[int]]  # name, datatype, shape


@dataclass(frozen=True)
class Outputs:
    """The answer a ModelInfer request asks for: its output tensors, and the shape of its TEXT input."""

    names: list[str]
    text_shape: list[int]


def model_tensors(engine: Engine) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) as (name, datatype, shape): what ModelMetadata and ModelConfig describe."""
    architecture = engine.model.architecture
    inputs = [(INPUT_TEXT, "BYTES", [-1])]
    outputs = [
        (OUTPUT_TRANSLATION, "BYTES", [-1]),
        (OUTPUT_CROSS_ATTENTION, "FP32", [-1, architecture.n_decoder_layers, architecture.n_heads, -1, -1]),
        (OUTPUT_SOURCE_LENGTH, "INT32", [-1]),
        (OUTPUT_TARGET_LENGTH, "INT32", [-1]),
    ]
    return inputs, outputs


# model_config.proto's names of the protocol's datatypes (BYTES is its TYPE_STRING).
CONFIG_DATATYPES = {"BYTES": pb.TYPE_STRING, "FP32": pb.TYPE_FP32, "INT32": pb.TYPE_INT32}


def repository_entries(repository: Path) -> list[tuple[str, str, str]]:
    """(model, version, reason) for every model version in a repository folder; version "" and the reason
    for a model folder with no version or one that cannot be read. Hidden folders are not models."""
    try:
        folders = sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        return [("", "", f"cannot read the repository {repository}: {error.strerror}")]
    entries = []
    for folder in folders:
        try:
            versions = available_versions(repository, folder.name)
        except (OSError, ModelLoadError) as error:
            entries.append((folder.name, "", f"cannot read {folder}: {error}"))
            continue
        # set(): "1" and "01" are both version 1, as for loading.
        entries += [(folder.name, str(version), "") for version in sorted(set(versions))]
        if not versions:
            entries.append((folder.name, "", "no version folder (1, 2, ...) in it"))
    return entries


def _tensor_metadata(name: str, datatype: str, shape: list[int]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def _parameter(name: str, value: pb.InferParameter, kind: type) -> int | float | bool:
    which = value.WhichOneof("parameter_choice")
    got = getattr(value, which) if which else None
    if kind is bool and which == "bool_param":
        return bool(got)
    if kind is int and which in ("int64_param", "uint64_param"):
        return int(got)  # type: ignore[arg-type]
    if kind is float and which in ("double_param", "int64_param", "uint64_param"):
        return float(got)  # type: ignore[arg-type]
    expected = {bool: "bool_param", int: "int64_param", float: "double_param"}[kind]
    raise invalid(
        f"parameter {name} must be a {expected}, got {which or 'no value'}" + (f" ({got!r})" if which else "")
    )


def cross_attention_maps(results: list[TextResult]) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Each text's cross-attention and the CROSS_ATTENTION output's shape [N, L, H, T, S]: every map
    zero-padded to the request's longest T and S."""
    maps = [result.translation.cross_attention for result in results]
    assert all(m is not None for m in maps), "CROSS_ATTENTION requested but not computed"
    layers, heads = maps[0].shape[:2]  # type: ignore[union-attr]
    steps = max(m.shape[2] for m in maps)  # type: ignore[union-attr]
    width = max(m.shape[3] for m in maps)  # type: ignore[union-attr]
    return maps, (len(maps), layers, heads, steps, width)  # type: ignore[return-value]


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # ----------------------------------------------------------------------------------------------------
    # Health and metadata
    # ----------------------------------------------------------------------------------------------------

    @tracked("ServerLive")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @tracked("ServerReady")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    @tracked("ModelReady")
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except RequestFailed:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @tracked("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    @tracked("ModelMetadata")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        engine = self._model(request.name, request.version)
        inputs, outputs = model_tensors(engine)
        return pb.ModelMetadataResponse(
            name=engine.model.name,
            versions=[str(engine.model.version)],
            platform=PLATFORM,
            inputs=[_tensor_metadata(*tensor) for tensor in inputs],
            outputs=[_tensor_metadata(*tensor) for tensor in outputs],
        )

    # ----------------------------------------------------------------------------------------------------
    # Triton's extensions: model configuration, statistics, repository index
    # ----------------------------------------------------------------------------------------------------

    @tracked("ModelConfig")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        engine = self._model(request.name, request.version)
        _, _, limits = self.runtime.serving()
        config = self.runtime.config
        inputs, outputs = model_tensors(engine)
        settings = {
            "max_texts_per_request": limits.max_texts_per_request,
            "max_tokens_per_text": limits.max_tokens_per_text,
            "max_beam_size": limits.max_beam_size,
            "max_length": limits.max_length,
            "max_batch_tokens": config.max_batch_tokens,
            "execution_provider": engine.provider,
            "precision": engine.model.precision,
            "request_parameters": ",".join(PARAMETERS),
        }
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=engine.model.name,
                platform=PLATFORM,
                backend="onnxruntime",
                max_batch_size=0,  # TEXT carries the batch: one request's texts are its first dimension
                input=[pb.ModelInput(name=n, data_type=CONFIG_DATATYPES[t], dims=s) for n, t, s in inputs],
                output=[pb.ModelOutput(name=n, data_type=CONFIG_DATATYPES[t], dims=s) for n, t, s in outputs],
                dynamic_batching=pb.ModelDynamicBatching(
                    preferred_batch_size=[config.max_batch_size],
                    max_queue_delay_microseconds=round(config.max_queue_delay_ms * 1000),
                    preserve_ordering=False,  # each request is answered when its texts are done
                ),
                parameters={k: pb.ModelParameter(string_value=str(v)) for k, v in settings.items()},
            )
        )

    @tracked("ModelStatistics")
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        engine, _, _ = self.runtime.serving()
        if request.name or request.version:
            self._check_model(engine, request.name or engine.model.name, request.version)
        stats = self.runtime.metrics.inference_statistics()

        def duration(pair: tuple[int, int]) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=pair[0], ns=pair[1])

        return pb.ModelStatisticsResponse(
            model_stats=[
                pb.ModelStatistics(
                    name=engine.model.name,
                    version=str(engine.model.version),
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.inference_count,
                    execution_count=stats.execution_count,
                    inference_stats=pb.InferStatistics(
                        success=duration(stats.success),
                        fail=duration(stats.fail),
                        queue=duration(stats.queue),
                        compute_input=duration((stats.compute_infer[0], 0)),
                        compute_infer=duration(stats.compute_infer),
                        compute_output=duration((stats.compute_infer[0], 0)),
                    ),
                )
            ]
        )

    @tracked("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        engine, _, _ = self.runtime.serving()
        repository = Path(self.runtime.config.model_repository)
        if request.repository_name not in ("", repository.name):
            raise RequestFailed(
                Status.NOT_FOUND,
                f"unknown repository {request.repository_name!r}: this server reads {repository.name!r}",
            )
        served = (engine.model.name, str(engine.model.version))
        entries = [(*served, "")]  # listed even if its folder is gone meanwhile
        not_loaded = f"not loaded: this server serves {served[0]} version {served[1]}"
        for name, version, reason in repository_entries(repository):
            if (name, version) != served:
                entries.append((name, version, reason or not_loaded))
        models = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=name, version=version, state="UNAVAILABLE" if reason else "READY", reason=reason
            )
            for name, version, reason in sorted(entries, key=lambda e: (e[0], int(e[1] or -1)))
            if not (request.ready and reason)
        ]
        return pb.RepositoryIndexResponse(models=models)

    def _model(self, name: str, version: str) -> Engine:
        """The engine when name/version designate the served model (NOT_FOUND otherwise)."""
        engine, _, _ = self.runtime.serving()
        self._check_model(engine, name, version)
        return engine

    @staticmethod
    def _check_model(engine: Engine, name: str, version: str) -> None:
        model = engine.model
        if name != model.name:
            raise RequestFailed(
                Status.NOT_FOUND,
                f"unknown model {name!r}: this server serves {model.name!r} (version {model.version})",
            )
        if version not in ("", str(model.version)):
            raise RequestFailed(
                Status.NOT_FOUND,
                f"model {name!r} has no version {version!r} here: this server serves version {model.version}",
            )

    # ----------------------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------------------

    @tracked("ModelInfer", limited=True)
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        def prepare(engine: Engine, limits: Limits) -> Work[Outputs]:
            self._check_model(engine, request.model_name, request.model_version)
            wanted = self._requested_outputs(request)
            values = {}
            for name, value in request.parameters.items():
                if name not in PARAMETERS:
                    raise invalid(f"unknown parameter {name!r}; this model takes {', '.join(PARAMETERS)}")
                kind = {"replace_unknowns": bool, "length_penalty": float}.get(name, int)
                values[name] = _parameter(name, value, kind)
            timeout_us = values.pop("timeout", None)
            values.pop("priority", None)
            if timeout_us is not None and not 0 <= timeout_us <= MAX_TIMEOUT_US:
                raise invalid(
                    f"parameter timeout must be between 0 (none) and {MAX_TIMEOUT_US} microseconds, got "
                    f"{timeout_us}"
                )
            if timeout_us == 0:  # Triton's "no timeout"
                timeout_us = None
            options = make_options(
                limits,
                attention=["cross"] if OUTPUT_CROSS_ATTENTION in wanted else [],
                where="parameters",
                **values,
            )  # type: ignore[arg-type]
            texts, shape = self._texts(request)
            sources = encode_texts(engine, texts, limits, field=INPUT_TEXT)
            timeout_s = None if timeout_us is None else timeout_us / 1e6
            return Work(sources, options, Outputs(wanted, shape), timeout_s)

        def build(results: list[TextResult]) -> pb.ModelInferResponse:
            wanted, shape = call.work.answer.names, call.work.answer.text_shape
            if OUTPUT_CROSS_ATTENTION in wanted:  # refused before hundreds of megabytes are padded and copied
                self.runtime.check_bytes(4 * int(np.prod(cross_attention_maps(results)[1])))
            model = call.engine.model
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            for name in wanted:
                data, dims = self._output(name, results, shape)
                output = response.outputs.add(name=name, datatype=OUTPUT_DATATYPES[name], shape=dims)
                response.raw_output_contents.append(data)
                if name == OUTPUT_TRANSLATION:  # what the model could not place, per text (JSON lists)
                    for key, value in self._doubts(call.engine, results).items():
                        output.parameters[key].string_param = value
            self.runtime.check_size(response)
            return response

        with submit_job(self.runtime, context, prepare) as call:
            return await call.answer(build)

    @staticmethod
    def _doubts(engine: Engine, results: list[TextResult]) -> dict[str, str]:
        """TRANSLATION's output parameters: per text, whether it is longer than any training sentence and
        the words outside the vocabulary (translator.v1's longer_than_training and unknown_words)."""
        translations = [result.translation for result in results]
        return {
            "longer_than_training": json.dumps(
                [longer_than_training(engine, len(t.source_tokens)) for t in translations]
            ),
            "unknown_words": json.dumps([t.unknown_words for t in translations], ensure_ascii=False),
        }

    def _requested_outputs(self, request: pb.ModelInferRequest) -> list[str]:
        if len(request.outputs) > len(OUTPUT_DATATYPES):
            raise invalid(
                f"outputs has {len(request.outputs)} entries, more than the model's {len(OUTPUT_DATATYPES)} "
                f"outputs ({', '.join(OUTPUT_DATATYPES)}; each may be asked for once)"
            )
        names = [output.name for output in request.outputs] or [OUTPUT_TRANSLATION]
        for output in request.outputs:
            if output.name not in OUTPUT_DATATYPES:
                raise invalid(
                    f"unknown output {output.name!r}; the model's outputs are {', '.join(OUTPUT_DATATYPES)}"
                )
            # `binary_data` is HTTP's choice of encoding: over gRPC every output is raw already.
            unsupported = sorted(set(output.parameters) - {"binary_data"})
            if unsupported:
                raise invalid(
                    f"output {output.name}: output parameters other than binary_data are not supported "
                    f"(got {', '.join(unsupported)})"
                )
        repeated = repeated_values(names)
        if repeated:
            raise invalid(f"outputs {repeated} requested more than once")
        return names

    def _texts(self, request: pb.ModelInferRequest) -> tuple[list[str], list[int]]:
        if len(request.inputs) != 1:
            raise invalid(
                f"expected exactly one input, {INPUT_TEXT} (BYTES, shape [N] or [N, 1]); got "
                f"{len(request.inputs)}: {[i.name for i in request.inputs]}"
            )
        tensor = request.inputs[0]
        if tensor.name != INPUT_TEXT:
            raise invalid(f"unknown input {tensor.name!r}: the model's only input is {INPUT_TEXT}")
        if tensor.datatype != "BYTES":
            raise invalid(f"input {INPUT_TEXT} must have datatype BYTES, got {tensor.datatype!r}")
        shape = list(tensor.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
            raise invalid(f"input {INPUT_TEXT} must have shape [N] or [N, 1], got {shape}")
        typed = tensor.contents
        has_typed = typed.ByteSize() > 0
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise invalid(
                    f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                    f"{len(request.inputs)} input(s): there must be one per input"
                )
            if has_typed:
                raise invalid(
                    f"input {INPUT_TEXT} sets contents although the request uses raw_input_contents: use "
                    "one form or the other"
                )
            elements = deserialize_bytes(request.raw_input_contents[0], f"input {INPUT_TEXT}")
        else:
            other = [f.name for f, _ in typed.ListFields() if f.name != "bytes_contents"]
            if other:
                raise invalid(
                    f"input {INPUT_TEXT} is BYTES: its elements go in contents.bytes_contents, not "
                    f"{', '.join(other)}"
                )
            elements = list(typed.bytes_contents)
        if len(elements) != shape[0]:
            raise invalid(
                f"input {INPUT_TEXT} has shape {shape} ({shape[0]} elements) but {len(elements)} elements"
            )
        texts = []
        for index, element in enumerate(elements):
            try:
                texts.append(element.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise invalid(
                    f"{INPUT_TEXT}[{index}] is not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from error
        return texts, shape

    def _output(self, name: str, results: list[TextResult], shape: list[int]) -> tuple[bytes, list[int]]:
        translations = [result.translation for result in results]
        if name == OUTPUT_TRANSLATION:
            return serialize_bytes([t.text.encode("utf-8") for t in translations]), shape
        if name == OUTPUT_SOURCE_LENGTH:
            return np.array([len(t.source_tokens) for t in translations], dtype="<i4").tobytes(), [
                len(results)
            ]
        if name == OUTPUT_TARGET_LENGTH:
            return np.array([len(t.target_tokens) for t in translations], dtype="<i4").tobytes(), [
                len(results)
            ]
        maps, dims = cross_attention_maps(results)
        padded = np.zeros(dims, dtype="<f4")
        for row, weights in enumerate(maps):
            padded[row, :, :, : weights.shape[2], : weights.shape[3]] = weights
        return padded.tobytes(), list(padded.shape)
