"""The client, its CLI, and the attention views (PNG heatmaps, offline HTML explorer).

Most tests talk to a small fake Translator servicer in this process, which answers instantly: they check
the client's side of the contract (options, maps, streams, errors, CLI output) without a model. The tests at
the end run against the real server (`translator-serve`, service/server/app.py) with the tiny test model.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.client.attention_html import attention_page, write_attention_html
from service.client.attention_png import png_paths, render_cross_attention_png
from service.client.translator_client import (
    ClientTranslation,
    ServerUnavailableError,
    TranslatorClient,
    TranslatorError,
    main,
)
from tests.conftest import ROOT
from tests.support.processes import free_port, stop

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = ["</script>", "<b>bold</b>", '"quoted"', "it's", "<!--", "&amp;", "$x^2$", "\u2028", "</s>"]


# ---------------------------------------------------------------------------------------------------------
# Realistic synthetic attention
# ---------------------------------------------------------------------------------------------------------


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def alignment_attention(rows: int, cols: int, layers: int, heads: int, alignment: list[int],
                        seed: int = 0) -> np.ndarray:
    """[L, H, rows, cols]: each row peaks on its aligned column, sharper in deeper layers, with noise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.6, size=(layers, heads, rows, cols))
    for layer in range(layers):
        for row, col in enumerate(alignment):
            logits[layer, :, row, col] += 1.5 + 2.5 * layer
    return softmax_rows(logits)


def causal_attention(size: int, layers: int, heads: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, size=(layers, heads, size, size))
    logits[..., np.triu(np.ones((size, size), dtype=bool), k=1)] = -np.inf
    return softmax_rows(logits)


SOURCE = "the big red dog will see the small cat in the house".split() + ["</s>"]  # 13 with </s>
TARGET = "el perro rojo grande verá al gato pequeño en la casa y ella".split() + ["</s>"]  # 14
# Adjectives swap with their nouns: the reordering a reader must be able to see.
ALIGNMENT = [0, 3, 2, 1, 5, 6, 8, 7, 9, 10, 11, 11, 4, 12]


