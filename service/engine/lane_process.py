"""Decoding lanes as processes: each lane process holds its own `Runner` and runs the search of its part of a
batch, so its Python never waits for the GIL of another lane or of the server's gRPC loop and batcher.

Between steps a search runs Python (argmax, finished rows, feeds); in one process every such stretch waits
for the interpreter lock that gRPC, the batcher and the other lanes hold in turn, and the lane's core idles
meanwhile (docs/decisions/lane-processes.md). A lane process owns its interpreter: the parent sends it the
source ids and options of its rows, and it answers row by row (service.engine.lane_messages; the lane's own
side is service.engine.lane_worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TypeVar

from service.core.model_format import ModelLoadError
from service.core.options import TranslateOptions
from service.core.search import Hypothesis
from service.engine import lane_messages as msg
from service.engine.onnx_runtime import CUDA
from service.engine.timing import Searched, StageTimes

log = logging.getLogger("translator.engine")

# A fork of a process already running gRPC and onnxruntime threads may inherit locks held by them: a lane
# is a fresh interpreter that finds the `service` package where this one did.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# The lane's command line, before the number of its socket's file descriptor.
LANE_COMMAND = [sys.executable, "-m", "service.engine.lane_worker"]
START_TIMEOUT_S = 120.0

Reply = TypeVar("Reply")


def _child_environment() -> dict[str, str]:
    environment = dict(os.environ)
    path = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = f"{PACKAGE_ROOT}{os.pathsep}{path}" if path else str(PACKAGE_ROOT)
    return environment


class LaneFailed(RuntimeError):
    """A lane process failed a search (an error inside it), or no lane can be had."""


class LaneLost(LaneFailed):
    """A lane process died (killed, out of memory) with rows of the caller's still undecided: `rows`, the
    caller's rows it could not answer (None: every row of a running batch). The lane is being replaced, so
    the request can be retried; `detail` (process id, exit code) is for the log, not for clients."""

    def __init__(self, rows: list[int] | None, detail: str) -> None:
        super().__init__(detail)
        self.rows = rows
        self.detail = detail


class LaneProcess:
    """One lane process (`python -m service.engine.lane_worker`) and the parent's end of its socket.

    Started as a fresh interpreter rather than through multiprocessing's spawn, which would re-run the
    caller's main script in the child.
    """

    def __init__(self, load: msg.Load, index: int) -> None:
        model = load.model
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [*LANE_COMMAND, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=_child_environment(),
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.pid: int = self.process.pid
        self.conn.send(load)
        if not self.conn.poll(START_TIMEOUT_S):
            self.close()
            raise ModelLoadError(
                f"{model.path}: lane process {index} did not start in {START_TIMEOUT_S:.0f} s"
            )
        try:
            message = self.conn.recv()
        except EOFError:
            message = msg.Failed(f"exited with code {self.process.wait()} while loading")
        if not isinstance(message, msg.Ready):
            self.close()
            reason = message.reason if isinstance(message, msg.Failed) else repr(message)
            raise ModelLoadError(f"{model.path}: lane process {index} could not load the model ({reason})")
        self.provider = message.provider
        self.io_binding = message.io_binding

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError, ValueError):  # already gone
            self.conn.send(msg.Stop())
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.conn.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class ProcessLanes:
    """`count` lane processes; a search takes as many of them as it has parts, and waits for free ones.

    A lane found dead (after its search, or while idle) is replaced in the background, so that the batch it
    failed is answered at once; searches wait for the replacement.
    """

    def __init__(self, load: msg.Load, count: int) -> None:
        self._load = load
        self._lock = threading.Condition()
        self._free: list[LaneProcess] = []
        self._all: list[LaneProcess] = []
        self._closed = False
        self._next_index = 0
        self._waiting: list[object] = []  # callers waiting for free lanes, first come first served
        try:
            self._all.append(self._start())
            # What the first lane got ("auto" may have meant the CPU): the others, and every lane started in
            # place of a dead one, insist on the same (a lane told "cuda" fails rather than fall back).
            self.provider = self._all[0].provider
            self.io_binding = self._all[0].io_binding
            device = "cuda" if self.provider == CUDA else "cpu"
            self._load = msg.Load(
                load.model, device, load.threads, load.spinning, load.io_binding, load.step_graph
            )
            for _ in range(count - 1):
                self._all.append(self._start())
        except BaseException:
            self.close()
            raise
        self._free = list(self._all)

    def _start(self) -> LaneProcess:
        with self._lock:
            index, self._next_index = self._next_index, self._next_index + 1
        return LaneProcess(self._load, index)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [lane.pid for lane in self._all]

    @property
    def count(self) -> int:
        """Lane processes running or being replaced."""
        with self._lock:
            return len(self._all)

    @property
    def waiting(self) -> int:
        """Callers waiting for free lanes: a running batch stops taking joiners while there are any, so
        that it ends and gives its lane up."""
        with self._lock:
            return len(self._waiting)

    def _acquire(self, count: int) -> list[LaneProcess]:
        ticket = object()
        with self._lock:
            self._waiting.append(ticket)
            try:
                while True:
                    if self._closed:
                        raise LaneFailed("the engine's lane processes are stopped")
                    if count > len(self._all):
                        raise LaneFailed(f"{count} lane processes wanted, {len(self._all)} running")
                    for lane in [lane for lane in self._free if not lane.alive()]:  # died while idle
                        self._free.remove(lane)
                        self._replace_later(lane)
                    # In turn: a worker that just gave a lane back must not take it again ahead of one
                    # that has waited for it.
                    if self._waiting[0] is ticket and len(self._free) >= count:
                        taken, self._free = self._free[:count], self._free[count:]
                        return taken
                    self._lock.wait()
            finally:
                self._waiting.remove(ticket)
                self._lock.notify_all()  # the next in turn may go now

    def _release(self, lanes: list[LaneProcess]) -> None:
        closing = []
        with self._lock:
            for lane in reversed(lanes):
                if not lane.alive():
                    self._replace_later(lane)
                elif self._closed:
                    closing.append(lane)
                else:
                    self._free.insert(0, lane)  # the lanes used last go first: their caches are warm
            self._lock.notify_all()
        for lane in closing:
            lane.close()

    def _replace_later(self, lane: LaneProcess) -> None:
        """Start another lane in place of a dead one, on a thread of its own (called with the lock held)."""
        log.error("lane process %d exited (code %s): starting another", lane.pid, lane.exitcode)
        threading.Thread(target=self._replace, args=(lane,), name="lane-restart", daemon=True).start()

    def _replace(self, dead: LaneProcess) -> None:
        dead.close()
        try:
            fresh: LaneProcess | None = self._start()
        except Exception:  # logged; the searches that need more lanes than remain fail with LaneFailed
            log.exception("could not start a lane process in place of %d", dead.pid)
            fresh = None
        with self._lock:
            closed = self._closed
            if fresh is None or closed:
                self._all.remove(dead)
            else:
                self._all[self._all.index(dead)] = fresh
                self._free.insert(0, fresh)
            self._lock.notify_all()
        if fresh is not None and closed:
            fresh.close()

    @contextlib.contextmanager
    def _taken(self, count: int) -> Iterator[list[LaneProcess]]:
        lanes = self._acquire(count)
        try:
            yield lanes
        finally:
            self._release(lanes)

    def search(
        self,
        parts: list[list[int]],
        sources: list[list[int]],
        options: TranslateOptions,
        max_length_limit: int,
        on_token: Callable[[int, int], object] | None,
        is_abandoned: Callable[[int], bool] | None,
        on_done: Callable[[int, Hypothesis], object] | None,
        wants_tokens: Callable[[int], bool] | None = None,
    ) -> Searched:
        """Each part's rows searched by its own lane process: the hypotheses in the caller's row order
        (None: abandoned) and the lanes' summed encoder and decoder seconds. Tokens cross only for the rows
        `wants_tokens` names (None: every row, when there is an `on_token`).

        The rows of a lane that dies are searched again once, on a lane that lives, unless their tokens
        have already gone to `on_token` (a second run would send them twice); what is still unanswered
        then raises `LaneLost` naming those rows (every other row has been answered through `on_done`)."""
        run = _Search(len(sources), on_token, is_abandoned, on_done, wants_tokens)
        self._run(run, parts, sources, options, max_length_limit)
        lost = run.lost_rows()
        if lost:
            log.warning("lane lost: %s; %d rows unanswered", "; ".join(run.deaths), len(lost))
            again = [row for row in lost if row not in run.streamed]
            if again:
                try:
                    self._run(run, [again], sources, options, max_length_limit)
                except LaneFailed as error:
                    if run.failures:  # an error inside the lane that ran them again
                        raise
                    # No lane left to run them (every one died, none could be started): still a lost lane.
                    detail = f"{'; '.join(run.deaths)}; none left to search again: {error}"
                    raise LaneLost(sorted(set(lost)), detail) from error
            unanswered = sorted(set(lost) - set(again)) + run.lost_rows()
            if unanswered:
                raise LaneLost(sorted(set(unanswered)), "; ".join(run.deaths) or "lane process died")
        return Searched(run.results, run.times)

    def _run(
        self,
        run: _Search,
        parts: list[list[int]],
        sources: list[list[int]],
        options: TranslateOptions,
        max_length_limit: int,
    ) -> None:
        with self._taken(len(parts)) as lanes:
            try:
                for lane, rows in zip(lanes, parts, strict=True):
                    run.start(lane, rows, [sources[row] for row in rows], options, max_length_limit)
                while run.running:
                    for conn in wait(list(run.running), timeout=msg.ABANDON_POLL_S):
                        run.receive(conn)
                    run.tell_abandoned()
            finally:
                run.drain()
            if run.failures:
                raise LaneFailed("; ".join(run.failures))

    def close(self) -> None:
        """Stop the idle lanes now; a lane still searching stops when its search ends."""
        with self._lock:
            self._closed = True
            idle, self._free = self._free, []
            self._lock.notify_all()
        for lane in idle:
            lane.close()


class ProcessRunningBatch:
    """A running batch on one lane process of `lanes`, held until `close`, with `TimedRunningBatch`'s
    interface (`add` returns the encoder seconds, `step` the decoder seconds, `size`, `close`): each call is
    one message to the lane and waits for its answer, so the caller decides between steps who joins, as with
    a batch of its own. The caller's keys stay here; the lane knows its rows by number. Tokens cross only
    for the rows `wants_tokens` names (None: every row)."""

    def __init__(
        self,
        lanes: ProcessLanes,
        options: TranslateOptions,
        on_token: Callable[[object, int], object] | None,
        on_done: Callable[[object, Hypothesis], object] | None,
        is_abandoned: Callable[[object], bool] | None,
        wants_tokens: Callable[[object], bool] | None,
    ) -> None:
        (lane,) = lanes._acquire(1)
        try:
            lane.conn.send(msg.OpenBatch(options))
        except OSError as error:
            lane.kill()  # dead or broken: _release starts another
            lanes._release([lane])
            raise LaneLost(None, f"lane process {lane.pid} is gone ({error})") from error
        self._lanes, self._lane = lanes, lane
        self.on_token, self.on_done, self.is_abandoned = on_token, on_done, is_abandoned
        self._wants_tokens = wants_tokens
        self._keys: dict[int, object] = {}  # running rows: lane row number -> the caller's key
        self._next_row = 0
        self._open = True
        self._awaiting: type | None = None  # the answer to a message sent and not yet read to its end
        self.size = 0

    @property
    def pid(self) -> int:
        """The lane process running this batch."""
        return self._lane.pid

    def running_keys(self) -> list[object]:
        """The caller's keys of the rows still decoding (neither done nor abandoned)."""
        return list(self._keys.values())

    def add(self, keys: list[object], sources: list[list[int]], max_lengths: list[int]) -> float:
        rows = list(range(self._next_row, self._next_row + len(keys)))
        self._next_row += len(keys)
        self._keys.update(zip(rows, keys, strict=True))
        wanted = self._wants_tokens
        token_rows = [] if self.on_token is None else [
            row for row, key in zip(rows, keys, strict=True) if wanted is None or wanted(key)
        ]
        joined = self._ask(msg.Join(rows, sources, max_lengths, token_rows), msg.Joined)
        self.size += len(keys)
        return joined.encode_s

    def step(self) -> float:
        gone = [] if self.is_abandoned is None else [
            row for row, key in self._keys.items() if self.is_abandoned(key)
        ]
        for row in gone:  # the lane drops them before this step and never answers for them
            del self._keys[row]
        stepped = self._ask(msg.Step(gone), msg.Stepped)
        self.size = stepped.running
        return stepped.decode_s

    def close(self) -> None:
        """Give the lane back (after telling it the batch is over, unless it failed or died)."""
        if not self._open:
            return
        self._open = False
        try:
            if self._awaiting is not None:  # a callback raised mid-answer: read the rest, or give up the lane
                while self._lane.conn.poll(START_TIMEOUT_S):
                    reply = self._lane.conn.recv()
                    if isinstance(reply, (self._awaiting, msg.Failed)):
                        break
                else:
                    self._lane.kill()
            if self._lane.alive():
                self._lane.conn.send(msg.CloseBatch())
        except (EOFError, OSError):
            pass  # dead: _release starts another
        self._lanes._release([self._lane])

    def _ask(self, message: object, answer: type[Reply]) -> Reply:
        """Send one message; deliver the rows' tokens and results until its answer comes. A callback that
        raises leaves the rest of the answer unread (`close` reads it)."""
        if not self._open:
            raise LaneFailed("the running batch is closed")
        self._awaiting = answer
        self._transport(lambda: self._lane.conn.send(message))
        while True:
            reply = self._transport(self._lane.conn.recv)
            if isinstance(reply, msg.Tokens):
                if self.on_token is not None:
                    for row, token_id in zip(reply.rows, reply.token_ids, strict=True):
                        self.on_token(self._keys[row], token_id)
            elif isinstance(reply, msg.Done):
                key = self._keys.pop(reply.row)
                if self.on_done is not None:
                    self.on_done(key, reply.hypothesis)
            elif isinstance(reply, answer):
                self._awaiting = None
                return reply
            elif isinstance(reply, msg.Failed):  # the lane left the batch and is free again
                self._awaiting = None
                self._open = False
                self._lanes._release([self._lane])
                raise LaneFailed(f"lane process {self._lane.pid}: {reply.reason}")

    def _transport(self, call: Callable[[], Any]) -> Any:
        """One send or receive on the lane's socket; a broken socket is a dead lane (only there: an OSError
        raised by a callback is the callback's)."""
        try:
            return call()
        except (EOFError, OSError) as error:
            self._awaiting = None
            self._open = False
            # Make sure it is dead (a killed process is not reaped at once, and one that still looks alive
            # would go back to the free lanes), so that it is replaced.
            self._lane.kill()
            self._lanes._release([self._lane])
            detail = f"lane process {self._lane.pid} exited (code {self._lane.exitcode})"
            raise LaneLost(None, detail) from error


