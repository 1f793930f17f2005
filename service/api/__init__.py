"""Python code generated from the .proto files under proto/ (see proto/README.md).

Regenerate with `python -m service.api.generate`; never edit the generated modules by hand.

- ``service.api.translator.v1.translator_pb2`` / ``translator_pb2_grpc``: the translator's own API.
- ``service.api.inference.grpc_service_pb2`` / ``grpc_service_pb2_grpc``: the KServe v2 inference protocol.
"""
