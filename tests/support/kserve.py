"""KServe v2 (Triton) inference requests built, and answers read, as tritonclient does."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.api.inference import grpc_service_pb2 as kpb
from service.server.kserve import deserialize_bytes, serialize_bytes


def infer_request(
    texts: list[str],
    *,
    raw: bool = True,
    shape: list[int] | None = None,
    outputs: tuple[str, ...] = (),
    **parameters: Any,
) -> kpb.ModelInferRequest:
    """A ModelInfer request for the model `tiny`: `texts` as its TEXT input, `parameters` typed by value."""
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
