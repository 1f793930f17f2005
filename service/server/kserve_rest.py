"""KServe v2 / Open Inference Protocol over HTTP/REST (Triton's port 8000), on the server's event loop.

Each REST call becomes the gRPC request message and is handled by `kserve.InferenceService`'s own method:
the same checks, batcher, slots, deadlines, metrics and drain as over gRPC, with `RestContext` standing in for
gRPC's call context. JSON tensors both ways, and Triton's binary tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes followed by the tensors' raw bytes), which `tritonclient.http` uses
by default. Errors are `{"error": "..."}` with the HTTP status of the failure.

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{version}] and its /ready;
POST .../infer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from service.api.inference import grpc_service_pb2 as pb
from service.scheduler.status import RequestFailed, Status, invalid
from service.server import kserve, tracing
from service.server.accounting import GRPC_CODES
from service.server.http_guard import KEEPALIVE_S, GuardedServer
from service.server.middleware import UNAUTHENTICATED_MESSAGE, authorized

log = logging.getLogger("translator.rest")

HEADER_LENGTH = "Inference-Header-Content-Length"
BODY_TIMEOUT_S = 30.0  # a request's body must arrive within this once its head has
SHUTDOWN_TIMEOUT_S = 5.0  # at stop, calls still building or writing their answers get this long
STATUS_OF_CODE = {code: status for status, code in GRPC_CODES.items()}
HTTP_STATUS = {
    Status.OK: HTTPStatus.OK,
    Status.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    Status.NOT_FOUND: HTTPStatus.NOT_FOUND,
    Status.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    Status.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    Status.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    Status.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    Status.CANCELLED: HTTPStatus.BAD_REQUEST,  # the client is gone: nobody reads it
    Status.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}
NUMPY_TYPES = {"FP32": "<f4", "INT32": "<i4"}


class RestFailure(grpc.aio.AbortError):
    """The call ended with a status: what `context.abort` raises over REST, as gRPC's does over gRPC."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RestContext:
    """What kserve.InferenceService's methods and their `tracked` wrapper use of a gRPC call's context."""

    protocol = "http"  # for the call's trace

    def __init__(self, request: web.Request) -> None:
        # What gRPC metadata would carry: the bearer token and the caller's trace context.
        self._metadata = tracing.metadata_of(list(request.headers.items()))
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            self._metadata.append(("authorization", authorization))

    def time_remaining(self) -> float | None:
        return None  # REST has no deadline header: Triton's `timeout` parameter sets one

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RestFailure(STATUS_OF_CODE[code], details)

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


def error_response(status: Status | HTTPStatus, message: str) -> web.Response:
    http = HTTP_STATUS[status] if isinstance(status, Status) else status
    return web.json_response({"error": message}, status=int(http))


# ----------------------------------------------------------------------------------------------------------
# JSON <-> the gRPC messages
# ----------------------------------------------------------------------------------------------------------


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _text(value: Any, where: str) -> str:
    """A JSON string that protobuf can hold (JSON's surrogate escapes can make strings that are not)."""
    if not isinstance(value, str):
        raise invalid(f"{where} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{where} is not valid Unicode (it holds a lone surrogate escape)") from None
    return value


def _int64(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{where} must be an integer, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise invalid(f"{where} {value} does not fit a 64-bit integer")
    return value


def _parameter(name: str, value: Any) -> pb.InferParameter:
    where = f"parameter {name}"
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=_int64(value, where))
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=_text(value, where))
    raise invalid(f"{where} must be a boolean, number or string, got {type(value).__name__}")


