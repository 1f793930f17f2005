"""The Translator API over gRPC: translations as the engine's, attention maps, streams, batching, info."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api.inference import grpc_service_pb2 as kpb
from service.api.translator.v1 import translator_pb2 as pb
from service.core.options import TranslateOptions
from service.engine.engine import Engine
from service.engine.lane_process import ProcessRunningBatch
from service.server.app import TranslatorServer
from tests.conftest import DEFAULT_REPOSITORY
from tests.support.metrics import scrape, value
from tests.support.server import Client, SlowBackend, make_config, running
from tests.support.texts import sentences
from tests.support.waiting import wait_for


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translations_equal_the_engines(client: Client, reference: Engine, beam_size: int) -> None:
    texts = [*sentences(6, seed=beam_size), "the zebra sees a cat"]
    options = pb.TranslateOptions(beam_size=beam_size, max_length=12, length_penalty=0.8)
    answer = client.translator.Translate(pb.TranslateRequest(texts=texts, options=options))
    expected = reference.translate(
        texts, TranslateOptions(beam_size=beam_size, max_length=12, length_penalty=0.8)
    )
    assert len(answer.translations) == len(texts)
    for got, want in zip(answer.translations, expected, strict=True):
        assert got.text == want.text
        assert list(got.target_tokens) == want.target_tokens
        assert list(got.source_tokens) == want.source_tokens
        assert list(got.unknown_words) == want.unknown_words
        assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-5)
        assert got.log_prob == pytest.approx(want.log_prob, rel=1e-4, abs=1e-5)
        assert not got.attention
        timings = got.timings
        assert timings.queue_ms >= 0 and timings.compute_ms > 0
        assert timings.total_ms >= timings.queue_ms + timings.compute_ms - 0.01
    assert list(answer.translations[-1].unknown_words) == ["zebra"]


def test_attention_maps_follow_the_selection(client: Client, reference: Engine) -> None:
    text = "the big dog sees a small cat"
    kinds = [pb.ENCODER_SELF, pb.CROSS, pb.DECODER_SELF]
    request = pb.TranslateRequest(
        texts=[text],
        options=pb.TranslateOptions(
            max_length=8, attention=pb.AttentionRequest(kinds=kinds, layers=[1], heads=[3, 0])
        ),
    )
    (got,) = client.translator.Translate(request).translations
    (want,) = reference.translate(
        [text], TranslateOptions(max_length=8, attention=frozenset({"cross", "decoder_self", "encoder_self"}))
    )
    target, source = list(got.target_tokens), list(got.source_tokens)
    expected = {
        pb.CROSS: (want.cross_attention, target, source),
        pb.DECODER_SELF: (want.decoder_self_attention, target, ["<s>", *target[:-1]]),
        pb.ENCODER_SELF: (want.encoder_attention, source, source),
    }
    assert [m.kind for m in got.attention] == kinds
    for attention_map in got.attention:
        weights, rows, columns = expected[attention_map.kind]
        assert list(attention_map.layers) == [1] and list(attention_map.heads) == [3, 0]
        assert list(attention_map.row_tokens) == rows and list(attention_map.column_tokens) == columns
        shape = list(attention_map.weights.shape)
        assert shape == [1, 2, len(rows), len(columns)]
        array = np.array(attention_map.weights.data, dtype=np.float32).reshape(shape)
        np.testing.assert_allclose(array, weights[[1]][:, [3, 0]], atol=1e-5)
        np.testing.assert_allclose(array.sum(axis=-1), 1.0, atol=1e-4)
        if attention_map.kind == pb.DECODER_SELF:
            assert np.all(np.triu(array, k=1) == 0)  # causal: nothing above the diagonal

    everything = pb.TranslateRequest(
        texts=[text],
        options=pb.TranslateOptions(max_length=8, attention=pb.AttentionRequest(kinds=[pb.CROSS])),
    )
    (full,) = client.translator.Translate(everything).translations
    assert list(full.attention[0].layers) == [0, 1] and list(full.attention[0].heads) == [0, 1, 2, 3]


@pytest.mark.parametrize("beam_size", [1, 2])
def test_special_tokens_typed_in_a_text_are_unknown_words(client: Client, beam_size: int) -> None:
    """"<pad>", "</s>" and "<s>" written by a user are words the vocabulary lacks, like any other."""
    typed = "the big dog <pad> sees </s> a <s> cat"
    plain = "the big dog zqx sees zqx a zqx cat"
    options = pb.TranslateOptions(
        beam_size=beam_size,
        replace_unknowns=True,
        attention=pb.AttentionRequest(kinds=[pb.CROSS, pb.ENCODER_SELF]),
    )
    got, want, _ = client.translator.Translate(
        pb.TranslateRequest(texts=[typed, plain, "the cat sees a dog"], options=options)
    ).translations
    assert list(got.unknown_words) == ["<pad>", "</s>", "<s>"]
    assert list(got.source_tokens) == list(want.source_tokens) and len(got.source_tokens) == 10
    assert list(got.target_tokens) == list(want.target_tokens) and got.score == pytest.approx(want.score)
    for attention_map in got.attention:
        assert list(attention_map.column_tokens) == list(got.source_tokens)
        assert list(attention_map.weights.shape)[-1] == len(got.source_tokens)


def test_concurrent_callers_are_batched_and_get_their_own_results(
    server: TranslatorServer, client: Client, reference: Engine
) -> None:
    assert server.metrics_port
    texts = sentences(24, seed=7)
    requests = [texts[i : i + 1] if i % 3 else texts[i : i + 2] for i in range(24)]  # some callers send two
    options = pb.TranslateOptions(max_length=10)
    expected = dict(zip(texts, reference.translate(texts, TranslateOptions(max_length=10)), strict=True))
    before = scrape(server.metrics_port)
    barrier = threading.Barrier(len(requests))

    def call(mine: list[str]) -> list[str]:
        barrier.wait()
        answer = client.translator.Translate(pb.TranslateRequest(texts=mine, options=options), timeout=30)
        return [t.text for t in answer.translations]

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(call, requests))
    for mine, got in zip(requests, answers, strict=True):
        assert got == [expected[text].text for text in mine]
    after = scrape(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    batches = delta("translator_batch_size_sentences_count")
    single = delta("translator_batch_size_sentences_bucket", le="1.0")
    assert delta("translator_batch_size_sentences_sum") == sum(len(r) for r in requests)
    assert batches - single >= 1, "no batch held more than one sentence"
    assert batches < len(requests)
    assert delta("translator_requests_total", method="Translate", code="OK") == len(requests)


@pytest.mark.parametrize("beam_size", [1, 2])
def test_stream_sends_every_token_then_the_translation(client: Client, beam_size: int) -> None:
    text = "the red cat sees a dog"
    options = pb.TranslateOptions(beam_size=beam_size, max_length=9)
    messages = list(client.translator.TranslateStream(pb.TranslateStreamRequest(text=text, options=options)))
    events, last = messages[:-1], messages[-1]
    assert all(m.WhichOneof("event") == "token" for m in events) and last.WhichOneof("event") == "translation"
    (batch,) = client.translator.Translate(pb.TranslateRequest(texts=[text], options=options)).translations
    assert [e.token.index for e in events] == list(range(len(events)))
    assert (
        [e.token.token for e in events] == list(batch.target_tokens) == list(last.translation.target_tokens)
    )
    assert last.translation.text == batch.text
    assert last.translation.timings.total_ms > 0


def test_iteration_batching_in_lane_processes(tiny_repository: Path, reference: Engine) -> None:
    """Requests join running batches in the lane processes: each gets what the engine gives it alone, and a
    streamed one its tokens as they come."""
    config = make_config(
        tiny_repository, iteration_batching="on", lane_processes="on", threads=2, max_queue_delay_ms=1.0,
        quality_sample_rate=0.0,  # a sampled request runs as a whole batch, with maps
    )
    texts = sentences(24, seed=3)
    expected = [t.text for t in reference.translate(texts)]
    with running(config) as server:
        engine = server.runtime.engine
        assert server.port and engine and engine.lane_processes
        opened: list[int] = []
        open_batch = engine.running_batch

        def counted_batch(*args: Any, **kwargs: Any) -> Any:
            batch = open_batch(*args, **kwargs)
            assert isinstance(batch, ProcessRunningBatch)
            opened.append(batch.pid)
            return batch

        engine.running_batch = counted_batch  # type: ignore[method-assign]
        client = Client(server.port)
        try:

            def translate(text: str) -> str:
                (got,) = client.translator.Translate(pb.TranslateRequest(texts=[text])).translations
                return got.text

            def stream(text: str) -> tuple[list[str], pb.Translation]:
                messages = list(client.translator.TranslateStream(pb.TranslateStreamRequest(text=text)))
                return [m.token.token for m in messages[:-1]], messages[-1].translation

            with ThreadPoolExecutor(8) as pool:
                streamed = [pool.submit(stream, text) for text in texts[:4]]
                answers = list(pool.map(translate, texts))
            assert answers == expected
            for future, want in zip(streamed, expected, strict=False):
                tokens, translation = future.result()
                assert translation.text == want and tokens == list(translation.target_tokens)
            assert opened, "no running batch went to a lane process"
        finally:
            client.close()


def test_invisible_format_characters_are_not_part_of_a_word(client: Client) -> None:
    """A zero-width space, byte-order mark or soft hyphen pasted into a text does not make a word unknown."""
    clean, pasted = client.translator.Translate(
        pb.TranslateRequest(texts=["the big dog sees her", "\ufeffthe b\u200big dog se\u00ades her"])
    ).translations
    assert pasted.text == clean.text and list(pasted.source_tokens) == list(clean.source_tokens)
    assert list(pasted.unknown_words) == []


def test_model_info_reports_the_settings(client: Client, server: TranslatorServer) -> None:
    info = client.translator.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.version, info.execution_provider) == ("tiny", "1", "CPUExecutionProvider")
    assert info.precision == "float32"
    assert (info.architecture.d_model, info.architecture.n_heads, info.architecture.n_decoder_layers) == (
        32,
        4,
        2,
    )
    assert info.source_vocab_size == info.target_vocab_size > 4
    assert (info.batching.max_batch_size, info.batching.max_batch_tokens, info.batching.max_queue_size) == (
        64,
        4096,
        1024,
    )
    assert info.batching.max_queue_delay_ms == 20.0
    limits = info.limits
    assert (
        limits.max_texts_per_request,
        limits.max_tokens_per_text,
        limits.max_beam_size,
        limits.max_length,
    ) == (8, 16, 4, 64)


def test_model_info_carries_the_default_models_evaluation() -> None:
    """model.json keeps its metrics by split; the API names them `<split>_<metric>`."""
    config = make_config(DEFAULT_REPOSITORY, model="toy-en-es", threads=1, lane_processes="off")
    description = json.loads((DEFAULT_REPOSITORY / "toy-en-es/1/model.json").read_text())
    stored = description["training"]["metrics"]
    with running(config) as server:
        assert server.port
        client = Client(server.port)
        try:
            metrics = dict(client.translator.GetModelInfo(pb.GetModelInfoRequest()).training_metrics)
        finally:
            client.close()
    assert metrics["valid_bleu"] == pytest.approx(stored["valid"]["bleu"])
    assert metrics["test_exact_match"] == pytest.approx(stored["test"]["exact_match"])
    assert "test_aer_per_layer_head" not in metrics  # a list per layer and head is no single number
    assert all(name.split("_", 1)[0] in stored for name in metrics)


def test_a_request_joins_the_running_batch(slow: tuple[TranslatorServer, SlowBackend]) -> None:
    """Iteration-level batching: with one worker, a short request arriving while a long one decodes joins
    its batch at the next step and is answered long before the long one ends."""
    server, backend = slow
    assert server.port and server.runtime.batcher and server.runtime.batcher.settings.workers == 1
    client = Client(server.port)
    earlier_steps = backend.steps
    with ThreadPoolExecutor(1) as pool:
        long_call = pool.submit(
            client.translator.Translate,
            pb.TranslateRequest(texts=["the cat"], options=pb.TranslateOptions(max_length=60)),  # 1.2 s
            timeout=30,
        )
        wait_for(lambda: backend.steps > earlier_steps + 2, message="decoding to start")
        started = time.monotonic()
        short = client.translator.Translate(
            pb.TranslateRequest(texts=["a dog"], options=pb.TranslateOptions(max_length=4)), timeout=30
        )
        assert time.monotonic() - started < 0.6 and not long_call.done()
        assert len(short.translations[0].target_tokens) == 4
        assert len(long_call.result().translations[0].target_tokens) == 60
    client.close()


def test_answers_say_what_the_model_was_not_trained_for() -> None:
    """The default model knows the longest text it was trained on (model.json): a longer
    text is flagged in translator.v1 and KServe alike, unknown words are listed, /metrics counts both."""
    from tests.support.kserve import infer_request

    config = make_config(DEFAULT_REPOSITORY, model="toy-en-es", threads=1, lane_processes="off",
                         max_tokens_per_text=256, max_length_limit=256)  # fmt: skip
    description = json.loads((DEFAULT_REPOSITORY / "toy-en-es/1/model.json").read_text())
    trained = description["training"]["max_source_tokens"]
    words = "the big red dog sees the small cat".split()
    short, unknown = "the dog sees the cat", "the zorblax sees the cat"
    long = " ".join((words * 10)[:trained + 4])  # longer than any training text
    with running(config) as server:
        assert server.port and server.metrics_port
        assert server.runtime.engine and server.runtime.engine.model.max_training_source_tokens == trained
        before = scrape(server.metrics_port)
        client = Client(server.port)
        try:
            answer = client.translator.Translate(pb.TranslateRequest(texts=[short, long, unknown]))
            request = infer_request([short, long, unknown])
            request.model_name = "toy-en-es"
            response = client.kserve.ModelInfer(request)
        finally:
            client.close()
        after = scrape(server.metrics_port)
    assert [t.longer_than_training for t in answer.translations] == [False, True, False]
    assert [list(t.unknown_words) for t in answer.translations] == [[], [], ["zorblax"]]
    [translation] = [o for o in response.outputs if o.name == "TRANSLATION"]
    assert json.loads(translation.parameters["longer_than_training"].string_param) == [False, True, False]
    assert json.loads(translation.parameters["unknown_words"].string_param) == [[], [], ["zorblax"]]
    name = "translator_texts_beyond_training_total"
    for reason in ("longer", "unknown_words"):  # one text of each, in each of the two calls
        assert value(after, name, reason=reason) - value(before, name, reason=reason) == 2


# Text as a person types it, each case of the text rules and of the model: case, marks, contractions, names
# and numbers never seen in training, several sentences.
USER_TEXTS = [
    "The dog sees the cat.",
    "I see her!",
    "She does not see me?",
    "the dog doesn't see the cat",
    "The girl won\u2019t eat the apple, but the boys will run.",
    "THE CAT SEES ME.",
    "Beatriz sees 4217 dogs with Gonzalo.",
    "Kenji saw 1 bird. The bird did not see Kenji!",
]


def test_the_served_model_translates_text_as_people_type_it() -> None:
    """Over translator.v1 and KServe, the default model gives the reference translation of user-typed text."""
    from model.toy_language import translate
    from tests.support.kserve import infer_request, outputs_of

    expected = [translate(text).target for text in USER_TEXTS]
    config = make_config(DEFAULT_REPOSITORY, model="toy-en-es", threads=1, lane_processes="off")
    with running(config) as server:
        client = Client(server.port)
        try:
            answer = client.translator.Translate(pb.TranslateRequest(texts=USER_TEXTS))
            request = infer_request(USER_TEXTS)
            request.model_name = "toy-en-es"
            response = client.kserve.ModelInfer(request)
        finally:
            client.close()
    assert [t.text for t in answer.translations] == expected
    assert all(not t.unknown_words for t in answer.translations)
    assert [b.decode() for b in outputs_of(response)["TRANSLATION"]] == expected


@pytest.mark.parametrize("lane_processes", ["on", "off"])
def test_the_server_serves_the_precision_asked_for(tiny_repository: Path, lane_processes: str) -> None:
    """--precision int8 loads the int8 graphs (in the lane processes too): the answers are the int8 engine's,
    and GetModelInfo, the KServe config and /metrics say which precision is served."""
    texts = sentences(5, seed=11)
    int8 = Engine.load(tiny_repository, "tiny", device="cpu", threads=1, precision="int8")
    float32 = Engine.load(tiny_repository, "tiny", device="cpu", threads=1)
    options = TranslateOptions(max_length=12)
    expected, unexpected = (engine.translate(texts, options) for engine in (int8, float32))
    int8.close()
    float32.close()
    config = make_config(tiny_repository, precision="int8", lane_processes=lane_processes)
    with running(config) as server:
        assert server.port and server.metrics_port
        client = Client(server.port)
        try:
            info = client.translator.GetModelInfo(pb.GetModelInfoRequest())
            kserve_config = client.kserve.ModelConfig(kpb.ModelConfigRequest(name="tiny")).config
            answer = client.translator.Translate(
                pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(max_length=12))
            )
        finally:
            client.close()
        text = scrape(server.metrics_port)
    assert info.precision == "int8"
    assert kserve_config.parameters["precision"].string_value == "int8"
    for served, mine, other in zip(answer.translations, expected, unexpected, strict=True):
        assert list(served.target_tokens) == mine.target_tokens
        assert served.log_prob == pytest.approx(mine.log_prob, abs=1e-4)
        assert served.log_prob != pytest.approx(other.log_prob, abs=1e-4)  # int8's, not float32's
    labels = {"model": "tiny", "version": "1", "provider": "CPUExecutionProvider"}
    assert value(text, "translator_model_info", **labels, precision="int8") == 1


def test_the_server_serves_with_the_fixed_step(tiny_relative_repository: Path) -> None:
    """--step-graph fixed (in the lane processes): the dynamic step's answers, attention maps included."""
    texts = sentences(6, seed=12)
    reference = Engine.load(tiny_relative_repository, "tiny", device="cpu", threads=1)
    options = TranslateOptions(max_length=12, attention=frozenset({"cross"}))
    expected = reference.translate(texts, options)
    reference.close()
    config = make_config(tiny_relative_repository, step_graph="fixed", lane_processes="on")
    with running(config) as server:
        assert server.port
        assert server.runtime.engine is not None and server.runtime.engine.step_graph == "fixed"
        client = Client(server.port)
        try:
            answer = client.translator.Translate(pb.TranslateRequest(
                texts=texts,
                options=pb.TranslateOptions(max_length=12, attention=pb.AttentionRequest(kinds=[pb.CROSS])),
            ))
        finally:
            client.close()
    for served, mine in zip(answer.translations, expected, strict=True):
        assert list(served.target_tokens) == mine.target_tokens
        assert served.log_prob == pytest.approx(mine.log_prob, abs=1e-5)
        weights = served.attention[0].weights
        served_map = np.array(weights.data, dtype=np.float32).reshape(list(weights.shape))
        np.testing.assert_allclose(served_map, mine.cross_attention, atol=1e-5)
