"""The shipped default model: its ONNX graphs translate exactly as its PyTorch checkpoint does."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import platform
import threading

import numpy as np
import pytest

from model.checkpoint import load_model
from model.data import toy_split
from model.decoding import translate_ids
from model.evaluate import corpus_scores
from model.transformer import Transformer
from service.core.model_format import resolve, sha256
from service.core.options import TranslateOptions
from service.core.postprocess import Translation
from service.core.vocabulary import Vocabulary
from service.engine.engine import Engine
from service.engine.lane_process import ProcessRunningBatch
from service.engine.lanes import LANE_ROW_STEP_COST, LANE_STEP_COST, LaneThreads, lane_parts
from tests.conftest import DEFAULT_CHECKPOINT, DEFAULT_MODEL, DEFAULT_REPOSITORY, ENGINE_DEVICE

PARITY_SENTENCES = 500
Checkpoint = tuple[Transformer, Vocabulary, dict]


@pytest.fixture(scope="module")
def engine() -> Engine:
    """On ENGINE_DEVICE: the parity tests below run unchanged on a GPU."""
    return Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device=ENGINE_DEVICE, threads=2)


@pytest.fixture(scope="module")
def cpu_engine() -> Engine:
    return Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2)


def test_the_engine_runs_on_the_device_asked_for(engine: Engine) -> None:
    expected = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[ENGINE_DEVICE]
    assert engine.provider == expected
    # Caches stay on the GPU between steps (IO binding); on CPU there is nothing to spare.
    assert engine.io_binding == (ENGINE_DEVICE == "cuda")
    assert engine.lanes == (1 if ENGINE_DEVICE == "cuda" else 2)


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return load_model(DEFAULT_CHECKPOINT)


def test_the_repository_holds_the_checkpoint_it_was_exported_from(checkpoint: Checkpoint) -> None:
    version = resolve(DEFAULT_REPOSITORY, DEFAULT_MODEL)
    model, vocabulary, _ = checkpoint
    assert version.architecture.d_model == model.config.d_model
    assert version.description["checksums"]["tokenizer.json"] == sha256(DEFAULT_CHECKPOINT / "tokenizer.json")
    metrics = version.metrics
    assert metrics["test"]["bleu"] >= 98 and metrics["test"]["exact_match"] >= 0.95, metrics["test"]


@pytest.mark.parametrize(("split", "beam_size"), [("test", 1), ("test", 4), ("user", 1), ("names", 1),
                                                  ("long", 1)])
def test_engine_equals_pytorch_on_500_sentences_of_each_split(
    engine: Engine, checkpoint: Checkpoint, split: str, beam_size: int
) -> None:
    model, vocabulary, _ = checkpoint
    sources = [vocabulary.encode_source(e.source).ids for e in toy_split(split, PARITY_SENTENCES)]
    ours: list = []
    reference: list = []
    for start in range(0, len(sources), 100):
        chunk = sources[start : start + 100]
        ours += engine.search_ids(chunk, TranslateOptions(beam_size=beam_size))
        reference += translate_ids(model, chunk, beam_size=beam_size)
    differing = [i for i, (a, b) in enumerate(zip(ours, reference, strict=True)) if a.tokens != b.tokens]
    assert not differing, f"{len(differing)} of {len(sources)} differ, first at sentence {differing[:1]}"
    scores = np.array([[a.score, b.score] for a, b in zip(ours, reference, strict=True)])
    np.testing.assert_allclose(scores[:, 0], scores[:, 1], atol=1e-4)


def test_maps_match_pytorch_and_are_the_same_alone_and_in_a_batch(
    engine: Engine, checkpoint: Checkpoint
) -> None:
    model, vocabulary, _ = checkpoint
    examples = toy_split("test", 64)
    options = TranslateOptions(attention=frozenset({"cross", "decoder_self", "encoder_self"}))
    batch = engine.translate([e.source for e in examples], options, batch_size=64)
    reference = translate_ids(
        model, [vocabulary.encode_source(e.source).ids for e in examples], with_attention=True
    )
    for index in (0, 21, 63):
        alone = engine.translate([examples[index].source], options)[0]
        for name, torch_name in (
            ("cross_attention", "cross_attention"),
            ("decoder_self_attention", "self_attention"),
            ("encoder_attention", "encoder_attention"),
        ):
            np.testing.assert_allclose(getattr(alone, name), getattr(batch[index], name), atol=1e-5)
            np.testing.assert_allclose(getattr(alone, name), getattr(reference[index], torch_name), atol=1e-5)
        assert alone.token_ids == batch[index].token_ids == reference[index].tokens


def test_the_default_model_translates_the_toy_language(engine: Engine) -> None:
    examples = toy_split("test", 200)
    outputs = engine.translate([e.source for e in examples])
    exact = np.mean([o.text == e.target for o, e in zip(outputs, examples, strict=True)])
    assert exact >= 0.95
    [result] = engine.translate(["the big red dog sees her"])
    assert result.text == "el perro grande rojo la ve"


@pytest.mark.parametrize("precision", ["int8", "float16"])
def test_reduced_precision_translates_the_test_split_within_the_quality_bounds(
    cpu_engine: Engine, precision: str
) -> None:
    """int8 and float16 graphs cost at most 0.3 BLEU and 1 point of exact match against float32 on the whole
    test split (docs/decisions/precisions.md), through the same engine and text rules."""
    reduced = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, precision=precision)
    examples = toy_split("test")
    references = [e.target for e in examples]
    scores = {}
    for name, engine in (("float32", cpu_engine), (precision, reduced)):
        texts = [t.text for t in engine.translate([e.source for e in examples])]
        scores[name] = corpus_scores(texts, references)
    reduced.close()
    assert scores["float32"]["bleu"] - scores[precision]["bleu"] <= 0.3, scores
    assert scores["float32"]["exact_match"] - scores[precision]["exact_match"] <= 0.01, scores
    assert scores[precision]["exact_match"] >= 0.98, scores


def test_model_json_records_the_evaluation() -> None:
    description = json.loads((DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.json").read_text())
    assert {"test", "long", "valid"} <= set(description["training"]["metrics"])


ALL_MAPS = ("cross_attention", "decoder_self_attention", "encoder_attention")


def assert_same_translations(ours: list[Translation], expected: list[Translation]) -> None:
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.token_ids == theirs.token_ids
        assert mine.score == pytest.approx(theirs.score, abs=1e-6)
        for name in ALL_MAPS:
            np.testing.assert_allclose(getattr(mine, name), getattr(theirs, name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_io_binding_on_cpu_equals_plain_mode(cpu_engine: Engine, beam_size: int) -> None:
    """IO binding (automatic on CUDA) forced on CPU: the same tokens, scores and maps as numpy feeds."""
    engine = cpu_engine
    assert not engine.io_binding  # CPU default: plain mode
    bound = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, io_binding=True)
    examples = toy_split("test", 64)  # mixed lengths: rows finish at different steps, `select` runs
    options = TranslateOptions(
        beam_size=beam_size, attention=frozenset({"cross", "decoder_self", "encoder_self"})
    )
    expected = engine.translate([e.source for e in examples], options, batch_size=64)
    ours = bound.translate([e.source for e in examples], options, batch_size=64)
    assert_same_translations(ours, expected)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_lanes_give_the_results_of_one_lane(cpu_engine: Engine, beam_size: int) -> None:
    """A batch split over two parallel lanes: the same tokens, scores and maps as decoded in one piece."""
    engine = cpu_engine
    assert engine.lanes == 2  # two threads on CPU: two lanes
    single = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2, lanes=1)
    assert single.lanes == 1
    examples = toy_split("test", 64)
    options = TranslateOptions(
        beam_size=beam_size, attention=frozenset({"cross", "decoder_self", "encoder_self"})
    )
    expected = single.translate([e.source for e in examples], options, batch_size=64)
    ours = engine.translate([e.source for e in examples], options, batch_size=64)
    assert_same_translations(ours, expected)


def test_lane_callbacks_get_the_callers_row_numbers(cpu_engine: Engine) -> None:
    """on_token, is_abandoned and on_done are called from both lanes with the whole batch's row numbers."""
    engine = cpu_engine
    sources = engine.encode_texts([e.source for e in toy_split("test", 40)])
    ids = [s.ids for s in sources]
    streamed: dict[int, list[int]] = {row: [] for row in range(len(ids))}
    threads: set[str] = set()
    abandoned = {0, 7, 21, 39}

    def on_token(row: int, token: int) -> None:
        threads.add(threading.current_thread().name)
        streamed[row].append(token)

    handed: dict[int, object] = {}
    results = engine.search_ids(ids, TranslateOptions(), on_token=on_token,
                                is_abandoned=lambda row: row in abandoned,
                                on_done=lambda row, hypothesis: handed.setdefault(row, hypothesis))
    assert len(threads) == 2, threads
    assert sorted(handed) == [row for row in range(len(ids)) if row not in abandoned]
    for row, hypothesis in enumerate(results):
        if row in abandoned:
            assert hypothesis is None and streamed[row] == []
        else:
            assert hypothesis is not None and streamed[row] == hypothesis.tokens
            assert handed[row] is hypothesis


