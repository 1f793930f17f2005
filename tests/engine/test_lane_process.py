"""Decoding lanes in processes of their own (service.engine.lane_process): same results as lanes in threads,
streaming, abandoned rows, a lane that dies, a callback that fails, and closing."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from bench.load_driver import DEFAULT_SENTENCES, read_sentences
from service.core.options import TranslateOptions
from service.engine.engine import Engine
from service.engine.lane_process import LaneFailed, LaneLost, ProcessRunningBatch
from tests.conftest import DEFAULT_MODEL, DEFAULT_REPOSITORY
from tests.support.processes import process_alive

SENTENCES = read_sentences(DEFAULT_SENTENCES)[:48]  # bench/data/test_sentences.txt


@pytest.fixture(scope="module")
def threads_engine() -> Engine:
    return Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2)


@pytest.fixture(scope="module")
def process_engine() -> Iterator[Engine]:
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    yield engine
    engine.close()


def test_a_parent_with_lane_processes_loads_no_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lanes hold the sessions; the parent only plans and dispatches (and still answers)."""
    import service.engine.runner as runner_module

    made: list[object] = []
    real = runner_module.make_session

    def counted(*args: object, **kwargs: object) -> object:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "make_session", counted)
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    try:
        assert engine.runner is None and made == []
        assert engine.provider == "CPUExecutionProvider"
        assert all(h is not None for h in engine.search_ids([[5, 6, 2], [7, 2]], TranslateOptions()))
    finally:
        engine.close()
    in_process = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=1)
    assert in_process.runner is not None and len(made) == 3  # encoder, decoder step, select


def test_lanes_are_other_live_processes(process_engine: Engine) -> None:
    assert process_engine.lane_processes is not None
    pids = process_engine.lane_processes.pids
    assert len(pids) == process_engine.lanes == 2
    assert os.getpid() not in pids and all(process_alive(pid) for pid in pids)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_process_lanes_translate_like_thread_lanes(
    threads_engine: Engine, process_engine: Engine, beam_size: int
) -> None:
    options = TranslateOptions(beam_size=beam_size, attention=frozenset({"cross", "decoder_self"}))
    expected = threads_engine.translate(SENTENCES, options, batch_size=16)
    actual = process_engine.translate(SENTENCES, options, batch_size=16)
    for want, got in zip(expected, actual, strict=True):
        assert got.text == want.text and got.token_ids == want.token_ids
        assert got.score == pytest.approx(want.score, abs=1e-6)
        np.testing.assert_allclose(got.cross_attention, want.cross_attention, atol=1e-6)
        np.testing.assert_allclose(got.decoder_self_attention, want.decoder_self_attention, atol=1e-6)


def test_tokens_stream_back_and_every_row_is_delivered(process_engine: Engine) -> None:
    sources = [text.ids for text in process_engine.encode_texts(SENTENCES[:12])]
    streamed: dict[int, list[int]] = {row: [] for row in range(len(sources))}
    delivered: dict[int, list[int]] = {}
    results = process_engine.search_ids(
        sources,
        TranslateOptions(),
        on_token=lambda row, token: streamed[row].append(token),
        on_done=lambda row, hypothesis: delivered.__setitem__(row, list(hypothesis.tokens)),
    )
    assert all(result is not None for result in results)
    assert delivered == {row: list(result.tokens) for row, result in enumerate(results)}
    assert streamed == delivered  # greedy: every token as it is chosen, in the caller's row numbers


def test_abandoned_rows_stop_and_the_others_finish(process_engine: Engine) -> None:
    sources = [text.ids for text in process_engine.encode_texts(SENTENCES[:16])]
    dropped = {1, 6, 11}
    results = process_engine.search_ids(
        sources, TranslateOptions(max_length=200), is_abandoned=lambda row: row in dropped
    )
    assert [row for row, result in enumerate(results) if result is None] == sorted(dropped)
    alone = process_engine.search_ids([sources[0]], TranslateOptions(max_length=200))
    assert list(results[0].tokens) == list(alone[0].tokens)


def test_a_failing_callback_leaves_the_lanes_usable(process_engine: Engine) -> None:
    sources = [text.ids for text in process_engine.encode_texts(SENTENCES[:8])]

    def fail(row: int, hypothesis: object) -> None:
        raise RuntimeError("the caller's callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        process_engine.search_ids(sources, TranslateOptions(), on_done=fail)
    results = process_engine.search_ids(sources, TranslateOptions())
    assert all(result is not None for result in results)


def test_the_rows_of_a_killed_lane_are_searched_again_on_a_live_one(threads_engine: Engine) -> None:
    """A lane dies mid-search (kill -9 as the first row is answered): its unanswered rows run again on the
    other lane, so every row gets its usual translation, and the dead lane is replaced."""
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    try:
        assert engine.lane_processes is not None
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:16])]
        expected = threads_engine.search_ids(sources, TranslateOptions())
        victim = engine.lane_processes.pids[1]
        killed = False

        def kill_once(row: int, hypothesis: object) -> None:
            nonlocal killed
            if not killed:
                killed = True
                os.kill(victim, signal.SIGKILL)

        results = engine.search_ids(sources, TranslateOptions(), on_done=kill_once)
        assert killed and [h.tokens for h in results if h] == [h.tokens for h in expected if h]
        assert all(result is not None for result in results)
        wait_until = time.monotonic() + 30
        while victim in engine.lane_processes.pids and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert victim not in engine.lane_processes.pids and len(engine.lane_processes.pids) == 2
    finally:
        engine.close()


