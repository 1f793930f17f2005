"""The lane process: `python -m service.engine.lane_worker FD`, FD its end of the engine's socket pair.

It loads a `Runner` and then does what the parent's messages (service.engine.lane_messages) ask: a search
answered row by row, or a running batch driven one message at a time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

from service.core.search import Hypothesis
from service.engine import lane_messages as msg
from service.engine.onnx_runtime import CUDA, CUDA_FAILED, choose_providers, flush_denormals_on_this_thread
from service.engine.runner import Runner

log = logging.getLogger("translator.engine")



def main(argv: list[str] | None = None) -> None:
    # The server stops its lanes itself once its in-flight calls are answered: a SIGTERM or Ctrl-C sent to
    # the whole process group must not take them away first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    try:
        load = conn.recv()
    except EOFError:
        return
    assert isinstance(load, msg.Load)
    try:
        runner = Runner(
            load.model, choose_providers(load.device), load.threads, load.spinning, load.io_binding,
            load.step_graph,
        )
    except Exception as error:  # reported to the parent, which raises it as the load error it is
        conn.send(msg.Failed(f"{type(error).__name__}: {error}"))
        return
    if load.device == "cuda" and runner.provider != CUDA:  # asked for CUDA, a lane never falls back
        conn.send(msg.Failed(f"device 'cuda' asked for, but onnxruntime could not start its CUDA provider "
                             f"({CUDA_FAILED})"))
        return
    # This process runs nothing but the search: its thread may flush denormals for good (after the sessions
    # are built: building one resets the building thread's setting).
    flush_denormals_on_this_thread()
    conn.send(msg.Ready(os.getpid(), runner.provider, runner.io_binding))
    serve(conn, runner)


class TokenBuffer:
    """A step's tokens, sent as one `Tokens` message before anything else the lane sends."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.rows: list[int] = []
        self.token_ids: list[int] = []

    def add(self, row: int, token_id: int) -> None:
        self.rows.append(row)
        self.token_ids.append(int(token_id))

    def send(self, message: object) -> None:
        """`message`, after the tokens gathered so far."""
        self.flush()
        self.conn.send(message)

    def flush(self) -> None:
        if self.rows:
            self.conn.send(msg.Tokens(self.rows, self.token_ids))
            self.rows, self.token_ids = [], []


def serve(conn: Connection, runner: Runner) -> None:
    """Answer the parent's messages until it says stop or goes away."""
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if isinstance(message, msg.Stop):
            return
        if isinstance(message, msg.OpenBatch):
            if _run_batch(conn, runner, message):
                return
        elif isinstance(message, msg.Search):
            if _run_search(conn, runner, message):
                return
        # anything else: an Abandon that came after its search ended


def _run_search(conn: Connection, runner: Runner, request: msg.Search) -> bool:
    """One search, answered row by row; True when a stop came in meanwhile."""
    stopping = False
    abandoned = set(request.abandoned)
    last_poll = 0.0
    out = TokenBuffer(conn)

    def is_abandoned(row: int) -> bool:
        nonlocal last_poll, stopping
        out.flush()  # asked before each step: the last step's tokens go now
        now = time.monotonic()
        if now - last_poll >= msg.ABANDON_POLL_S:
            last_poll = now
            while conn.poll():
                message = conn.recv()
                if isinstance(message, msg.Abandon):
                    abandoned.update(message.rows)
                elif isinstance(message, msg.Stop):
                    stopping = True
        return stopping or row in abandoned

    token_rows = set(request.token_rows)

    def on_token(row: int, token_id: int) -> None:
        if row in token_rows:
            out.add(row, token_id)

    def on_done(row: int, hypothesis: Hypothesis) -> None:
        out.send(msg.Done(row, hypothesis))

    try:
        searched = runner.search(
            request.sources,
            request.options,
            request.max_length_limit,
            on_token=on_token if token_rows else None,
            is_abandoned=is_abandoned,
            on_done=on_done,
        )
    except Exception as error:  # the lane survives a failed search; its parent fails that batch
        log.exception("lane search failed")
        out.send(msg.Failed(f"{type(error).__name__}: {error}"))
        return stopping
    out.send(msg.SearchEnd(searched.times.encode_s, searched.times.decode_s))
    return stopping


def _run_batch(conn: Connection, runner: Runner, request: msg.OpenBatch) -> bool:
    """A running batch driven by the parent one message at a time: `Join` adds rows (answered `Joined`),
    `Step` decodes one position (answered by the rows' tokens and results, then `Stepped`), `CloseBatch`
    ends it. True when a stop came in (or the parent left)."""
    abandoned: set[int] = set()
    token_rows: set[int] = set()
    out = TokenBuffer(conn)

    def on_token(row: object, token_id: int) -> None:
        if row in token_rows:
            out.add(row, token_id)  # type: ignore[arg-type]

    def on_done(row: object, hypothesis: Hypothesis) -> None:
        token_rows.discard(row)  # type: ignore[arg-type]
        out.send(msg.Done(row, hypothesis))  # type: ignore[arg-type]

    batch = runner.running_batch(
        request.options, on_token=on_token, on_done=on_done, is_abandoned=abandoned.__contains__
    )
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return True
        try:
            if isinstance(message, msg.Join):
                token_rows.update(message.token_rows)
                encode_s = batch.add(message.rows, message.sources, message.max_lengths)  # type: ignore[arg-type]
                out.send(msg.Joined(encode_s))
            elif isinstance(message, msg.Step):
                abandoned.update(message.abandoned)
                token_rows.difference_update(message.abandoned)
                decode_s = batch.step()
                abandoned.clear()  # the step dropped them for good
                out.send(msg.Stepped(batch.size, decode_s))
            elif isinstance(message, msg.CloseBatch):
                return False
            elif isinstance(message, msg.Stop):
                return True
        except Exception as error:  # the lane survives; its parent fails the batch's rows
            log.exception("lane running batch failed")
            out.send(msg.Failed(f"{type(error).__name__}: {error}"))
            return False


if __name__ == "__main__":
    main()
