"""Container health check of translator-serve: exit 0 when its grpc.health.v1 service answers SERVING.

The images run it as their HEALTHCHECK (`python /opt/translator/healthcheck.py`); it needs only grpcio and
grpcio-health-checking, which the server depends on anyway. It reads the server's own settings:
TRANSLATOR_PORT (default 8001) and TRANSLATOR_HOST (a wildcard address means loopback). Optional:
TRANSLATOR_HEALTHCHECK_SERVICE (the health service name; "" = the whole server, the default) and
TRANSLATOR_HEALTHCHECK_TIMEOUT_S (default 3). Plaintext only, like Kubernetes' gRPC probes: a server started
with --tls-cert needs another check (a mesh sidecar, or grpc_health_probe with -tls flags).

Exit status: 0 SERVING; 1 NOT_SERVING (loading the model, or shutting down), unknown service, or no answer.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def target() -> str:
    host = os.environ.get("TRANSLATOR_HOST", "").strip()
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("TRANSLATOR_PORT", "").strip() or "8001"
    return f"{host}:{port}"


def main() -> int:
    address = target()
    service = os.environ.get("TRANSLATOR_HEALTHCHECK_SERVICE", "")
    timeout = float(os.environ.get("TRANSLATOR_HEALTHCHECK_TIMEOUT_S", "") or 3.0)
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as error:
        print(f"unhealthy: {address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address} service={service!r}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