def example_item(source: list[str] = SOURCE, target: list[str] = TARGET, layers: int = 3,
                 heads: int = 4) -> dict[str, Any]:
    alignment = [min(a, len(source) - 1) for a in ALIGNMENT][: len(target)]
    alignment += [len(source) - 1] * (len(target) - len(alignment))
    return {
        "source": " ".join(source[:-1]), "text": " ".join(target[:-1]), "source_tokens": source,
        "target_tokens": target,
        "attention": {
            "cross": {"weights": alignment_attention(len(target), len(source), layers, heads, alignment),
                      "row_tokens": target, "column_tokens": source, "layers": list(range(layers)),
                      "heads": list(range(heads))},
            "decoder_self": {"weights": causal_attention(len(target), layers, heads), "row_tokens": target,
                             "column_tokens": ["<s>", *target[:-1]]},
            "encoder_self": {"weights": alignment_attention(len(source), len(source), layers, heads,
                                                            list(range(len(source)))),
                             "row_tokens": source, "column_tokens": source},
        },
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---------------------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------------------


def test_cross_attention_png_for_a_realistic_example(tmp_path: Path) -> None:
    item = example_item()
    cross = item["attention"]["cross"]
    path = render_cross_attention_png(tmp_path / "maps.png", SOURCE, TARGET, cross["weights"], [0, 1, 2],
                                      [0, 1, 2, 3], title=f"{item['source']}  →  {item['text']}")
    width, height = png_size(path)
    # The average panel plus a 3 x 4 grid of 13 x 14 heatmaps with labels cannot fit in a thumbnail.
    assert width >= 1200 and height >= 1500, (width, height)
    assert path.stat().st_size > 50_000


def test_png_of_a_long_text_stays_a_readable_size(tmp_path: Path) -> None:
    """256 tokens each way, 3 layers x 4 heads: the cells shrink and labels thin out instead of the picture
    growing to ~13,500 x 17,000 pixels."""
    source = [f"word{i}" for i in range(255)] + ["</s>"]
    target = [f"palabra{i}" for i in range(255)] + ["</s>"]
    weights = alignment_attention(len(target), len(source), 3, 4, list(range(len(target))))
    path = render_cross_attention_png(tmp_path / "long.png", source, target, weights, [0, 1, 2], [0, 1, 2, 3])
    width, height = png_size(path)
    assert 1200 <= width <= 6000 and 1500 <= height <= 9000, (width, height)


@pytest.mark.parametrize("length", [5, 14, 80])
def test_png_alignment_list_sits_level_with_the_heatmap_rows(length: int) -> None:
    from service.client.attention_png import cross_attention_figure

    source = [f"w{i}" for i in range(length - 1)] + ["</s>"]
    target = [f"p{i}" for i in range(length - 1)] + ["</s>"]
    weights = alignment_attention(length, length, 2, 2, list(range(length)))
    figure = cross_attention_figure(source, target, weights, [0, 1], [0, 1], title="a title")
    figure.canvas.draw()  # the constrained layout places the panels when drawn
    heatmap = next(ax for ax in figure.get_axes() if ax.get_title().startswith("average over"))
    lines = [text for ax in figure.get_axes() for text in ax.texts if "←" in text.get_text()][1:]
    assert lines, "no alignment list drawn"
    for text in lines:
        row = target.index(text.get_text().split("  ←")[0])
        y = text.get_transform().transform(text.get_position())[1]
        assert abs(y - heatmap.transData.transform((0, row))[1]) < 1.0, (row, text.get_text())


@pytest.mark.parametrize("length", [2, 3, 5, 7, 40])
def test_png_text_stays_clear_of_the_panels_for_short_and_long_texts(length: int) -> None:
    """The colorbar's label stays within the bar's length (on texts of 2-5 tokens it ran into the titles
    above and below it) and the alignment list's heading within the picture (it was clipped at the right)."""
    from service.client.attention_png import LEGEND_HEADING, cross_attention_figure

    source = [f"w{i}" for i in range(length - 1)] + ["</s>"]
    target = [f"p{i}" for i in range(length - 1)] + ["</s>"]
    weights = alignment_attention(length, length, 3, 4, list(range(length)))
    figure = cross_attention_figure(source, target, weights, [0, 1, 2], [0, 1, 2, 3], title="a → b")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    bar = next(ax for ax in figure.get_axes() if ax.get_label() == "<colorbar>")
    label = bar.yaxis.label.get_window_extent(renderer)
    extent = bar.get_window_extent(renderer)
    assert extent.y0 - 1 <= label.y0 and label.y1 <= extent.y1 + 1, (label, extent)
    heading = next(t for ax in figure.get_axes() for t in ax.texts if t.get_text() == LEGEND_HEADING)
    assert heading.get_window_extent(renderer).x1 <= figure.bbox.x1, "the heading runs off the picture"
    titles = [ax.title.get_window_extent(renderer) for ax in figure.get_axes() if ax.get_title()]
    assert not any(label.overlaps(title) for title in titles)


def test_png_survives_hostile_tokens_and_a_subset_of_heads(tmp_path: Path) -> None:
    target = ["<unk>", "$", "</s>"]
    weights = alignment_attention(len(target), len(HOSTILE), 1, 2, [0, 6, 8])
    path = render_cross_attention_png(tmp_path / "odd.png", HOSTILE, target, weights, [2], [1, 3])
    assert png_size(path)[0] > 300


def test_png_rejects_weights_that_do_not_match_the_tokens(tmp_path: Path) -> None:
    weights = np.full((1, 1, 2, 3), 1 / 3, dtype=np.float32)
    with pytest.raises(ValueError, match="2 rows x 3 columns"):
        render_cross_attention_png(tmp_path / "x.png", ["a", "b"], ["x", "y"], weights, [0], [0])


def test_png_paths_one_file_per_text(tmp_path: Path) -> None:
    assert png_paths(tmp_path / "maps.png", 1) == [tmp_path / "maps.png"]
    assert png_paths(tmp_path / "maps.png", 3) == [tmp_path / f"maps-{i}.png" for i in (1, 2, 3)]
    # matplotlib writes maps.png for a name without a suffix: the path reported must be that file.
    assert png_paths(tmp_path / "maps", 1) == [tmp_path / "maps.png"]


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------


def embedded_data(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.DOTALL)
    assert match, "the data element is missing or was cut short"
    return json.loads(match.group(1))


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for needle in ("http://", "https://", "<script src", "<link", "@import", "url(", "//cdn"):
        assert needle not in lowered, f"the page references something outside itself: {needle!r}"


def test_html_is_self_contained_and_holds_every_map(tmp_path: Path) -> None:
    item = example_item()
    path = write_attention_html(tmp_path / "view.html", [item, example_item(SOURCE[-5:], TARGET[-4:], 2, 2)])
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert_self_contained(page)
    data = embedded_data(page)
    assert len(data["items"]) == 2
    first = data["items"][0]
    assert first["source_tokens"] == SOURCE and first["target_tokens"] == TARGET
    assert first["translation"] == item["text"]
    assert list(first["maps"]) == ["cross", "decoder_self", "encoder_self"]
    cross = first["maps"]["cross"]
    assert cross["shape"] == [3, 4, len(TARGET), len(SOURCE)]
    assert cross["rows"] == TARGET and cross["cols"] == SOURCE
    weights = np.array(cross["q"]).reshape(cross["shape"]) / data["scale"]
    np.testing.assert_allclose(weights, item["attention"]["cross"]["weights"], atol=1e-4)
    assert first["maps"]["decoder_self"]["cols"][0] == "<s>"


def test_html_survives_hostile_tokens(tmp_path: Path) -> None:
    target = ["<script>alert(1)</script>", "'", "</s>"]
    item = {"source": "</script><script>alert('x')</script>", "text": "<img src=x onerror=alert(1)>",
            "source_tokens": HOSTILE, "target_tokens": target,
            "attention": {"cross": {"weights": alignment_attention(3, len(HOSTILE), 1, 2, [0, 1, 8]),
                                    "row_tokens": target, "column_tokens": HOSTILE}}}
    page = write_attention_html(tmp_path / "hostile.html", [item], title="<i>title</i>").read_text("utf-8")
    assert_self_contained(page)
    # Only the page's own two script elements end: no token closed one early or opened a new one.
    assert page.count("</script") == 2 and page.lower().count("<script") == 2
    assert "<img" not in page and "<i>title" not in page and "<!--" not in page
    data = embedded_data(page)
    assert data["items"][0]["source_tokens"] == HOSTILE
    assert data["items"][0]["target_tokens"] == target
    assert data["items"][0]["source"] == item["source"]
    assert data["items"][0]["translation"] == item["text"]


def test_html_accepts_client_translations() -> None:
    item = example_item(layers=1, heads=1)
    result = ClientTranslation(text=item["text"], source_tokens=SOURCE, target_tokens=TARGET, score=-0.1,
                               log_prob=-1.4, unknown_words=[], timings={}, source=item["source"])
    from service.client.translator_client import AttentionMap

    cross = item["attention"]["cross"]
    result.attention["cross"] = AttentionMap("cross", cross["weights"], TARGET, SOURCE, [1], [2])
    data = embedded_data(attention_page([result]))
    assert data["items"][0]["maps"]["cross"]["layers"] == [1]
    assert data["items"][0]["maps"]["cross"]["heads"] == [2]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_html_runs_in_headless_chromium_without_errors(tmp_path: Path) -> None:
    browser = find_chromium()
    if browser is None:
        message = "no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + "; only the in-browser check of the HTML explorer is skipped")
    target = ["<script>alert(1)</script>", "'", "</s>"]
    hostile = {"source_tokens": HOSTILE, "target_tokens": target, "text": "x",
               "attention": {"cross": {"weights": alignment_attention(3, len(HOSTILE), 1, 2, [0, 1, 8]),
                                       "row_tokens": target, "column_tokens": HOSTILE}}}
    path = write_attention_html(tmp_path / "view.html", [example_item(), hostile])
    # Opened at the hostile text, encoder view, a head and a pinned row, so that every drawing path runs.
    for fragment in ("", "#text=2&row=0", "#text=1&kind=encoder_self&layer=2&head=1&row=3",
                     "#text=1&kind=decoder_self&row=5"):
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
             path.as_uri() + fragment],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        body = re.search(r"<body[^>]*>", result.stdout)
        assert body, result.stdout[:500]
        assert 'data-ready="1"' in body.group(0), f"the page did not finish its first render ({fragment}): " \
                                                  f"{body.group(0)}\n{result.stderr[-2000:]}"
        assert "data-error" not in body.group(0), body.group(0)
        assert "alert(1)" in result.stdout  # the hostile token is shown as text...
        assert "<script>alert(1)" not in result.stdout.split("<body", 1)[1]  # ...never as markup