class _Search:
    """The parent's side of one search over some lanes: what each lane was sent, what came back."""

    def __init__(
        self,
        size: int,
        on_token: Callable[[int, int], object] | None,
        is_abandoned: Callable[[int], bool] | None,
        on_done: Callable[[int, Hypothesis], object] | None,
        wants_tokens: Callable[[int], bool] | None = None,
    ) -> None:
        self.results: list[Hypothesis | None] = [None] * size
        self.on_token, self.is_abandoned, self.on_done = on_token, is_abandoned, on_done
        self.wants_tokens = wants_tokens
        # By connection: the lane and the caller's row of each of its rows, then the rows it was told to drop.
        self.running: dict[Connection, tuple[LaneProcess, list[int]]] = {}
        self.told: dict[Connection, set[int]] = {}
        self.times = StageTimes()
        self.failures: list[str] = []  # errors raised inside a lane's search
        self.deaths: list[str] = []  # lanes that died (for the log)
        self.dead_rows: list[int] = []  # the caller's rows of the lanes that died
        self.streamed: set[int] = set()  # rows whose tokens have gone to on_token
        self.last_check = 0.0

    def lost_rows(self) -> list[int]:
        """Rows of dead lanes with no result that the caller still wants; forgotten once asked for."""
        dropped = self.is_abandoned
        lost = [r for r in self.dead_rows if self.results[r] is None and not (dropped and dropped(r))]
        self.dead_rows = []
        return lost

    def _died(self, lane: LaneProcess, conn: Connection, rows: list[int]) -> None:
        lane.kill()  # reaped now, so that it is not taken for alive and put back among the free lanes
        self.deaths.append(f"lane process {lane.pid} exited (code {lane.exitcode})")
        self.dead_rows += rows
        self.running.pop(conn, None)

    def start(
        self, lane: LaneProcess, rows: list[int], part: list[list[int]], options: TranslateOptions, limit: int
    ) -> None:
        # Rows abandoned already go with the search, so that none of them takes a step.
        dropped, wanted = self.is_abandoned, self.wants_tokens
        gone = [] if dropped is None else [i for i, row in enumerate(rows) if dropped(row)]
        token_rows = [] if self.on_token is None else [
            i for i, row in enumerate(rows) if wanted is None or wanted(row)
        ]
        self.running[lane.conn] = (lane, rows)  # before sending: `drain` waits for whatever was sent
        self.told[lane.conn] = set(gone)
        try:
            lane.conn.send(msg.Search(part, options, limit, token_rows, gone))
        except OSError:
            self._died(lane, lane.conn, rows)

    def receive(self, conn: Connection) -> None:
        lane, rows = self.running[conn]
        try:
            message = conn.recv()
        except (EOFError, OSError):  # OSError: it died with a message unread
            self._died(lane, conn, rows)
            return
        if isinstance(message, msg.Tokens):
            if self.on_token is not None:
                for row, token_id in zip(message.rows, message.token_ids, strict=True):
                    self.streamed.add(rows[row])
                    self.on_token(rows[row], token_id)
        elif isinstance(message, msg.Done):
            row = rows[message.row]
            self.results[row] = message.hypothesis
            if self.on_done is not None:
                self.on_done(row, message.hypothesis)
        elif isinstance(message, msg.SearchEnd):
            self.times.add(message.encode_s, message.decode_s)
            del self.running[conn]
        elif isinstance(message, msg.Failed):
            self.failures.append(f"lane process {lane.pid}: {message.reason}")
            del self.running[conn]

    def tell_abandoned(self) -> None:
        """Every msg.ABANDON_POLL_S at most: the running rows the caller gave up, to their lanes."""
        now = time.monotonic()
        if self.is_abandoned is None or now - self.last_check < msg.ABANDON_POLL_S:
            return
        self.last_check = now
        for conn, (_, rows) in self.running.items():
            told = self.told[conn]
            newly = [
                local
                for local, row in enumerate(rows)
                if self.results[row] is None and local not in told and self.is_abandoned(row)
            ]
            if newly:
                told.update(newly)
                with contextlib.suppress(OSError):  # a lane that died: its EOF comes next
                    conn.send(msg.Abandon(newly))

    def drain(self) -> None:
        """A callback that raised leaves lanes mid-search: drop their rows and wait for their end, so that
        the next search on them starts clean."""
        for lane, rows in self.running.values():
            _drain(lane, len(rows))


def _drain(lane: LaneProcess, rows: int) -> None:
    try:
        lane.conn.send(msg.Abandon(list(range(rows))))
        while lane.conn.poll(START_TIMEOUT_S):
            if isinstance(lane.conn.recv(), (msg.SearchEnd, msg.Failed)):
                return
    except (EOFError, OSError):
        pass
    lane.kill()  # silent or broken: _release starts another
