"""Triton's own Python clients (tritonclient.grpc and tritonclient.http), unchanged, against our KServe v2
endpoints (gRPC, and REST on --http-port).

tritonclient pins protobuf below 7 and registers the same `inference.*` message names as our generated code,
so it cannot share our interpreter: it gets a virtual environment of its own (from PyPI, which CI reaches) and
talks to a real server subprocess over a real socket.
"""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

from bench.servers import Setting, spawn_server
from service.core.options import TranslateOptions
from service.engine.engine import Engine
from tests.conftest import DEFAULT_MODEL, DEFAULT_REPOSITORY

TEXTS = ["the big red dog sees her", "i do not see the small cats"]

CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
model = sys.argv[2]
texts = json.loads(sys.argv[3])
text = grpcclient.InferInput("TEXT", [len(texts)], "BYTES")
text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
outputs = [grpcclient.InferRequestedOutput(name)
           for name in ("TRANSLATION", "CROSS_ATTENTION", "SOURCE_LENGTH", "TARGET_LENGTH")]
result = client.infer(model, [text], outputs=outputs, request_id="triton-1")
metadata = client.get_model_metadata(model, as_json=True)
config = client.get_model_config(model, as_json=True)["config"]
statistics = client.get_inference_statistics(model, as_json=True)["model_stats"]
index = client.get_model_repository_index(as_json=True)["models"]
print(json.dumps({
    "extensions": client.get_server_metadata(as_json=True).get("extensions", []),
    "config": config,
    "statistics": statistics,
    "index": index,
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "unknown_model_ready": client.is_model_ready("no-such-model"),
    "metadata_name": metadata["name"],
    "metadata_inputs": [i["name"] for i in metadata["inputs"]],
    "id": result.get_response().id,
    "translation": [t.decode() for t in result.as_numpy("TRANSLATION").tolist()],
    "cross_attention": result.as_numpy("CROSS_ATTENTION").tolist(),
    "source_length": result.as_numpy("SOURCE_LENGTH").tolist(),
    "target_length": result.as_numpy("TARGET_LENGTH").tolist(),
}))
"""


HTTP_CLIENT = """
import json, sys
import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

client = httpclient.InferenceServerClient(sys.argv[1])
model = sys.argv[2]
texts = json.loads(sys.argv[3])
text = httpclient.InferInput("TEXT", [len(texts)], "BYTES")
text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
outputs = [httpclient.InferRequestedOutput(name)
           for name in ("TRANSLATION", "CROSS_ATTENTION", "SOURCE_LENGTH", "TARGET_LENGTH")]
result = client.infer(model, [text], outputs=outputs, request_id="http-1")  # binary outputs, the default
as_json = httpclient.InferInput("TEXT", [len(texts)], "BYTES")
as_json.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=False)
as_text = httpclient.InferRequestedOutput("TRANSLATION", binary_data=False)
plain = client.infer(model, [as_json], outputs=[as_text])
empty = httpclient.InferInput("TEXT", [1], "BYTES")
empty.set_data_from_numpy(np.array([b""], dtype=object))
try:
    client.infer(model, [empty])
    refused = None
except InferenceServerException as error:
    refused = [error.status(), error.message()]
