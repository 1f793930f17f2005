"""TLS for the server's two ports: the gRPC credentials and the /metrics context from one certificate, key and
client CA, checked before any port is bound so that a bad file is named with its cause."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from service.server.config import ServerConfig
from service.server.metrics_http import server_ssl_context


def server_credentials_configured(config: ServerConfig) -> bool:
    return config.tls_cert is not None and config.tls_key is not None


def check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the certificate, key and client CA as a TLS server would, and raise ValueError naming the file
    and the cause when they cannot serve: gRPC itself only reports that it failed to bind."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")

    def no_pass_phrase() -> str:  # else OpenSSL would prompt on the terminal and hold the start
        raise ValueError(f"--tls-key {key} is encrypted: the server needs an unencrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=no_pass_phrase)
    except (ssl.SSLError, OSError) as error:
        cause = (error.reason if isinstance(error, ssl.SSLError) else None) or str(error)
        raise ValueError(f"--tls-cert {cert} and --tls-key {key} cannot serve TLS: {cause}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as error:
            cause = error.reason or str(error)
            raise ValueError(f"--tls-client-ca {client_ca} holds no usable certificate: {cause}") from None


def http_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """/metrics over HTTPS with the gRPC port's certificate (and its client CA) when gRPC has TLS."""
    if not server_credentials_configured(config):
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    client_ca = None if config.tls_client_ca is None else str(config.tls_client_ca)
    return server_ssl_context(str(config.tls_cert), str(config.tls_key), client_ca)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not server_credentials_configured(config):
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    check_tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