def denormals_flushed() -> bool:
    """Whether this thread flushes denormal floats to zero (half of 1e-38 is a denormal float32)."""
    return bool(np.float32(1e-38) * np.float32(0.5) == 0)


def default_float_environment() -> None:
    """This thread back to the C library's default floating-point environment (a thread inherits its
    creator's, and building an onnxruntime session sets the building thread's)."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    assert libm.fesetenv(ctypes.c_void_p(-1)) == 0  # FE_DFL_ENV is ((const fenv_t *) -1) in glibc


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the flush sets the x86-64 SSE control word")
def test_lane_threads_flush_denormals_and_the_caller_never_does() -> None:
    """Softmax over padded keys runs through denormals unless they are flushed: every part of a batch runs
    on a lane thread that flushes them (seen from the search's callbacks), while the thread that loads the
    engine and asks for the search keeps its own floating-point environment."""
    seen: dict[str, list[bool]] = {"lanes": [], "caller": []}
    lane_threads: set[str] = set()

    def on_token(row: int, token: int) -> None:
        lane_threads.add(threading.current_thread().name)
        seen["lanes"].append(denormals_flushed())

    def run() -> None:
        default_float_environment()
        engine = Engine.load(DEFAULT_REPOSITORY, DEFAULT_MODEL, device="cpu", threads=2)
        seen["caller"].append(denormals_flushed())
        ids = [s.ids for s in engine.encode_texts([e.source for e in toy_split("test", 16)])]
        engine.search_ids(ids, TranslateOptions(), on_token=on_token)
        seen["caller"].append(denormals_flushed())

    thread = threading.Thread(target=run, name="caller")
    thread.start()
    thread.join()
    assert len(lane_threads) == 2 and all(name.startswith("engine-lane") for name in lane_threads)
    assert len(seen["lanes"]) > 16 and all(seen["lanes"])
    assert seen["caller"] == [False, False]


def test_lane_parts_cover_every_row_once_by_length() -> None:
    lengths = [5, 40, 3, 3, 12, 9, 30, 7, 7, 22]
    for lanes in (1, 2, 3, 10, 20):
        parts = lane_parts(lengths, lanes)
        assert len(parts) == min(lanes, len(lengths))  # every lane gets a row while there are enough
        assert sorted(row for part in parts for row in part) == list(range(len(lengths)))
        ordered = [lengths[row] for part in parts for row in part]
        assert ordered == sorted(ordered)  # each lane holds a run of similar lengths
    assert lane_parts([4], 2) == [[0]]
    assert lane_parts([], 2) == []
    assert [len(p) for p in lane_parts([1, 1000], 2)] == [1, 1]


def predicted_time(lengths: list[int]) -> float:
    """A run's time as lane_cost models it, written out for one run."""
    return max(lengths) * (LANE_STEP_COST + LANE_ROW_STEP_COST * len(lengths)) + sum(lengths)


@pytest.mark.parametrize("seed", range(20))
def test_lane_parts_minimise_the_slowest_lane(seed: int) -> None:
    """The split's slowest run is the best over every way to cut the sorted rows into runs (brute force),
    and the lane of long sentences gets fewer rows."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(2, 40, size=int(rng.integers(2, 12)))]
    ordered = sorted(lengths)
    for lanes in (2, 3):
        if lanes > len(lengths):
            continue
        got = max(predicted_time([lengths[row] for row in part]) for part in lane_parts(lengths, lanes))
        best = min(
            max(predicted_time(ordered[a:b]) for a, b in zip((0, *cuts), (*cuts, len(ordered)), strict=True))
            for cuts in itertools.combinations(range(1, len(ordered)), lanes - 1)
        )
        assert got == pytest.approx(best)
    # Larger batches and more lanes: the same optimum as a plain O(lanes x n^2) dynamic program.
    ordered = sorted(int(n) for n in rng.integers(2, 60, size=int(rng.integers(20, 90))))
    lengths = [int(n) for n in rng.permutation(ordered)]
    for lanes in (2, 5, 8):
        best = [0.0] + [predicted_time(ordered[:j]) for j in range(1, len(ordered) + 1)]
        for runs in range(2, lanes + 1):
            best = [float("inf")] * runs + [
                min(max(best[i], predicted_time(ordered[i:j])) for i in range(runs - 1, j))
                for j in range(runs, len(ordered) + 1)
            ]
        parts = lane_parts(lengths, lanes)
        assert len(parts) == lanes and sorted(r for part in parts for r in part) == list(range(len(lengths)))
        got = max(predicted_time([lengths[row] for row in part]) for part in parts)
        assert got == pytest.approx(best[-1])
    short, long = lane_parts([3] * 8 + [30] * 8, 2)
    assert set(range(8)) < set(short) and len(short) > len(long)  # the short lane also takes long rows


@pytest.mark.parametrize(("lanes", "lane_processes"), [(1, False), (2, False), (2, True)])
def test_sentences_joining_a_running_stream_translate_as_in_a_batch(lanes: int, lane_processes: bool) -> None:
    """Iteration-level batching: sentences join a running batch at different steps, rows leave when done;
    each gets the tokens and score of the batch search (in this process, or in a lane process)."""
    engine = Engine.load(
        DEFAULT_REPOSITORY,
        DEFAULT_MODEL,
        device=ENGINE_DEVICE,
        threads=lanes,
        lanes=lanes,
        lane_processes=lane_processes,
    )
    texts = [e.source for e in toy_split("test", 60)]
    sources = [s.ids for s in engine.encode_texts(texts)]
    options = TranslateOptions()
    expected = engine.search_ids(sources, options)
    done: dict[int, object] = {}
    streamed: dict[int, list[int]] = {row: [] for row in range(len(sources))}
    abandoned = {5, 17}
    stream = engine.running_batch(
        options,
        on_token=lambda row, token: streamed[row].append(token),
        on_done=lambda row, hypothesis: done.setdefault(row, hypothesis),
        is_abandoned=lambda row: row in abandoned and len(streamed[row]) >= 2,
    )
    pending = list(range(len(sources)))
    steps = 0
    while pending or stream.size:
        # A few sentences join at every step, so the running rows are at many different positions.
        joining, pending = pending[: 1 + steps % 4], pending[1 + steps % 4 :]
        engine.join(stream, joining, [sources[row] for row in joining], options)
        stream.step()
        steps += 1
        assert stream.size <= len(sources) and steps < 500
    assert sorted(done) == [row for row in range(len(sources)) if row not in abandoned]
    for row, hypothesis in done.items():
        reference = expected[row]
        assert reference is not None
        assert hypothesis.tokens == reference.tokens, row
        assert streamed[row] == reference.tokens
        assert hypothesis.score == pytest.approx(reference.score, abs=1e-4)
        assert hypothesis.finished == reference.finished
    if lane_processes:
        assert isinstance(stream, ProcessRunningBatch)
        stream.close()  # the lane goes back: a batch search can use both lanes again
        again = engine.search_ids(sources[:8], options)
        assert [h.tokens for h in again if h] == [h.tokens for h in expected[:8] if h]
        engine.close()
    else:
        assert stream.batch.state is None  # everything left: nothing is held


def test_only_greedy_requests_without_maps_stream(engine: Engine) -> None:
    assert TranslateOptions().joins_running_batch
    assert not TranslateOptions(beam_size=2).joins_running_batch
    assert not TranslateOptions(attention=frozenset({"cross"})).joins_running_batch
    assert not TranslateOptions(replace_unknowns=True).joins_running_batch
    with pytest.raises(ValueError, match="greedy"):
        engine.running_batch(TranslateOptions(beam_size=2))


def test_lane_threads_give_each_part_its_own_free_thread_and_refuse_work_once_closed() -> None:
    lanes = LaneThreads(4, "test-lane", lambda: 1 / 0)  # a failing initializer leaves the lanes working
    started = threading.Barrier(4, timeout=10)

    def part() -> str:
        started.wait()  # all four parts must run at once: two batches of two, each part on its own thread
        return threading.current_thread().name

    first, second = lanes.run([part, part]), lanes.run([part, part])
    names = [future.result(timeout=10) for future in first + second]
    assert sorted(names) == [f"test-lane_{i}" for i in range(4)]
    with pytest.raises(ValueError, match="5 parts for 4 lane threads"):
        lanes.run([part] * 5)
    lanes.close()
    with pytest.raises(RuntimeError, match="closed"):
        lanes.run([part])