def test_a_killed_lane_whose_tokens_went_out_is_lost_not_repeated() -> None:
    """Rows whose tokens already reached the caller are not searched again (the caller would get them
    twice): they are named in LaneLost, and the lane is replaced for the next search."""
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=1, lane_processes=True)
    try:
        assert engine.lane_processes is not None
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:16])]
        victim = engine.lane_processes.pids[0]
        tokens: dict[int, list[int]] = {row: [] for row in range(16)}

        def kill_at_the_first_token(row: int, token: int) -> None:
            if not any(tokens.values()):
                os.kill(victim, signal.SIGKILL)
            tokens[row].append(token)

        with pytest.raises(LaneLost, match=f"lane process {victim} exited") as lost:
            engine.search_ids(sources, TranslateOptions(max_length=200), on_token=kill_at_the_first_token)
        assert lost.value.rows == [row for row in range(16) if tokens[row]] and lost.value.rows
        assert all(len(got) <= 2 for got in tokens.values())  # nothing sent twice: no second run
        results = engine.search_ids(sources, TranslateOptions())  # waits for the replacement
        assert all(result is not None for result in results)
        assert victim not in engine.lane_processes.pids
    finally:
        engine.close()


def test_a_lane_that_died_while_idle_is_replaced_before_its_next_search() -> None:
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    try:
        assert engine.lane_processes is not None
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:16])]
        expected = engine.search_ids(sources, TranslateOptions())
        victim = engine.lane_processes.pids[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(victim) and time.monotonic() < deadline:
            time.sleep(0.01)
        failed = 0
        for _ in range(4):  # never a stale answer from the lane that went away
            try:
                results = engine.search_ids(sources, TranslateOptions())
            except LaneFailed:
                # Its other threads may still be exiting (not yet reapable) when the next search takes it.
                failed += 1
                continue
            assert [list(r.tokens) for r in results] == [list(r.tokens) for r in expected]
        assert failed <= 1
        assert victim not in engine.lane_processes.pids
    finally:
        engine.close()


def test_close_during_a_search_lets_it_finish_then_stops_every_lane() -> None:
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    assert engine.lane_processes is not None
    pids = engine.lane_processes.pids
    sources = [text.ids for text in engine.encode_texts(SENTENCES[:2])]
    started, results = threading.Event(), []

    def slow_token(row: int, token: int) -> None:
        started.set()
        time.sleep(0.01)

    thread = threading.Thread(
        target=lambda: results.extend(engine.search_ids(sources, TranslateOptions(), on_token=slow_token))
    )
    thread.start()
    assert started.wait(10)
    engine.close()
    thread.join(30)
    assert len(results) == 2 and all(result is not None for result in results)
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(pid) for pid in pids)
    assert engine.lane_processes.pids == pids  # nothing started in their place


def test_close_stops_the_lane_processes() -> None:
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    assert engine.lane_processes is not None
    pids = engine.lane_processes.pids
    engine.close()
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(pid) for pid in pids)
    with pytest.raises(LaneFailed, match="stopped"):
        engine.search_ids([[5, 6, 2]], TranslateOptions())


def test_a_lane_loads_on_the_device_it_is_given() -> None:
    """The device travels to the lane process: asked for CUDA, it runs there or fails, never on the CPU."""
    import onnxruntime as ort

    from service.core.model_format import ModelLoadError, resolve
    from service.engine.lane_messages import Load
    from service.engine.lane_process import ProcessLanes

    model = resolve(DEFAULT_REPOSITORY, DEFAULT_MODEL, None)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        lanes = ProcessLanes(Load(model, "cuda", 1, False, None), 1)
        assert lanes.count == 1
        lanes.close()
        return
    with pytest.raises(ModelLoadError, match=r"lane process 0 could not load the model .*'cuda' asked for"):
        ProcessLanes(Load(model, "cuda", 1, False, None), 1)


def stream_engine() -> Engine:
    return Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)


