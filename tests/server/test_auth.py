"""Bearer tokens: translation and KServe calls must carry one of the configured tokens; health and
reflection stay open; refusals are UNAUTHENTICATED, counted, and say what to send."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.api.inference import grpc_service_pb2 as kpb
from service.api.translator.v1 import translator_pb2 as pb
from service.client.translator_client import TranslatorClient, TranslatorError
from service.server.app import TranslatorServer
from service.server.config import ServerConfig
from tests.support.kserve import infer_request
from tests.support.metrics import scrape, value
from tests.support.server import Client, make_config, running


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_calls_need_a_configured_bearer_token(tiny_repository: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token a line\nfirst-token-123\n\n  second-token-456  \n")
    with running(make_config(tiny_repository, auth_tokens_file=tokens)) as server:
        assert server.port and server.metrics_port
        client = Client(server.port)
        request = pb.TranslateRequest(texts=["the cat"])
        wrong = ["Bearer nope", "Basic second-token-456", "Bearer second-token-45"]
        for metadata in (None, *((("authorization", header),) for header in wrong)):
            with pytest.raises(grpc.RpcError) as refused:
                client.translator.Translate(request, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in refused.value.details()
        good = (("authorization", "Bearer second-token-456"),)
        assert client.translator.Translate(request, metadata=good, timeout=10).translations[0].text
        infer = infer_request(["the cat"])
        assert _code(lambda: client.kserve.ModelInfer(infer, metadata=good)) == grpc.StatusCode.OK
        for call in (lambda: client.kserve.ModelInfer(infer_request(["the cat"])),
                     lambda: client.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="tiny")),
                     lambda: client.translator.GetModelInfo(pb.GetModelInfoRequest())):
            assert _code(call) == grpc.StatusCode.UNAUTHENTICATED
        # Open: health, gRPC's and KServe's (orchestrators probe them), and reflection.
        health = client.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert client.kserve.ServerLive(kpb.ServerLiveRequest()).live
        assert client.kserve.ServerReady(kpb.ServerReadyRequest()).ready
        assert client.kserve.ModelReady(kpb.ModelReadyRequest(name="tiny")).ready
        # The client library and its token.
        with TranslatorClient(f"127.0.0.1:{server.port}", token="first-token-123") as ours:
            assert ours.translate("the dog")[0].text
        with TranslatorClient(f"127.0.0.1:{server.port}") as anonymous:
            with pytest.raises(TranslatorError) as error:
                anonymous.translate("the dog")
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        text = scrape(server.metrics_port)
        assert value(text, "translator_requests_total", method="Translate", code="UNAUTHENTICATED") == 5
        assert value(text, "translator_requests_total", method="Translate", code="OK") == 2
        client.close()


def test_token_settings_that_name_no_token_stop_the_start(tiny_repository: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing but a comment\n\n")
    for path, cause in ((empty, "holds no token"), (tmp_path / "missing", "cannot read it")):
        server = TranslatorServer(make_config(tiny_repository, auth_tokens_file=path))
        with pytest.raises(ValueError, match=cause):
            server.start()
        assert server.port is None  # refused before any port was bound


def test_tokens_never_reach_the_log() -> None:
    config = ServerConfig(auth_tokens="very-secret-1,very-secret-2")
    assert config.bearer_tokens() == (b"very-secret-1", b"very-secret-2")
    assert "very-secret" not in repr(config.as_log_fields()) and "very-secret" not in repr(config)
    assert config.as_log_fields()["auth_tokens"] == "(set)"


def test_token_settings_that_could_never_match_are_refused() -> None:
    """A setting that names no token would leave the server open without a word; a token gRPC metadata
    cannot carry could never be sent."""
    for tokens, cause in ((",", "names no token"), (" , ", "names no token"), ("sécret", "printable ASCII"),
                          ("two words", "printable ASCII")):
        with pytest.raises(ValueError, match=cause):
            ServerConfig(auth_tokens=tokens).bearer_tokens()
    assert ServerConfig().bearer_tokens() == ()  # unset: no check