# ---------------------------------------------------------------------------------------------------------
# A fake server for the client's side of the contract
# ---------------------------------------------------------------------------------------------------------


class FakeTranslator(pb_grpc.TranslatorServicer):
    """Translates by reversing the words; maps are deterministic; remembers the last request's options."""

    def __init__(self) -> None:
        self.requests: list[pb.TranslateRequest | pb.TranslateStreamRequest] = []

    def translation(self, text: str, options: pb.TranslateOptions, context: grpc.ServicerContext
                    ) -> pb.Translation:
        words = text.split()
        if not words:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts[0] is empty: give at least one word")
        if options.HasField("beam_size") and options.beam_size > 8:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"options.beam_size must be between 1 and max_beam_size=8, got {options.beam_size}")
        source = [*words, "</s>"]
        target = [*reversed(words), "</s>"]
        message = pb.Translation(text=" ".join(reversed(words)), source_tokens=source, target_tokens=target,
                                 score=-0.25, log_prob=-0.25 * len(target),
                                 unknown_words=[w for w in words if w.startswith("X")],
                                 timings=pb.Timings(queue_ms=1.5, compute_ms=2.5, total_ms=5.0))
        layers = list(options.attention.layers) or [0, 1]
        heads = list(options.attention.heads) or [0, 1, 2, 3]
        for kind in options.attention.kinds:
            rows, cols = {pb.CROSS: (target, source), pb.DECODER_SELF: (target, ["<s>", *target[:-1]]),
                          pb.ENCODER_SELF: (source, source)}[kind]
            weights = np.full((len(layers), len(heads), len(rows), len(cols)), 1 / len(cols), np.float32)
            message.attention.append(pb.AttentionMap(
                kind=kind, layers=layers, heads=heads, row_tokens=rows, column_tokens=cols,
                weights=pb.Tensor(shape=list(weights.shape), data=weights.ravel().tolist())))
        return message

    def Translate(self, request: pb.TranslateRequest, context: grpc.ServicerContext) -> pb.TranslateResponse:
        self.requests.append(request)
        if not request.texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts is empty")
        return pb.TranslateResponse(translations=[self.translation(t, request.options, context)
                                                  for t in request.texts])

    def TranslateStream(self, request: pb.TranslateStreamRequest, context: grpc.ServicerContext
                        ) -> Iterator[pb.TranslateStreamResponse]:
        self.requests.append(request)
        message = self.translation(request.text, request.options, context)
        for index, token in enumerate(message.target_tokens):
            event = pb.TokenEvent(index=index, token_id=index + 4, token=token)
            yield pb.TranslateStreamResponse(token=event)
        yield pb.TranslateStreamResponse(translation=message)

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(
            name="fake", version="7", execution_provider="CPUExecutionProvider",
            architecture=pb.Architecture(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                                         d_ff=64),
            source_vocab_size=40, target_vocab_size=40,
            batching=pb.BatchingSettings(max_batch_size=8, max_batch_tokens=0, max_queue_delay_ms=2.0,
                                         max_queue_size=100),
            limits=pb.Limits(max_texts_per_request=2, max_tokens_per_text=50, max_beam_size=8, max_length=64),
            training_metrics={"test_bleu": 12.5})


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeTranslator]]:
    servicer = FakeTranslator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TranslatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_translate_converts_every_field(fake: tuple[str, FakeTranslator]) -> None:
    target, _ = fake
    with TranslatorClient(target, timeout=10) as client:
        first, second = client.translate(["the Xavier dog", "a cat"], attention=["cross", "encoder_self"])
    assert first.text == "dog Xavier the" and second.text == "cat a"
    assert first.source == "the Xavier dog"
    assert first.source_tokens == ["the", "Xavier", "dog", "</s>"]
    assert first.target_tokens == ["dog", "Xavier", "the", "</s>"]
    assert first.unknown_words == ["Xavier"]
    assert first.score == pytest.approx(-0.25) and first.log_prob == pytest.approx(-1.0)
    assert first.timings == {"queue_ms": 1.5, "compute_ms": 2.5, "total_ms": 5.0}
    assert list(first.attention) == ["cross", "encoder_self"]
    cross = first.attention["cross"]
    assert cross.weights.dtype == np.float32 and cross.weights.shape == (2, 4, 4, 4)
    assert cross.row_tokens == first.target_tokens and cross.column_tokens == first.source_tokens
    assert cross.layers == [0, 1] and cross.heads == [0, 1, 2, 3]
    np.testing.assert_allclose(cross.weights.sum(axis=-1), 1.0, rtol=1e-5)
    assert json.loads(json.dumps(first.to_dict(include_attention=True)))["attention"]["cross"]["shape"] == \
        [2, 4, 4, 4]
    assert "attention" not in first.to_dict()