def _flat(data: Any, where: str) -> list[Any]:
    """A tensor's `data`: a flat list, or nested lists in row-major order."""
    if not isinstance(data, list):
        raise invalid(f"{where}: data must be a list, got {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def infer_request(
    body: dict[str, Any], binary: bytes, name: str, version: str
) -> tuple[pb.ModelInferRequest, set[str]]:
    """The ModelInferRequest of a REST infer body, and the outputs to send as binary data."""
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    request.id = _text(body.get("id", ""), "id")
    parameters = dict(_object(body.get("parameters", {}), "parameters"))
    all_binary = parameters.pop("binary_data_output", False)
    if not isinstance(all_binary, bool):
        raise invalid("parameter binary_data_output must be a boolean")
    for key, value in parameters.items():
        request.parameters[_text(key, "a parameter's name")].CopyFrom(_parameter(key, value))
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid(
            f"inputs must be a non-empty list of tensors (the model's input is {kserve.INPUT_TEXT})"
        )
    offset, raw = 0, list[bytes]()
    for index, entry in enumerate(inputs):
        tensor = _object(entry, f"inputs[{index}]")
        name = _text(tensor.get("name", ""), f"inputs[{index}].name")
        where = f"input {name or index}"
        shape = tensor.get("shape")
        if not isinstance(shape, list):
            raise invalid(f"{where}: shape must be a list of integers, got {type(shape).__name__}")
        dims = [_int64(d, f"{where}: shape") for d in shape]
        datatype = _text(tensor.get("datatype", ""), f"{where}: datatype")
        message = request.inputs.add(name=name, datatype=datatype, shape=dims)
        size = _object(tensor.get("parameters", {}), f"{where}: parameters").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(
                    f"{where}: binary_data_size {size!r} does not fit the {len(binary) - offset} binary "
                    "bytes left"
                )
            raw.append(binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            elements = _flat(tensor["data"], where)
            if message.datatype == "BYTES":
                if not all(isinstance(e, str) for e in elements):
                    raise invalid(f"{where}: BYTES data must be strings")
                texts = [_text(e, f"{where}: data[{i}]") for i, e in enumerate(elements)]
                message.contents.bytes_contents.extend(e.encode("utf-8") for e in texts)
            else:
                raise invalid(f"{where}: datatype {message.datatype!r}: the model's input is BYTES")
        else:
            raise invalid(f"{where}: no data and no binary_data_size parameter")
    if raw and len(raw) != len(inputs):
        raise invalid("either every input or none carries binary data")
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} binary bytes after the last input's binary_data_size")
    request.raw_input_contents.extend(raw)
    binary_outputs = set()
    wanted = body.get("outputs", [])
    if not isinstance(wanted, list):
        raise invalid(f"outputs must be a list of objects, got {type(wanted).__name__}")
    for index, entry in enumerate(wanted):
        output = _object(entry, f"outputs[{index}]")
        message = request.outputs.add(name=_text(output.get("name", ""), f"outputs[{index}].name"))
        wants = _object(output.get("parameters", {}), f"output {message.name}: parameters")
        unknown = sorted(set(wants) - {"binary_data"})
        if unknown:
            raise invalid(
                f"output {message.name}: unknown parameters {', '.join(unknown)} (only binary_data)"
            )
        if not isinstance(wants.get("binary_data", False), bool):
            raise invalid(f"output {message.name}: binary_data must be a boolean")
        if wants.get("binary_data", all_binary):
            binary_outputs.add(message.name)
    if not request.outputs and all_binary:
        binary_outputs.add(kserve.OUTPUT_TRANSLATION)
    return request, binary_outputs


