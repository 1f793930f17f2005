"""The one exception a request fails with: a gRPC status code and a message meant for the client."""

from __future__ import annotations

import grpc


class RequestFailed(Exception):
    """Answer the call with `code` and `message`; raised anywhere below the RPC handlers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RequestFailed({self.code.name}, {self.message!r})"


def invalid(message: str) -> RequestFailed:
    return RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, message)