metadata = client.get_model_metadata(model)
print(json.dumps({
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "unknown_model_ready": client.is_model_ready("no-such-model"),
    "server": client.get_server_metadata(),
    "metadata_name": metadata["name"],
    "metadata_inputs": [i["name"] for i in metadata["inputs"]],
    "id": result.get_response()["id"],
    "translation": [t.decode() for t in result.as_numpy("TRANSLATION").tolist()],
    "json_translation": [str(t) for t in plain.as_numpy("TRANSLATION").tolist()],
    "cross_attention": result.as_numpy("CROSS_ATTENTION").tolist(),
    "target_length": result.as_numpy("TARGET_LENGTH").tolist(),
    "refused": refused,
}))
"""


@pytest.fixture(scope="module")
def triton_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tritonclient-venv")
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "tritonclient[grpc,http]", "numpy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, f"cannot install tritonclient from PyPI:\n{install.stderr[-2000:]}"
    return python


def test_tritonclient_infers_translations_and_attention(triton_python: Path, tmp_path: Path) -> None:
    setting = Setting("triton", {"threads": "2", "quality_sample_rate": "0"})
    with spawn_server(setting, DEFAULT_REPOSITORY, DEFAULT_MODEL, log_dir=tmp_path) as target:
        run = subprocess.run(
            [str(triton_python), "-c", CLIENT, target.address, DEFAULT_MODEL, json.dumps(TEXTS)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout)
    assert answer["live"] and answer["ready"] and answer["model_ready"]
    assert not answer["unknown_model_ready"]
    assert answer["metadata_name"] == DEFAULT_MODEL and "TEXT" in answer["metadata_inputs"]
    assert answer["id"] == "triton-1"
    # Triton's extensions, read by Triton's client with its own model_config.proto.
    assert {"model_configuration", "statistics"} <= set(answer["extensions"])
    config = answer["config"]
    assert (config["name"], config["platform"], config["backend"]) == (DEFAULT_MODEL, "onnxruntime_onnx",
                                                                       "onnxruntime")
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("TEXT", "TYPE_STRING")]
    assert ("CROSS_ATTENTION", "TYPE_FP32") in [(o["name"], o["data_type"]) for o in config["output"]]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) > 0
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    [stats] = answer["statistics"]
    assert (stats["name"], stats["version"]) == (DEFAULT_MODEL, "1")
    # The one infer call: its 2 texts ran (warm-up is not counted), in at least one batch.
    assert int(stats["inference_count"]) == len(TEXTS) and int(stats["execution_count"]) >= 1
    assert int(stats["inference_stats"]["success"]["count"]) == 1
    durations = {name: int(value["ns"]) for name, value in stats["inference_stats"].items() if "ns" in value}
    assert durations["success"] > durations["compute_infer"] > 0
    assert int(stats["last_inference"]) > 0
    assert {"name": DEFAULT_MODEL, "version": "1", "state": "READY"} in answer["index"]

    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=1)
    expected = engine.translate(TEXTS, TranslateOptions(attention=frozenset({"cross"})))
    assert answer["translation"] == [t.text for t in expected]
    maps = np.array(answer["cross_attention"], dtype=np.float32)
    assert maps.shape[:3] == (len(TEXTS), *expected[0].cross_attention.shape[:2])
    for row, translation in enumerate(expected):
        layers, heads, target_length, source_length = translation.cross_attention.shape
        assert answer["source_length"][row] == source_length
        assert answer["target_length"][row] == target_length
        real = maps[row, :, :, :target_length, :source_length]
        np.testing.assert_allclose(real, translation.cross_attention, atol=1e-5)
        assert not maps[row, :, :, target_length:, :].any() and not maps[row, :, :, :, source_length:].any()


def test_tritonclient_http_infers_translations_and_attention(triton_python: Path, tmp_path: Path) -> None:
    setting = Setting("triton-http", {"threads": "2", "quality_sample_rate": "0"})
    with spawn_server(setting, DEFAULT_REPOSITORY, DEFAULT_MODEL, log_dir=tmp_path) as target:
        assert target.http is not None
        run = subprocess.run(
            [str(triton_python), "-c", HTTP_CLIENT, target.http, DEFAULT_MODEL, json.dumps(TEXTS)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout)
    assert answer["live"] and answer["ready"] and answer["model_ready"]
    assert not answer["unknown_model_ready"]
    assert answer["server"]["name"] == "translator"
    assert answer["metadata_name"] == DEFAULT_MODEL and answer["metadata_inputs"] == ["TEXT"]
    assert answer["id"] == "http-1"
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=1)
    expected = engine.translate(TEXTS, TranslateOptions(attention=frozenset({"cross"})))
    assert answer["translation"] == answer["json_translation"] == [t.text for t in expected]
    maps = np.array(answer["cross_attention"], dtype=np.float32)
    for row, translation in enumerate(expected):
        layers, heads, target_length, source_length = translation.cross_attention.shape
        assert answer["target_length"][row] == target_length
        np.testing.assert_allclose(
            maps[row, :, :, :target_length, :source_length], translation.cross_attention, atol=1e-5
        )
    status, message = answer["refused"]
    assert status == "400" and "the text is empty" in message