def test_translate_takes_any_iterable_of_texts(fake: tuple[str, FakeTranslator]) -> None:
    target, servicer = fake
    with TranslatorClient(target, timeout=10) as client:
        # A generator used to be consumed by the request, leaving no source to pair the results with: [].
        results = client.translate(text for text in ["the Xavier dog", "a cat"])
        assert [(r.source, r.text) for r in results] == [
            ("the Xavier dog", "dog Xavier the"), ("a cat", "cat a")]
        assert list(servicer.requests[-1].texts) == ["the Xavier dog", "a cat"]
        (alone,) = client.translate("a cat")  # a lone string is one text, not one per character
        assert alone.source == "a cat" and list(servicer.requests[-1].texts) == ["a cat"]


def test_only_the_options_given_are_sent(fake: tuple[str, FakeTranslator]) -> None:
    target, servicer = fake
    with TranslatorClient(target) as client:
        client.translate("a b")  # a lone string is one text, not one text per character
        sent = servicer.requests[-1]
        assert list(sent.texts) == ["a b"]
        for name in ("beam_size", "max_length", "length_penalty"):
            assert not sent.options.HasField(name), f"{name} sent though unset: the server default is lost"
        assert not sent.options.attention.kinds
        client.translate(["a"], beam_size=3, max_length=9, length_penalty=0.0, replace_unknowns=True,
                         attention=["decoder_self", "cross", "cross"], layers=[1], heads=[0, 2])
        options = servicer.requests[-1].options
    assert (options.beam_size, options.max_length, options.length_penalty) == (3, 9, 0.0)
    assert options.HasField("length_penalty")  # 0.0 means "no normalisation", not "default"
    assert options.replace_unknowns
    assert list(options.attention.kinds) == [pb.DECODER_SELF, pb.CROSS]
    assert list(options.attention.layers) == [1] and list(options.attention.heads) == [0, 2]


