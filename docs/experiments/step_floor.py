"""Where our engine stands against CTranslate2 step by step, one thread, and what that leaves reachable.

    .venv/bin/python docs/experiments/step_floor.py [--rounds 5] [--json out.json]

1. Rows per decoder step in our engine (2 lanes, greedy, the test split's first 512 sentences in order) at
   batch 8, 32 and 128: how many steps run at 1 row, 2 rows, ... (finished rows leave the state).
2. One decoder step at r rows, float32 and int8, interleaved: our step graph (onnxruntime, past 16,
   source 14) against CTranslate2's step (the same weights; the slope between 8 and 24 forced steps on
   14-token sources, so its cache also averages 16), and the weight products of our step alone (a graph of
   the same 19 matrix products, nothing else): the part of our step that the product kernels cannot go
   under.
3. The encoders over the same batches: our encoder graph against CTranslate2 asked for one step.
4. What 1 and 2 imply: each engine's decoder time over batch 8 and 32's rows per step, with the encoders
   added, as a ratio. That ratio assumes no host work, no lane imbalance and CTranslate2 dropping rows no
   sooner than we do (it drops them every step), so it is an upper bound of what our engine can reach with
   these kernels.
Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from bench.ctranslate2_convert import convert_to_ctranslate2, source_tokens
from bench.engine import load_translator
from model.data import toy_split
from service.core.options import TranslateOptions
from service.core.search import padded
from service.engine.engine import Engine

REPOSITORY, MODEL, CHECKPOINT = "model_repository", "toy-en-es", "checkpoints/toy-en-es"
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
PAST, SOURCE = 16, 14
PRECISIONS = {"float32": "decoder.onnx", "int8": "decoder.int8.onnx"}


def session(model: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # as the engine runs them (docs/decisions/cpu-memory-arena.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def seconds_per_call(call, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def rows_per_step(texts: list[str]) -> dict[int, Counter]:
    engine = Engine.load(REPOSITORY, MODEL, threads=2)
    ids = [e.ids for e in engine.encode_texts(texts)]
    backend = engine.runner.backend
    step, counts, lock = backend.step, Counter(), threading.Lock()

    def counted(state, tokens, with_attention):
        with lock:
            counts[len(tokens)] += 1
        return step(state, tokens, with_attention)

    backend.step = counted
    histograms = {}
    for batch in (8, 32, 128):
        counts.clear()
        for i in range(0, len(ids), batch):
            engine.search_ids(ids[i:i + batch], TranslateOptions())
        histograms[batch] = Counter(counts)
    engine.close()
    return histograms


def step_feeds(decoder: ort.InferenceSession, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {"tokens": rng.integers(4, 1900, rows), "positions": np.full(rows, PAST, dtype=np.int64),
             "src_padding_mask": np.zeros((rows, SOURCE), dtype=bool)}
    for item in decoder.get_inputs():
        if item.name.startswith(("past_self_", "cross_")):
            length = PAST if item.name.startswith("past") else SOURCE
            feeds[item.name] = rng.standard_normal((rows, 4, length, 32)).astype(np.float32)
    return {item.name: feeds[item.name] for item in decoder.get_inputs()}  # a variant may take fewer


def products_graph(decoder_path: Path) -> bytes:
    """The step's weight products alone: each Gemm or MatMul of the step graph whose weight is a constant,
    with its attributes and bias, on a [rows, in] input; every result is a graph output (none is dropped)."""
    import onnx

    model = onnx.load(str(decoder_path))
    constants = {w.name: w for w in model.graph.initializer}
    nodes, inputs, outputs, used = [], {}, [], {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or node.input[1] not in constants:
            continue
        weight = constants[node.input[1]]
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        width = weight.dims[1] if transposed else weight.dims[0]
        name = f"x{width}"
        inputs[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", width])
        output = f"y{len(nodes)}"
        nodes.append(helper.make_node(node.op_type, [name, *node.input[1:]], [output]))
        nodes[-1].attribute.extend(node.attribute)
        outputs.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
        used.update({n: constants[n] for n in node.input[1:] if n in constants})
    graph = helper.make_graph(nodes, "products", list(inputs.values()), outputs, list(used.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def step_times(translator, decoder: ort.InferenceSession, products: ort.InferenceSession | None,
               same_length: list[list[str]], rounds: int, label: str) -> dict[str, dict[int, float]]:
    """Microseconds per step at each row count: ours, CTranslate2's, and (float32) our products alone."""
    rng = np.random.default_rng(0)
    table: dict[str, dict[int, float]] = {"ours": {}, "ct2": {}, "products": {}}
    for rows in ROWS:
        feeds = step_feeds(decoder, rows, rng)
        product_feeds = {item.name: rng.standard_normal((rows, item.shape[1])).astype(np.float32)
                         for item in products.get_inputs()} if products else {}
        batch = [same_length[i % len(same_length)] for i in range(rows)]  # the split has ~30 of them

        def ct2(steps: int, batch: list[list[str]] = batch) -> None:
            translator.translate_batch(batch, beam_size=1, min_decoding_length=steps,
                                       max_decoding_length=steps, max_input_length=0)
        samples: dict[str, list[float]] = {"ours": [], "ct2": [], "products": []}
        for _ in range(rounds):
            samples["ours"].append(seconds_per_call(lambda f=feeds: decoder.run(["log_probs"], f), 100))
            forced = seconds_per_call(lambda: ct2(24), 10) - seconds_per_call(lambda: ct2(8), 10)
            samples["ct2"].append(forced / 16)
            if products is not None:
                alone = seconds_per_call(lambda f=product_feeds: products.run(None, f), 100)
                samples["products"].append(alone)
        for name, values in samples.items():
            if values:
                table[name][rows] = statistics.median(values) * 1e6
        line = (f"{label:7s} {rows:2d} rows: ours {table['ours'][rows]:7.1f} us, "
                f"CTranslate2 {table['ct2'][rows]:7.1f} us")
        if products is not None:
            line += f", our weight products alone {table['products'][rows]:7.1f} us"
        print(line, flush=True)
    return table


