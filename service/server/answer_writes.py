"""Writing a stream's messages to a client that may stop reading them.

gRPC keeps a message its client has not taken yet (HTTP/2 flow control) in its own memory, and a write waits
for the client for as long as the call lasts; grpc.aio has no way for a handler to cancel its own call. A
client that reads the first message and freezes would otherwise hold its translation slot, the answer being
built and gRPC's copy of it for as long as it stays connected (256 such clients held 4.8 GB and half the
slots). So:

- each write has `--write-timeout-s`: past it the call ends on our side (slot, job and Python objects freed;
  the client, if it reads again, gets DEADLINE_EXCEEDED naming the setting);
- what gRPC still holds for such clients is bounded by `--max-unread-bytes`: a large message is written only
  while the messages not yet taken by their clients fit; otherwise the call gets RESOURCE_EXHAUSTED. The bytes
  are given back when the write completes, or for a timed-out one when gRPC ends the call (the client read it
  or went away).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import Message

from service.scheduler.status import RequestFailed, Status

log = logging.getLogger("translator.rpc")

# Messages below this size (token events, answers without maps) never wait for the budget: 256 slots of them
# are a few MiB at most. They are still counted.
SMALL_MESSAGE_BYTES = 64 * 1024


class SlowReader(Exception):
    """A write the client did not take within --write-timeout-s."""

    def __init__(self, timeout_s: float, written: int) -> None:
        super().__init__(
            f"the client did not read the answer for {timeout_s:g} s (--write-timeout-s); the call was ended "
            f"after {written} messages"
        )


class ClientGone(Exception):
    """The client went away while a message was being written."""


class UnreadAnswers:
    """The bytes of answer messages handed to gRPC that their clients have not taken yet (event-loop only)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def take(self, size: int) -> None:
        """Count `size` more bytes, or RESOURCE_EXHAUSTED when a large message would pass the limit (one
        message larger than the limit still goes out when nothing else is held)."""
        if size >= SMALL_MESSAGE_BYTES and self.held_bytes and self.held_bytes + size > self.limit_bytes:
            raise RequestFailed(
                Status.RESOURCE_EXHAUSTED,
                f"answers not yet read by their clients hold {self.held_bytes} bytes; this {size}-byte "
                f"message would pass --max-unread-bytes={self.limit_bytes}; retry later",
            )
        self.held_bytes += size

    def give_back(self, size: int) -> None:
        self.held_bytes -= size


async def write(
    context: grpc.aio.ServicerContext, message: Message, unread: UnreadAnswers, timeout_s: float, written: int
) -> None:
    """Write one message of a stream within `timeout_s`; SlowReader past it, ClientGone if the call ended.

    `written`: messages of this call already written (for the message)."""
    size = message.ByteSize()
    unread.take(size)
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the call's own cancellation when the
        # write completes at the same moment, and the handler would then go on for a client that is gone.
        async with asyncio.timeout(timeout_s):
            await context.write(message)
    except TimeoutError:
        # gRPC still holds the message: its bytes stay counted until gRPC ends the call.
        context.add_done_callback(lambda _: unread.give_back(size))
        raise SlowReader(timeout_s, written) from None
    except asyncio.CancelledError:
        unread.give_back(size)
        raise
    except Exception as error:  # the call ended under the write: the client cancelled or disconnected
        unread.give_back(size)
        if context.done() or context.cancelled():
            raise ClientGone() from None
        raise error
    unread.give_back(size)