def test_unknown_attention_kind_is_refused_locally(fake: tuple[str, FakeTranslator]) -> None:
    with TranslatorClient(fake[0]) as client, pytest.raises(ValueError, match="unknown attention kind"):
        client.translate(["a"], attention=["self"])


def test_stream_yields_tokens_then_the_translation(fake: tuple[str, FakeTranslator]) -> None:
    with TranslatorClient(fake[0]) as client:
        events = list(client.stream("one two three", attention=["cross"]))
    assert events[:-1] == ["three", "two", "one", "</s>"]
    final = events[-1]
    assert isinstance(final, ClientTranslation) and final.text == "three two one"
    assert final.attention["cross"].weights.shape == (2, 4, 4, 4)


def test_model_info(fake: tuple[str, FakeTranslator]) -> None:
    with TranslatorClient(fake[0]) as client:
        info = client.model_info()
    assert (info.name, info.version, info.execution_provider) == ("fake", "7", "CPUExecutionProvider")
    assert info.architecture["n_heads"] == 4 and info.limits["max_texts_per_request"] == 2
    assert info.batching["max_batch_tokens"] == 0  # zeros are kept, not dropped as protobuf defaults
    assert info.training_metrics == {"test_bleu": 12.5}


def test_grpc_errors_carry_code_and_message(fake: tuple[str, FakeTranslator]) -> None:
    with TranslatorClient(fake[0]) as client:
        with pytest.raises(TranslatorError) as caught:
            client.translate(["a"], beam_size=99)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_beam_size=8" in caught.value.message
        assert str(caught.value).startswith("INVALID_ARGUMENT: ")
        with pytest.raises(TranslatorError) as caught:
            list(client.stream("   "))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_unreachable_server_is_named() -> None:
    address = f"127.0.0.1:{free_port()}"
    with TranslatorClient(address, timeout=10) as client, pytest.raises(ServerUnavailableError) as caught:
        client.translate(["a"])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert address in caught.value.message and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# CLI (run in-process: fast, and the output is captured exactly)