def encoder_times(engine: Engine, translator, sources: list[list[int]], rounds: int, label: str
                  ) -> dict[int, tuple[float, float]]:
    """Milliseconds to encode 512 sentences in parts of 4 and 16 (a lane's share of batch 8 and 32):
    (ours, CTranslate2 asked for one step)."""
    vocabulary = engine.vocabulary
    times = {}
    for part in (4, 16):
        groups = [sources[i:i + part] for i in range(0, 512, part)]
        tokens = [[source_tokens(vocabulary, s) for s in g] for g in groups]
        ours, ct2 = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            for group in groups:
                engine.runner.backend.encode(padded(group, vocabulary.pad_id), False)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            for batch in tokens:
                translator.translate_batch(batch, beam_size=1, max_decoding_length=1, max_input_length=0)
            ct2.append(time.perf_counter() - started)
        times[part] = (statistics.median(ours) * 1e3, statistics.median(ct2) * 1e3)
        print(f"{label:7s} encoders, 512 sentences in parts of {part}: ours {times[part][0]:.0f} ms, "
              f"CTranslate2 (with one step) {times[part][1]:.0f} ms")
    return times


def decoder_ms(per_row: dict[int, float], counts: Counter) -> float:
    """Milliseconds of decoder steps for a histogram of rows per step (interpolated between measured rows)."""
    rows, times = list(per_row), list(per_row.values())
    return sum(n * float(np.interp(r, rows, times)) for r, n in counts.items()) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    histograms = rows_per_step([e.source for e in toy_split("test", 512)])
    for batch, counts in histograms.items():
        steps = sum(counts.values())
        row_steps = sum(r * n for r, n in counts.items())
        few = sum(n for r, n in counts.items() if r <= 2)
        print(f"batch {batch:3d}: {steps} steps, {row_steps / steps:.1f} rows per step on average, "
              f"{few / steps:.0%} of steps at 1-2 rows")
    folder = Path(REPOSITORY) / MODEL / "1"
    results: dict[str, dict] = {"histograms": {b: dict(c) for b, c in histograms.items()}}
    with tempfile.TemporaryDirectory() as converted:
        convert_to_ctranslate2(CHECKPOINT, converted)
        for precision, graph in PRECISIONS.items():
            engine = Engine.load(REPOSITORY, MODEL, threads=1, precision=precision)
            sources = [engine.vocabulary.encode_source(e.source).ids for e in toy_split("test", 1000)]
            same_length = [source_tokens(engine.vocabulary, s) for s in sources if len(s) == SOURCE]
            translator = load_translator(converted, 1, precision)
            products = session(products_graph(folder / graph)) if precision == "float32" else None
            table = step_times(translator, session(str(folder / graph)), products, same_length, args.rounds,
                               precision)
            encoders = encoder_times(engine, translator, sources, args.rounds, precision)
            bounds = {}
            for batch, part in ((8, 4), (32, 16)):
                ours = decoder_ms(table["ours"], histograms[batch]) + encoders[part][0]
                ct2 = decoder_ms(table["ct2"], histograms[batch]) + encoders[part][1]
                bounds[batch] = ct2 / ours
                print(f"{precision:7s} batch {batch}: decoder steps + encoders, ours {ours:.0f} ms, "
                      f"CTranslate2 {ct2:.0f} ms: at most {bounds[batch]:.2f}x CTranslate2 here")
            results[precision] = {"step_us": table, "encoders_ms": encoders, "bound": bounds}
            engine.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
