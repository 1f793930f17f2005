"""Mutual TLS: a client with a certificate of the trusted CA is served, others are refused."""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.api.translator.v1 import translator_pb2 as pb
from tests.support.server import Client, make_config, running


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tiny_repository: Path, tmp_path: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        str(tmp_path / "ca.key"),
        "-out",
        str(tmp_path / "ca.pem"),
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        _openssl(
            "req",
            *ec,
            "-keyout",
            str(tmp_path / f"{name}.key"),
            "-out",
            str(tmp_path / f"{name}.csr"),
            "-subj",
            f"/CN={name}",
        )
        extension = tmp_path / f"{name}.ext"
        extension.write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(tmp_path / f"{name}.csr"),
            "-CA",
            str(tmp_path / "ca.pem"),
            "-CAkey",
            str(tmp_path / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(tmp_path / f"{name}.pem"),
            "-days",
            "1",
            "-extfile",
            str(extension),
        )
    config = make_config(
        tiny_repository,
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
    )
    ca = (tmp_path / "ca.pem").read_bytes()
    with running(config) as server:
        assert server.port
        trusted = Client(
            server.port,
            grpc.ssl_channel_credentials(
                ca, (tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes()
            ),
        )
        assert trusted.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=10).translations
        trusted.close()
        for credentials in (grpc.ssl_channel_credentials(ca), None):  # no client certificate; plaintext
            stranger = Client(server.port, credentials)
            with pytest.raises(grpc.RpcError) as failure:
                stranger.translator.Translate(pb.TranslateRequest(texts=["the cat"]), timeout=5)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            stranger.close()
        # /metrics is served with the same certificate and client CA.
        url = f"https://localhost:{server.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            assert b"translator_requests_total" in answer.read()
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))  # no client certificate
        for attempt in (lambda: urllib.request.urlopen(url, context=anonymous, timeout=10),
                        lambda: urllib.request.urlopen(url.replace("https", "http"), timeout=10)):
            with pytest.raises((OSError, http.client.HTTPException)):
                attempt().read()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_key_that_does_not_match_its_certificate_is_named_at_start_up(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """gRPC only says "Failed to bind" (the cause went to its own stderr): the server names the files and
    the cause in its one error line, and exits 1."""
    import json
    import sys

    from tests.conftest import ROOT

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    for name in ("first", "second"):
        _openssl("req", "-x509", *ec, "-keyout", str(tmp_path / f"{name}.key"), "-out",
                 str(tmp_path / f"{name}.pem"), "-subj", f"/CN={name}")
    (tmp_path / "not-a-ca.pem").write_text("not a certificate\n")
    cases = [
        (["--tls-cert", str(tmp_path / "first.pem"), "--tls-key", str(tmp_path / "second.key")],
         "cannot serve TLS"),
        (["--tls-cert", str(tmp_path / "first.pem"), "--tls-key", str(tmp_path / "first.key"),
          "--tls-client-ca", str(tmp_path / "not-a-ca.pem")], "holds no usable certificate"),
    ]
    for flags, cause in cases:
        command = [sys.executable, "-m", "service.server.app", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--http-port", "0", "--model-repository", str(tiny_repository),
                   "--model", "tiny"]
        command += flags
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr[-2000:]
        entries = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"')]
        [failure] = [entry for entry in entries if entry.get("message") == "cannot serve"]
        assert cause in failure["error"] and flags[-1] in failure["error"], failure
        assert "Failed to bind" not in failure["error"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_missing_or_encrypted_key_is_named_without_a_prompt(tmp_path: Path) -> None:
    from service.server.tls import check_tls_files

    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "1",
             "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-subj", "/CN=x",
             "-passout", "pass:secret")
    with pytest.raises(ValueError, match="key.pem is encrypted"):
        check_tls_files(tmp_path / "cert.pem", tmp_path / "key.pem", None)
    with pytest.raises(ValueError, match="--tls-key .*missing.pem: no such file"):
        check_tls_files(tmp_path / "cert.pem", tmp_path / "missing.pem", None)