# ---------------------------------------------------------------------------------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
            stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_translates_arguments(fake: tuple[str, FakeTranslator], capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(["--server", fake[0], "a b", "c d e", "--beam-size", "2"], capsys, monkeypatch)
    assert code == 0 and out == "b a\ne d c\n"
    assert fake[1].requests[-1].options.beam_size == 2


def test_cli_reads_stdin_in_chunks_the_server_accepts(fake: tuple[str, FakeTranslator],
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSLATOR_SERVER", fake[0])
    before = len(fake[1].requests)
    # An editor's byte-order mark before the first line is not part of its text.
    code, out, _ = run_cli([], capsys, monkeypatch, stdin="\ufeffone two\n\nthree\nfour five\n")
    assert code == 0 and out.splitlines() == ["two one", "three", "five four"]
    # max_texts_per_request is 2 on the fake server: two requests, blank line skipped.
    assert [list(r.texts) for r in fake[1].requests[before:]] == [["one two", "three"], ["four five"]]


def test_cli_json(fake: tuple[str, FakeTranslator], capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(["--server", fake[0], "--json", "x Xy"], capsys, monkeypatch)
    assert code == 0
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["translation"] == "Xy x" and record["source_tokens"] == ["x", "Xy", "</s>"]
    assert record["unknown_words"] == ["Xy"] and record["timings"]["total_ms"] == 5.0
    assert "score" in record and "attention" not in record
    # --json-attention implies --json.
    code, out, _ = run_cli(["--server", fake[0], "--json-attention", "x"], capsys, monkeypatch)
    assert json.loads(out)["attention"]["cross"]["shape"] == [2, 4, 2, 2]


def test_cli_without_texts(fake: tuple[str, FakeTranslator], capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["--server", fake[0]], capsys, monkeypatch, stdin="\n  \n")
    assert code == 2 and out == "" and err.startswith("error: no text to translate")


def test_cli_stream(fake: tuple[str, FakeTranslator], capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(["--server", fake[0], "--stream", "a b c"], capsys, monkeypatch)
    assert code == 0 and out == "c b a\n"
    assert isinstance(fake[1].requests[-1], pb.TranslateStreamRequest)
    code, out, err = run_cli(["--server", fake[0], "--stream", "--json", "a b"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["translation"] == "b a" and err.startswith("b a")


def test_cli_info(fake: tuple[str, FakeTranslator], capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(["--server", fake[0], "--info"], capsys, monkeypatch, stdin="not read\n")
    assert code == 0 and "fake" in out and "CPUExecutionProvider" in out and "max_beam_size=8" in out
    assert "not read" not in out
    code, out, _ = run_cli(["--server", fake[0], "--info", "--json"], capsys, monkeypatch)
    assert json.loads(out)["model_info"]["limits"]["max_length"] == 64


def test_cli_writes_png_per_text_and_one_html(fake: tuple[str, FakeTranslator], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["--server", fake[0], "the dog", "a big cat", "--attention",
                              str(tmp_path / "maps.png"), "--html", str(tmp_path / "view.html")],
                             capsys, monkeypatch)
    assert code == 0, err
    assert png_size(tmp_path / "maps-1.png")[0] > 300 and png_size(tmp_path / "maps-2.png")[0] > 300
    # --html asks for all three kinds, whatever --attention asked for.
    assert list(fake[1].requests[-1].options.attention.kinds) == [pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF]
    data = embedded_data((tmp_path / "view.html").read_text("utf-8"))
    assert [item["source"] for item in data["items"]] == ["the dog", "a big cat"]
    assert set(data["items"][1]["maps"]) == {"cross", "decoder_self", "encoder_self"}


def test_cli_error_is_one_line_with_the_code(fake: tuple[str, FakeTranslator],
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["--server", fake[0], "--beam-size", "99", "a"], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err == "error: INVALID_ARGUMENT: options.beam_size must be between 1 and max_beam_size=8, got 99\n"


def test_cli_unreachable_server(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, _, err = run_cli(["--server", address, "a"], capsys, monkeypatch)
    assert code == 1
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the translator server at {address}")
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# Against the real server and the tiny model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`translator-serve` in a subprocess (its real command line), serving the tiny test model.

    A subprocess rather than the in-process harness of tests/support: the client is then tested exactly as
    a user meets the server, and a fixture of another test module is not shared across modules anyway."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "service.server.app", "--port", str(port), "--metrics-port", "0",
               "--http-port", "0", "--model-repository", str(tiny_repository), "--model", "tiny",
               "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(address)
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                pb_grpc.TranslatorStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within 90 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        channel.close()
        yield address
    finally:
        stop(process, timeout=20)


def test_real_server_translate_with_every_map(real_server: str) -> None:
    with TranslatorClient(real_server, timeout=60) as client:
        info = client.model_info()
        results = client.translate(["the big dog sees the cat", "a red house"], beam_size=2,
                                   attention=["cross", "decoder_self", "encoder_self"])
    layers, heads = info.architecture["n_decoder_layers"], info.architecture["n_heads"]
    assert len(results) == 2
    for result in results:
        assert result.source_tokens[-1] == "</s>" and result.target_tokens
        assert result.score <= 0 and result.timings["total_ms"] > 0
        cross = result.attention["cross"]
        assert cross.weights.shape == (layers, heads, len(result.target_tokens), len(result.source_tokens))
        assert cross.row_tokens == result.target_tokens and cross.column_tokens == result.source_tokens
        np.testing.assert_allclose(cross.weights.sum(axis=-1), 1.0, atol=1e-3)
        decoder = result.attention["decoder_self"]
        assert decoder.column_tokens == ["<s>", *result.target_tokens[:-1]]
        assert np.allclose(np.triu(decoder.weights, k=1), 0.0, atol=1e-6)  # causal
        encoder = result.attention["encoder_self"]
        assert encoder.weights.shape[2:] == (len(result.source_tokens),) * 2


def test_real_server_subset_of_layers_and_heads(real_server: str) -> None:
    with TranslatorClient(real_server, timeout=60) as client:
        [result] = client.translate(["the cat"], attention=["cross"], layers=[1], heads=[0, 2])
    cross = result.attention["cross"]
    assert cross.layers == [1] and cross.heads == [0, 2] and cross.weights.shape[:2] == (1, 2)


def test_real_server_stream_matches_translate(real_server: str) -> None:
    with TranslatorClient(real_server, timeout=60) as client:
        events = list(client.stream("the small cat sees her"))
        [batch] = client.translate(["the small cat sees her"])
    final = events[-1]
    assert isinstance(final, ClientTranslation)
    assert events[:-1] == final.target_tokens
    assert final.text == batch.text and final.target_tokens == batch.target_tokens


def test_real_server_errors(real_server: str) -> None:
    with TranslatorClient(real_server, timeout=60) as client:
        limit = client.model_info().limits["max_beam_size"]
        with pytest.raises(TranslatorError) as caught:
            client.translate(["the cat"], beam_size=limit + 1)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TranslatorError) as caught:
            client.translate([""])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TranslatorError) as caught:
            client.translate(["the cat"], attention=["cross"], layers=[99])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_splits_requests_whose_maps_exceed_the_servers_answer_limit(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every map of 8 texts does not fit the server's max_message_bytes, one text's does: the CLI halves its
    requests until they fit, and every text is answered, in order."""
    from tests.support.server import make_config, running

    texts = [f"the big dog sees the small cat {i}" for i in range(8)]  # ~25 kB of maps each
    with running(make_config(tiny_repository, max_message_bytes=60_000)) as server:
        with TranslatorClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(TranslatorError, match="max_message_bytes"):
                client.translate(texts, attention=["cross", "decoder_self", "encoder_self"])
            alone = [client.translate(text)[0].text for text in texts]
        page = tmp_path / "view.html"
        code, out, err = run_cli(
            ["--server", f"127.0.0.1:{server.port}", "--html", str(page)], capsys, monkeypatch,
            stdin="\n".join(texts) + "\n",
        )
    assert code == 0, err
    assert out.splitlines() == alone
    assert len(embedded_data(page.read_text("utf-8"))["items"]) == 8


def test_real_server_cli_end_to_end(real_server: str, tmp_path: Path) -> None:
    """The CLI as a user runs it, in its own process: JSON out, a PNG and the explorer page written."""
    result = subprocess.run(
        [sys.executable, "-m", "service.client.translator_client", "--server", real_server, "--json",
         "--attention",
         str(tmp_path / "maps.png"), "--html", str(tmp_path / "view.html")],
        input="the big dog sees the cat\n", capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["source_tokens"][-1] == "</s>" and "timings" in record
    assert png_size(tmp_path / "maps.png")[0] > 300
    data = embedded_data((tmp_path / "view.html").read_text("utf-8"))
    assert set(data["items"][0]["maps"]) == {"cross", "decoder_self", "encoder_self"}


def test_pictures_without_matplotlib_are_refused_before_any_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """matplotlib comes with the `client` extra: without it, --attention is a usage error that says so, and no
    call is made (the server address is one nothing listens on)."""
    import service.client

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    monkeypatch.delitem(sys.modules, "service.client.attention_png", raising=False)
    monkeypatch.delattr(service.client, "attention_png", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--server", "127.0.0.1:9", "--attention", str(tmp_path / "maps.png"), "the dog sees her"])
    assert stopped.value.code == 2
    assert "pip install 'translator[client]'" in capsys.readouterr().err
    assert not (tmp_path / "maps.png").exists()