def _parameter_value(value: pb.InferParameter) -> Any:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def infer_response(
    response: pb.ModelInferResponse, binary_outputs: set[str], limit: int | None = None
) -> web.Response:
    outputs, tail = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        parameters = {key: _parameter_value(value) for key, value in output.parameters.items()}
        if output.name in binary_outputs:
            parameters["binary_data_size"] = len(raw)
            tail.append(raw)
        elif output.datatype == "BYTES":
            entry["data"] = [e.decode("utf-8") for e in kserve.deserialize_bytes(raw, output.name)]
        else:
            entry["data"] = np.frombuffer(raw, dtype=NUMPY_TYPES[output.datatype]).tolist()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    header = json.dumps(document).encode()
    size = len(header) + sum(len(part) for part in tail)
    if limit is not None and size > limit:
        raise RequestFailed(
            Status.RESOURCE_EXHAUSTED,
            f"the answer would be {size} bytes, more than max_message_bytes={limit}; ask for binary_data "
            "outputs (JSON numbers take ~5x their binary size), fewer texts or fewer outputs",
        )
    if not tail:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=b"".join([header, *tail]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def _metadata(response: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }


# ----------------------------------------------------------------------------------------------------------
# The HTTP server
# ----------------------------------------------------------------------------------------------------------

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestEndpoint:
    """The REST routes over one InferenceService; `start` listens on the running event loop."""

    def __init__(
        self,
        service: kserve.InferenceService,
        tokens: tuple[bytes, ...],
        max_body_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.service = service
        self.tokens = tokens
        self.ssl_context = ssl_context
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors])
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        self.app.add_routes(
            [
                web.get("/v2/health/live", self.live),
                web.get("/v2/health/ready", self.ready),
                web.get("/v2", self.server_metadata),
                *(web.get(path, self.model_metadata) for path in (model, versioned)),
                *(web.get(path + "/ready", self.model_ready) for path in (model, versioned)),
                *(web.post(path + "/infer", self.infer) for path in (model, versioned)),
            ]
        )
        self._runner: web.AppRunner | None = None
        self._guarded: GuardedServer | None = None

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_S, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )  # fmt: skip
        await self._runner.setup()
        assert self._runner.server is not None
        runtime = self.service.runtime

        def stalled() -> None:
            runtime.metrics.unread_answers.labels(method="REST", reason="slow_reader").inc()
            log.warning("REST: a client did not read its answer for %g s; its connection was dropped",
                        runtime.config.write_timeout_s)  # fmt: skip

        self._guarded = GuardedServer(self._runner.server, "REST", runtime.config.write_timeout_s, stalled)
        return await self._guarded.start(host, port, self.ssl_context)

    async def stop(self) -> None:
        """No new connections; calls still answering finish (SHUTDOWN_TIMEOUT_S at most); the rest dropped."""
        if self._guarded is not None:
            self._guarded.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._guarded is not None:
            await self._guarded.stop()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Route) -> web.StreamResponse:
        """Every failure as `{"error": ...}` with its status; an unexpected one as 500 (and logged)."""
        try:
            return await handler(request)
        except RestFailure as failure:
            return error_response(failure.status, failure.message)
        except RequestFailed as failure:
            return error_response(failure.code, failure.message)
        except web.HTTPException as error:
            if error.status == HTTPStatus.NOT_FOUND:
                return error_response(HTTPStatus.NOT_FOUND, f"no route {request.method} {request.path}")
            if error.status == HTTPStatus.METHOD_NOT_ALLOWED:
                return error_response(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.path}"
                )
            if error.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                limit = self.app._client_max_size
                message = f"the request body exceeds --max-receive-message-bytes={limit}"
                return error_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)
            return error_response(HTTPStatus(error.status), error.text or error.reason)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return error_response(Status.INTERNAL, f"internal error: {type(error).__name__}")

    def _context(self, request: web.Request, method: str, probe: bool = False) -> RestContext:
        context = RestContext(request)
        if self.tokens and not probe and not authorized(context, self.tokens):  # type: ignore[arg-type]
            self.service.runtime.metrics.answered(method, Status.UNAUTHENTICATED.name, 0.0)  # as over gRPC
            raise RestFailure(Status.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE.replace("metadata", "header"))
        return context

    async def live(self, request: web.Request) -> web.Response:
        context = self._context(request, "ServerLive", probe=True)
        reply = await self.service.ServerLive(pb.ServerLiveRequest(), context)
        return web.Response(status=200 if reply.live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        context = self._context(request, "ServerReady", probe=True)
        reply = await self.service.ServerReady(pb.ServerReadyRequest(), context)
        return web.Response(status=200 if reply.ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        context = self._context(request, "ServerMetadata")
        reply = await self.service.ServerMetadata(pb.ServerMetadataRequest(), context)
        return web.json_response(
            {"name": reply.name, "version": reply.version, "extensions": list(reply.extensions)}
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        message = pb.ModelMetadataRequest(name=request.match_info["name"], version=_version(request))
        context = self._context(request, "ModelMetadata")
        return web.json_response(_metadata(await self.service.ModelMetadata(message, context)))

    async def model_ready(self, request: web.Request) -> web.Response:
        # Unlike gRPC's ModelReady (ready=false, as Triton), an unknown model or version is a 404 naming it.
        context = self._context(request, "ModelReady", probe=True)
        self.service._model(request.match_info["name"], _version(request))
        message = pb.ModelReadyRequest(name=request.match_info["name"], version=_version(request))
        reply = await self.service.ModelReady(message, context)
        return web.Response(status=200 if reply.ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        context = self._context(request, "ModelInfer")
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.read()
        except TimeoutError:
            message = f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
            return error_response(HTTPStatus.REQUEST_TIMEOUT, message)
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise invalid(
                    f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body"
                )
            document, binary = body[: int(header_length)], body[int(header_length) :]
        else:
            document, binary = body, b""
        try:
            parsed = json.loads(document)
        except ValueError as error:  # not JSON, not UTF-8, an integer of more than 4,300 digits
            raise invalid(f"the request body is not valid JSON: {error}") from None
        except RecursionError:
            raise invalid("the request body nests JSON too deeply") from None
        message, binary_outputs = infer_request(
            _object(parsed, "the request body"), binary, request.match_info["name"], _version(request)
        )
        response = await self.service.ModelInfer(message, context)
        # JSON numbers cost ~5 bytes of text and a Python float each: built on a worker thread (like the gRPC
        # answers with maps), and refused past --max-message-bytes like them.
        limit = self.service.runtime.config.max_message_bytes
        return await asyncio.to_thread(infer_response, response, binary_outputs, limit)


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")