def test_a_stream_holds_one_lane_and_gives_it_back(threads_engine: Engine) -> None:
    engine = stream_engine()
    try:
        assert engine.lane_processes is not None
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:12])]
        expected = threads_engine.search_ids(sources, TranslateOptions())
        done: dict[int, object] = {}
        tokens: dict[int, list[int]] = {row: [] for row in range(12)}
        stream = engine.running_batch(
            TranslateOptions(),
            on_token=lambda row, token: tokens[row].append(token),
            on_done=lambda row, hypothesis: done.setdefault(row, hypothesis),
            wants_tokens=lambda row: row % 2 == 0,  # only these rows' tokens cross
        )
        engine.join(stream, list(range(6)), sources[:6], TranslateOptions())
        stream.step()
        # While the stream holds one lane, a batch search runs on the other one.
        assert [h.tokens for h in engine.search_ids(sources[:4], TranslateOptions(), lanes=1) if h] == [
            h.tokens for h in expected[:4] if h
        ]
        engine.join(stream, list(range(6, 12)), sources[6:], TranslateOptions())
        while stream.size:
            stream.step()
        stream.close()
        assert [done[row].tokens for row in range(12)] == [h.tokens for h in expected if h]
        assert all(tokens[row] == done[row].tokens for row in range(0, 12, 2))
        assert all(tokens[row] == [] for row in range(1, 12, 2))
        assert len(engine.search_ids(sources, TranslateOptions())) == 12  # both lanes free again
    finally:
        engine.close()


def test_a_lane_killed_mid_stream_fails_it_and_is_replaced() -> None:
    engine = stream_engine()
    try:
        assert engine.lane_processes is not None
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:8])]
        before = set(engine.lane_processes.pids)
        stream = engine.running_batch(TranslateOptions())
        engine.join(stream, list(range(8)), sources, TranslateOptions(max_length=200))
        stream.step()
        assert isinstance(stream, ProcessRunningBatch) and stream.pid in before
        victim = stream.pid
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(LaneFailed, match=f"lane process {victim} exited"):
            while stream.size:
                stream.step()
        stream.close()
        assert all(result is not None for result in engine.search_ids(sources, TranslateOptions()))
        assert victim not in engine.lane_processes.pids and len(engine.lane_processes.pids) == 2
    finally:
        engine.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [RuntimeError, BrokenPipeError])  # an OSError of its own is no dead lane
def test_a_callback_that_raises_mid_step_leaves_the_lane_clean(
    threads_engine: Engine, error: type[Exception]
) -> None:
    engine = stream_engine()
    try:
        assert engine.lane_processes is not None
        pids = engine.lane_processes.pids
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:8])]
        expected = threads_engine.search_ids(sources, TranslateOptions())

        def explode(row: int, token: int) -> None:
            raise error("callback exploded")

        stream = engine.running_batch(TranslateOptions(), on_token=explode)
        engine.join(stream, list(range(8)), sources, TranslateOptions())
        with pytest.raises(error, match="exploded"):
            stream.step()
        stream.close()  # reads the rest of that step's answer before the lane is used again
        assert engine.lane_processes.pids == pids  # nobody was taken for dead and replaced
        for _ in range(2):  # whichever lane comes next answers its own search, nothing stale
            streamed: dict[int, list[int]] = {row: [] for row in range(8)}
            got = engine.search_ids(
                sources,
                TranslateOptions(),
                lanes=1,
                on_token=lambda row, token, into=streamed: into[row].append(token),
            )
            assert [h.tokens for h in got if h] == [h.tokens for h in expected if h]
            assert [streamed[row] for row in range(8)] == [h.tokens for h in expected if h]
    finally:
        engine.close()


def test_abandoned_stream_rows_are_forgotten_on_both_sides() -> None:
    engine = stream_engine()
    try:
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:8])]
        gone: set[int] = set()
        done: list[int] = []
        stream = engine.running_batch(
            TranslateOptions(),
            on_done=lambda row, hypothesis: done.append(row),
            is_abandoned=gone.__contains__,
        )
        assert isinstance(stream, ProcessRunningBatch)
        for round_ in range(3):
            rows = list(range(8 * round_, 8 * round_ + 8))
            engine.join(stream, rows, sources, TranslateOptions())
            gone.update(rows[:6])  # six of each eight leave before their first step
            while stream.size:
                stream.step()
            assert stream.running_keys() == [] and sorted(done[-2:]) == rows[6:]
        stream.close()
    finally:
        engine.close()


def test_rows_with_no_lane_left_to_run_them_are_lost_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lane dies and none can be started in its place: the unanswered rows are LaneLost (UNAVAILABLE
    for their requests, which may be retried elsewhere), not an engine error."""
    engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lane_processes=True)
    try:
        lanes = engine.lane_processes
        assert lanes is not None
        victims = lanes.pids

        def cannot_start() -> object:
            raise RuntimeError("no memory for another lane")

        monkeypatch.setattr(lanes, "_start", cannot_start)
        sources = [text.ids for text in engine.encode_texts(SENTENCES[:16])]
        answered: list[int] = []

        def kill_all_once(row: int, hypothesis: object) -> None:
            if not answered:
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
            answered.append(row)

        with pytest.raises(LaneLost, match="none left to search again") as lost:
            engine.search_ids(sources, TranslateOptions(max_length=200), on_done=kill_all_once)
        assert lost.value.rows and not set(lost.value.rows) & set(answered)
        assert sorted(set(lost.value.rows) | set(answered)) == list(range(16))
    finally:
        engine.close()
