"""How a request ended, in the scheduler's own words; the server maps each to a gRPC status once
(service.server.accounting)."""

from __future__ import annotations

from enum import Enum


class Status(Enum):
    """Outcomes of a request, named as gRPC names them (the names are the `code` label of the metrics)."""

    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request itself is wrong: the message says what
    NOT_FOUND = "NOT_FOUND"  # no such model or version
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # too much at once (queue, slots, answer size): retry later
    UNAVAILABLE = "UNAVAILABLE"  # loading or shutting down: retry elsewhere or later
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"  # the client gave up
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no valid bearer token
    INTERNAL = "INTERNAL"  # our fault


class RequestFailed(Exception):
    """Answer the request with `code` and `message` (meant for the client); raised anywhere below the
    handlers."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RequestFailed({self.code.name}, {self.message!r})"


def invalid(message: str) -> RequestFailed:
    return RequestFailed(Status.INVALID_ARGUMENT, message)
