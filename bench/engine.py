"""`translator-bench engine`: greedy throughput of our engine, PyTorch and CTranslate2 on the same weights.

Engines (rows of the table):

* ``torch_nocache``: PyTorch eager, the decoder re-run over the whole prefix every step (``decode_full``),
  driven by the shared search so stopping, masking and dropping finished rows are the same as everywhere.
* ``torch_cache``: PyTorch with the key/value cache (TorchBackend + shared search, as ``translate_ids``).
* ``ours``: our engine (onnxruntime graphs + shared search), no attention maps.
* ``ours_attention``: our engine with every attention map requested (cross, decoder self, encoder self).
* ``ours_int8``: our engine on the model's int8 graphs (``--precision int8``); its tokens may differ from
  float32's, so it is compared with ``ct2_int8`` and its quality is reported.
* ``ct2_f32``: CTranslate2 float32 on a conversion of the same checkpoint (the reference to beat), one
  worker using every thread (``intra_threads``).
* ``ct2_f32_workers``: the same, with one single-threaded worker per thread (``inter_threads``) and each
  batch split over them (``max_batch_size`` = batch / threads; CTranslate2 sorts by length before
  splitting): the parallelism our engine's lanes use. The ratio to beat is against the faster of the two.
* ``ct2_int8``, ``ct2_int8_workers``: CTranslate2 with int8 weights in the same two configurations; the
  faster of the two is the reference for ``ours_int8`` (their tokens may differ from float32's).

Method: every engine first translates the same sentences once and must produce our engine's tokens exactly
(beyond ``--max-mismatches`` differing sentences the benchmark refuses to time). That run covers the whole
test split (1,000 sentences; ``--parity-sentences`` for fewer), and each engine's BLEU and exact match against
its references are reported beside, so a faster engine that translates worse shows it. Then, per round, each
engine runs in a fresh subprocess (one process can swing by 40%), engines interleaved in a rotating order; in
each, every batch size is timed over whole passes of the same batches until ``--min-seconds`` have passed.
Reported figures are medians over rounds. Everybody gets the same batches (test-split order, mixed lengths)
and the same thread count. Length cap: our engine's rule, per sentence, 2 x its source length (</s> included)
+ 10 generated tokens (</s> included), at most 256. CTranslate2 takes one cap per call, so it gets the batch's
largest and its outputs are cut to each sentence's cap (greedy tokens do not depend on the cap, so they are
the same; only a sentence that never emits </s> costs it a few extra steps). Target tokens/s counts generated
tokens without </s>. Heavy libraries load only in the subprocesses, so the parent leaves no idle thread pools
behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.results import run_folder, write_run_json
from service.core.cli import nonnegative_float, nonnegative_int, output_file, positive_int, positive_ints
from service.core.options import max_steps
from service.core.vocabulary import BOS, PAD

ROOT = Path(__file__).resolve().parent.parent
ENGINES: dict[str, str] = {
    "torch_nocache": "PyTorch eager, no cache",
    "torch_cache": "PyTorch eager, KV cache",
    "ours": "ours (onnxruntime)",
    "ours_attention": "ours + all attention maps",
    "ours_int8": "ours, int8 weights",
    "ct2_f32": "CTranslate2 float32",
    "ct2_f32_workers": "CTranslate2 float32, worker per thread",
    "ct2_int8": "CTranslate2 int8",
    "ct2_int8_workers": "CTranslate2 int8, worker per thread",
}
REFERENCE = "ours"
# Engines whose tokens are allowed to differ from ours without stopping the benchmark.
PARITY_EXEMPT = frozenset({"ct2_int8", "ct2_int8_workers", "ours_int8"})
INT8_ENGINES = ("ours_int8", "ct2_int8", "ct2_int8_workers")
MAX_LENGTH_LIMIT = 256  # service.engine.engine.Engine's default max_length_limit
# "ct2_f32_best": per batch size, the faster of the two CTranslate2 float32 configurations.
BEST_CT2_F32 = ("ct2_f32", "ct2_f32_workers")
BEST_CT2_INT8 = ("ct2_int8", "ct2_int8_workers")  # "ct2_int8_best", likewise
RATIOS = (("ours/best ct2_f32", "ours", "ct2_f32_best"), ("ours/ct2_f32", "ours", "ct2_f32"),
          ("ours/ct2_f32_workers", "ours", "ct2_f32_workers"),
          ("ours/torch_nocache", "ours", "torch_nocache"),
          ("ours/torch_cache", "ours", "torch_cache"), ("attention_on/off", "ours_attention", "ours"),
          ("ours/ct2_int8", "ours", "ct2_int8"), ("ours_int8/best ct2_int8", "ours_int8", "ct2_int8_best"),
          ("ours_int8/ct2_int8", "ours_int8", "ct2_int8"),
          ("ours_int8/ct2_int8_workers", "ours_int8", "ct2_int8_workers"),
          ("ours_int8/best ct2_f32", "ours_int8", "ct2_f32_best"))


@dataclass(frozen=True)
class Batch:
    ids: list[list[int]]  # source ids, each ending with </s>
    max_lengths: list[int]  # per sentence: steps allowed (</s> included)


def max_length_for(source: Sequence[int], max_positions: int) -> int:
    """The length rule every engine here runs by: the service's own (service.core.options.max_steps),
    capped by the engine's limit and the position table."""
    return max_steps(len(source), None, min(MAX_LENGTH_LIMIT, max_positions))


def make_batches(sources: list[list[int]], batch_size: int, max_positions: int) -> list[Batch]:
    chunks = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
    return [Batch(chunk, [max_length_for(s, max_positions) for s in chunk]) for chunk in chunks]


# -- engines (run inside worker processes) -------------------------------------------------------------

@dataclass
class Runner:
    run: Callable[[Batch], list]  # batch -> generated tokens per sentence (ids; strings for CTranslate2)
    to_ids: Callable[[list], list[list[int]]] = lambda outputs: outputs
    prime: Callable[[list[Batch]], None] = lambda batches: None  # untimed per-batch preparation


@dataclass
class NoCacheState:
    memory: Any  # torch [N,S,D]
    padding: Any  # torch bool [N,S]
    prefix: Any  # torch int64 [N,t]: <s> and the tokens generated so far


class NoCacheTorchBackend:
    """StepBackend without a key/value cache: each step decodes the whole prefix again (``decode_full``)."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def encode(self, src_ids: Any, with_attention: bool) -> tuple[NoCacheState, None]:
        import torch

        with torch.inference_mode():
            src = torch.as_tensor(src_ids, dtype=torch.int64, device=self.device)
            padding = self.model.padding_mask(src)
            memory, _ = self.model.encode(src, padding)
            prefix = torch.zeros((src.shape[0], 0), dtype=torch.int64, device=self.device)
        return NoCacheState(memory, padding, prefix), None

    def step(self, state: NoCacheState, tokens: Any,
             with_attention: bool) -> tuple[NoCacheState, Any, None, None]:
        import torch

        with torch.inference_mode():
            previous = torch.as_tensor(tokens, dtype=torch.int64, device=self.device)
            prefix = torch.cat([state.prefix, previous[:, None]], dim=1)
            log_probs, _, _ = self.model.decode_full(prefix, state.memory, state.padding)
            last = log_probs[:, -1].float().cpu().numpy()
        return NoCacheState(state.memory, state.padding, prefix), last, None, None

    def select(self, state: NoCacheState, rows: Any) -> NoCacheState:
        import torch

        with torch.inference_mode():
            index = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
            return NoCacheState(state.memory.index_select(0, index), state.padding.index_select(0, index),
                                state.prefix.index_select(0, index))


def _torch_runner(engine: str, spec: dict) -> Runner:
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)  # settable once per process, before any parallel work
        except RuntimeError:
            pass
    from model.checkpoint import load_model
    from model.decoding import TorchBackend
    from service.core.search import padded, search

    model, _, _ = load_model(spec["checkpoint"])
    if spec["device"] == "cuda":
        # Float32 products as float32 (not TF32), as our engine runs them: the tokens must match.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model = model.to("cuda")
    config = model.config
    # translate_ids is TorchBackend + search with one cap per batch; the caps here are per sentence, as in
    # our engine, so the same two calls are made directly.
    backend = TorchBackend(model) if engine == "torch_cache" else NoCacheTorchBackend(model)

    def run(batch: Batch) -> list[list[int]]:
        results = search(backend, padded(batch.ids, config.pad_id), pad_id=config.pad_id,
                         bos_id=config.bos_id, eos_id=config.eos_id,
                         max_length=np.asarray(batch.max_lengths, dtype=np.int64))
        return [h.tokens for h in results if h is not None]
    return Runner(run)


def _ours_runner(engine: str, spec: dict) -> Runner:
    from service.core.model_format import FLOAT32
    from service.core.options import ATTENTION_KINDS, TranslateOptions
    from service.engine.engine import Engine

    loaded = Engine.load(spec["repository"], spec["model"], spec.get("version"), device=spec["device"],
                         threads=spec["threads"], max_length_limit=MAX_LENGTH_LIMIT,
                         precision="int8" if engine == "ours_int8" else FLOAT32)
    attention = frozenset(ATTENTION_KINDS) if engine == "ours_attention" else frozenset()
    # No max_length: the engine applies its own per-sentence rule, which Batch.max_lengths mirrors for the
    # other engines (a drift between the two shows up in the parity check as soon as a sentence hits it).
    options = TranslateOptions(attention=attention)

    def run(batch: Batch) -> list[list[int]]:
        return [h.tokens for h in loaded.search_ids(batch.ids, options) if h is not None]
    return Runner(run)


def load_translator(path: str | Path, threads: int, compute_type: str, workers: int = 1,
                    device: str = "cpu") -> Any:
    """A CTranslate2 Translator built on a short-lived thread (REFERENCE.md): built on the main thread it
    leaves idle OpenMP threads behind that make int8 about 10x slower at small batches."""
    import ctranslate2

    holder: dict[str, Any] = {}

    def build() -> None:
        try:
            holder["translator"] = ctranslate2.Translator(str(path), device=device, compute_type=compute_type,
                                                          intra_threads=threads, inter_threads=workers)
        except BaseException as error:  # re-raised on the caller's thread
            holder["error"] = error

    thread = threading.Thread(target=build, name="ct2-load")
    thread.start()
    thread.join()
    if "error" in holder:
        raise holder["error"]
    return holder["translator"]


def ct2_greedy(
    translator: Any, tokens: list[list[str]], caps: list[int], workers: int = 1
) -> list[list[str]]:
    """CTranslate2's greedy search as ours runs it: no <pad> or <s> produced, possibly empty (its
    min_decoding_length defaults to 1), at most `caps[i]` steps for sentence i (our length rule), the batch
    split between its `workers`."""
    results = translator.translate_batch(tokens, beam_size=1, max_decoding_length=max(caps),
                                         min_decoding_length=0, suppress_sequences=[[PAD], [BOS]],
                                         max_batch_size=-(-len(tokens) // workers), max_input_length=0)
    return [result.hypotheses[0][:cap] for result, cap in zip(results, caps, strict=True)]


def _ct2_runner(engine: str, spec: dict) -> Runner:
    from bench.ctranslate2_convert import source_tokens
    from service.core.vocabulary import Vocabulary

    vocabulary = Vocabulary.from_file(Path(spec["checkpoint"]) / "tokenizer.json")
    compute_type = "int8" if engine in BEST_CT2_INT8 else "float32"
    workers = spec["threads"] if engine.endswith("_workers") else 1
    translator = load_translator(spec["ct2_dir"], spec["threads"] // workers, compute_type, workers,
                                 spec["device"])
    # Ids -> strings is this harness's doing, not CTranslate2's work: done before timing (prime), the batch
    # kept alongside so that a recycled id() can never hit a stale entry.
    tokens_of: dict[int, tuple[Batch, list[list[str]]]] = {}

    def tokens_for(batch: Batch) -> list[list[str]]:
        cached = tokens_of.get(id(batch))
        if cached is None or cached[0] is not batch:
            cached = tokens_of[id(batch)] = (batch, [source_tokens(vocabulary, ids) for ids in batch.ids])
        return cached[1]

    def prime(batches: list[Batch]) -> None:
        for batch in batches:
            tokens_for(batch)

    def run(batch: Batch) -> list[list[str]]:
        return ct2_greedy(translator, tokens_for(batch), batch.max_lengths, workers)

    def to_ids(outputs: list[list[str]]) -> list[list[int]]:
        return [[vocabulary.tokenizer.token_to_id(token) for token in tokens] for tokens in outputs]
    return Runner(run, to_ids, prime)


def make_runner(engine: str, spec: dict) -> Runner:
    if engine in ("torch_nocache", "torch_cache"):
        return _torch_runner(engine, spec)
    if engine in ("ours", "ours_attention", "ours_int8"):
        return _ours_runner(engine, spec)
    if engine in (*BEST_CT2_F32, *BEST_CT2_INT8):
        return _ct2_runner(engine, spec)
    raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")


def _batches_from(raw: list[dict]) -> list[Batch]:
    return [Batch(b["ids"], b["max_lengths"]) for b in raw]


def worker_prepare(spec: dict) -> dict:
    """Convert the checkpoint for CTranslate2, then translate the parity batches with every engine."""
    started = time.perf_counter()
    if any(engine.startswith("ct2") for engine in spec["engines"]):
        from bench.ctranslate2_convert import convert_to_ctranslate2

        convert_to_ctranslate2(spec["checkpoint"], spec["ct2_dir"])
        print(f"  converted {spec['checkpoint']} for CTranslate2 in {time.perf_counter() - started:.1f}s",
              flush=True)
    from model.evaluate import corpus_scores
    from service.core.vocabulary import Vocabulary

    vocabulary = Vocabulary.from_file(Path(spec["checkpoint"]) / "tokenizer.json")
    encoded = [vocabulary.encode_source(text) for text in spec["texts"]]
    batches = _batches_from(spec["batches"])
    outputs, quality = {}, {}
    for engine in spec["engines"]:
        runner = make_runner(engine, spec)
        outputs[engine] = [ids for batch in batches for ids in runner.to_ids(runner.run(batch))]
        texts = [vocabulary.decode(ids, source) for ids, source in zip(outputs[engine], encoded, strict=True)]
        quality[engine] = {**corpus_scores(texts, spec["references"]), "pairs": len(texts)}
        print(f"  parity run: {engine} done (BLEU {quality[engine]['bleu']:.2f}, exact match "
              f"{quality[engine]['exact_match']:.1%})", flush=True)
    return {"outputs": outputs, "quality": quality}


def worker_time(spec: dict) -> dict:
    """Time one engine on every batch size: whole passes over the same batches until min_seconds pass."""
    engine = spec["engine"]
    runner = make_runner(engine, spec)
    run = runner.run
    results = {}
    for size, raw in spec["batches_by_size"].items():
        batches = _batches_from(raw)
        runner.prime(batches)
        n_sentences = sum(len(b.ids) for b in batches)
        for batch in batches[:2]:  # warm-up: first calls allocate (ORT arena, torch caches, CT2 buffers)
            run(batch)
        pass_seconds: list[float] = []
        tokens = 0
        while not pass_seconds or sum(pass_seconds) < spec["min_seconds"]:
            start = time.perf_counter()
            for batch in batches:
                tokens += sum(len(t) for t in run(batch))
            pass_seconds.append(time.perf_counter() - start)
        seconds = sum(pass_seconds)
        passes = len(pass_seconds)
        results[size] = {"seconds": seconds, "passes": passes, "sentences": n_sentences * passes,
                         "tokens": tokens, "pass_seconds": pass_seconds,
                         "sentences_per_s": n_sentences * passes / seconds, "tokens_per_s": tokens / seconds}
        entry = results[size]
        print(f"  [{spec['label']}] {engine:<15} batch {size:>4}: {entry['sentences_per_s']:9.1f} sent/s "
              f"{entry['tokens_per_s']:10.1f} tok/s ({seconds:.1f}s, {passes} pass"
              f"{'es' if passes > 1 else ''})", flush=True)
    return {"engine": engine, "results": results}


def worker_main(argv: list[str]) -> None:
    kind, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = worker_prepare(spec) if kind == "prepare" else worker_time(spec)
    Path(out_path).write_text(json.dumps(result))


# -- orchestration (parent process: no torch, onnxruntime or CTranslate2) ----------------------------

def openmp_threads(engine: str, threads: int) -> int:
    """OpenMP pool size of an engine's process: per worker for CTranslate2's worker-per-thread setting
    (each of its workers would otherwise start an OpenMP team of `threads` and oversubscribe the cores)."""
    return 1 if engine.endswith("_workers") else threads


def _run_worker(kind: str, spec: dict, work_dir: Path, name: str, threads: int) -> dict:
    spec_path, out_path = work_dir / f"{name}.spec.json", work_dir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    # Every library's pool gets the same size; OpenMP/MKL read these before any API call can set them.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[variable] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, "-m", "bench.engine", "worker", kind, str(spec_path),
                                str(out_path)], env=env, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"{name} worker failed with exit status {completed.returncode}")
    return json.loads(out_path.read_text())


def machine_info(threads: int) -> dict:
    cpu_model = None
    cores: set[tuple[str, str]] = set()
    try:
        physical = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and cpu_model is None:
                cpu_model = value
            elif key == "physical id":
                physical = value
            elif key == "core id":
                cores.add((physical, value))
    except OSError:
        pass
    return {"cpu_model": cpu_model or platform.processor(), "physical_cores": len(cores) or None,
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "threads": threads, "platform": platform.platform(), "python": platform.python_version(),
            "versions": library_versions(), "load_average_at_start": list(os.getloadavg())}


# The imported modules' own versions (onnxruntime and onnxruntime-gpu both provide `onnxruntime`, and the
# installed distributions' metadata can name the one that is not imported), read in a subprocess so that this
# one never loads the libraries.
VERSIONS_SCRIPT = """
import importlib, json
versions = {}
for name in ("onnxruntime", "ctranslate2", "torch", "numpy"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except ImportError:
        versions[name] = None
print(json.dumps(versions))
"""


def library_versions() -> dict[str, str | None]:
    command = [sys.executable, "-c", VERSIONS_SCRIPT]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"could not read the libraries' versions: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gpu_info() -> str | None:
    """The GPU as nvidia-smi names it (name, driver, memory); None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def check_same_model(checkpoint: Path, repository: Path, name: str, version: int | None,
                     engines: Sequence[str] = ()) -> Path:
    """The repository version must be an export of the checkpoint: same architecture and tokenizer; and have
    the int8 graphs when `engines` time ours at int8."""
    from service.core.model_format import offered_precisions, resolve

    model_version = resolve(repository, name, version)
    exported = model_version.description.get("architecture", {})
    trained = json.loads((checkpoint / "config.json").read_text())["model"]
    if exported != trained:
        raise SystemExit(f"{model_version.path}/model.json describes {exported}, but {checkpoint} holds "
                         f"{trained}: not the same model")
    if (checkpoint / "tokenizer.json").read_bytes() != model_version.file("tokenizer.json").read_bytes():
        raise SystemExit(f"{checkpoint}/tokenizer.json differs from {model_version.path}/tokenizer.json")
    if "ours_int8" in engines and "int8" not in offered_precisions(model_version.description):
        raise SystemExit(f"{model_version.path} has no int8 graphs: export it again with translator-export, "
                         "or leave the int8 rows out with --no-int8")
    return model_version.path


def first_difference(reference: list[list[int]], other: list[list[int]], sources: list[list[int]],
                     detokenize: Callable[[list[int]], str]) -> tuple[int, dict | None]:
    mismatches = [i for i, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b]
    if not mismatches:
        return 0, None
    i = mismatches[0]
    ours, theirs = reference[i], other[i]
    position = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                    min(len(ours), len(theirs)))
    return len(mismatches), {"sentence": i, "source": detokenize(sources[i][:-1]),
                             "first_differing_token": position, "ours": detokenize(ours),
                             "theirs": detokenize(theirs), "ours_ids": ours, "theirs_ids": theirs}


def summarize(rounds: list[dict], engines: list[str], batch_sizes: list[int]) -> dict:
    summary: dict[str, dict] = {}
    for engine in engines:
        summary[engine] = {}
        for size in batch_sizes:
            runs = [r["results"][str(size)] for r in rounds if r["engine"] == engine]
            if not runs:
                continue
            per_round = [r["sentences_per_s"] for r in runs]
            summary[engine][str(size)] = {
                "sentences_per_s": statistics.median(per_round),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "rounds_sentences_per_s": per_round,
                "spread": max(per_round) / min(per_round) - 1,  # (max - min) / min over rounds
            }
    return summary


def ratios(summary: dict, batch_sizes: list[int]) -> dict:
    out: dict[str, dict[str, float]] = {}
    for size in batch_sizes:
        key = str(size)
        speeds = {engine: entry[key]["sentences_per_s"] for engine, entry in summary.items() if key in entry}
        for best, engines in (("ct2_f32_best", BEST_CT2_F32), ("ct2_int8_best", BEST_CT2_INT8)):
            measured = [speeds[engine] for engine in engines if engine in speeds]
            if measured:
                speeds[best] = max(measured)
        out[key] = {label: speeds[numerator] / speeds[denominator]
                    for label, numerator, denominator in RATIOS
                    if numerator in speeds and denominator in speeds}
    return out


def format_table(summary: dict, ratio_rows: dict, engines: list[str], batch_sizes: list[int]) -> str:
    width = 22
    header = f"{'engine':<40}" + "".join(f"{'batch ' + str(s):>{width}}" for s in batch_sizes)
    sub = f"{'':<40}" + "".join(f"{'sent/s   tok/s':>{width}}" for _ in batch_sizes)
    lines = [header, sub]
    for engine in engines:
        cells = []
        for size in batch_sizes:
            entry = summary.get(engine, {}).get(str(size))
            cells.append(f"{entry['sentences_per_s']:>9.1f} {entry['tokens_per_s']:>9.0f}" if entry else "-")
        lines.append(f"{ENGINES[engine]:<40}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("")
    lines.append(f"{'ratio (sentences/s)':<40}"
                 + "".join(f"{'batch ' + str(s):>{width}}" for s in batch_sizes))
    for label, _, _ in RATIOS:
        values = [ratio_rows[str(s)].get(label) for s in batch_sizes]
        if any(v is not None for v in values):
            lines.append(f"{label:<40}" + "".join(f"{(f'{v:.2f}x' if v is not None else '-'):>{width}}"
                                                  for v in values))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="translator-bench engine", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "toy-en-es"),
                        help="translator-train checkpoint")
    parser.add_argument("--repository", default=str(ROOT / "model_repository"),
                        help="repository of the ONNX export")
    parser.add_argument("--model", default="toy-en-es", help="model name in the repository")
    parser.add_argument("--version", type=positive_int, default=None,
                        help="model version (default: the latest)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 32, 128],
                        help="comma-separated (default 1,8,32,128)")
    parser.add_argument("--sentences", type=positive_int, default=512,
                        help="test-split sentences per batch size")
    parser.add_argument("--threads", type=positive_int, default=2, help="intra-op threads for every engine")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every engine runs (cuda: onnxruntime's CUDA provider, PyTorch and "
                             "CTranslate2 on the GPU)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="interleaved rounds; the median is reported")
    parser.add_argument("--min-seconds", type=nonnegative_float, default=3.0,
                        help="least time per measurement")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {list(ENGINES)}")
    parser.add_argument("--no-int8", action="store_true",
                        help="leave out the int8 rows (ours and CTranslate2)")
    parser.add_argument("--parity-sentences", type=positive_int, default=None,
                        help="test-split sentences of the parity and quality run (default: all 1,000)")
    parser.add_argument("--max-mismatches", type=nonnegative_int, default=0,
                        help="sentences an engine may translate differently from ours before timing "
                             "is refused")
    parser.add_argument("--ct2-dir", default=None, help="where to write the CTranslate2 conversion "
                                                        "(default: a temporary folder)")
    parser.add_argument("--json", type=output_file, default=None,
                        help="write every figure and the machine description here")
    parser.add_argument("--save", action="store_true",
                        help="keep the run in docs/results/<date>_<commit>_<machine>_engine/ "
                             "(bench-engine.json, run.json), where `translator-bench performance` reads it")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.no_int8:
        args.engines = [e for e in args.engines if e not in INT8_ENGINES]
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES)}")
    if REFERENCE not in args.engines:
        parser.error(f"'{REFERENCE}' is the reference of the parity check and the ratios: keep it in "
                     "--engines")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from model.data import toy_split
    from service.core.vocabulary import Vocabulary

    checkpoint, repository = Path(args.checkpoint).resolve(), Path(args.repository).resolve()
    version_dir = check_same_model(checkpoint, repository, args.model, args.version, args.engines)
    meta = json.loads((checkpoint / "config.json").read_text())["model"]
    vocabulary = Vocabulary.from_file(checkpoint / "tokenizer.json")
    examples = toy_split("test")
    texts = [examples[i % len(examples)].source for i in range(args.sentences)]
    sources = [vocabulary.encode_source(text).ids for text in texts]
    checked = examples[: args.parity_sentences] if args.parity_sentences else examples
    test_sources = [vocabulary.encode_source(example.source).ids for example in checked]
    max_positions = int(meta.get("max_positions", 512))
    batches_by_size = {str(size): [asdict(b) for b in make_batches(sources, size, max_positions)]
                       for size in args.batch_sizes}
    report: dict[str, Any] = {
        "command": shlex.join(["translator-bench", "engine", *argv]), "argv": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(args.threads), "gpu": gpu_info() if args.device == "cuda" else None},
        "settings": {"checkpoint": str(checkpoint), "repository": str(repository), "model": args.model,
                     "model_version_dir": str(version_dir), "batch_sizes": args.batch_sizes,
                     "sentences": args.sentences, "threads": args.threads, "device": args.device,
                     "rounds": args.rounds,
                     "min_seconds": args.min_seconds, "engines": args.engines,
                     "max_length_rule": "per sentence: min(2 * source length (</s> included) + 10, "
                                        f"{MAX_LENGTH_LIMIT}); CTranslate2 gets the batch maximum and its "
                                        "outputs are cut to each sentence's cap",
                     "decoding": "greedy", "tokens_counted": "generated tokens without </s>",
                     "architecture": meta},
        "engine_labels": {e: ENGINES[e] for e in args.engines},
    }
    print(f"translator-bench engine: {len(args.engines)} engines on {args.device}, batch sizes "
          f"{args.batch_sizes}, {args.sentences} sentences each, {args.threads} threads, "
          f"{args.rounds} rounds", flush=True)
    if args.device == "cuda":
        print(f"  GPU: {report['machine']['gpu']}", flush=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        # OpenMP engines (PyTorch, CTranslate2) spin at barriers: a preempted worker thread stalls all of
        # them, so on a shared machine they lose far more than onnxruntime does and the ratios mislead.
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores: the machine is not quiet, "
              "figures are not reliable", flush=True)

    with tempfile.TemporaryDirectory(prefix="translator-bench-") as scratch:
        work_dir = Path(scratch)
        ct2_dir = Path(args.ct2_dir).resolve() if args.ct2_dir else work_dir / "ctranslate2"
        common = {"checkpoint": str(checkpoint), "repository": str(repository), "model": args.model,
                  "version": args.version, "ct2_dir": str(ct2_dir), "threads": args.threads,
                  "device": args.device}

        # Parity and quality on the test split (by default all of it, which holds the timed sentences), in
        # batches of the largest size.
        parity_size = max(args.batch_sizes)
        print(f"parity: every engine translates {len(checked)} sentences of the test split (batch "
              f"{parity_size})", flush=True)
        parity_batches = [asdict(b) for b in make_batches(test_sources, parity_size, max_positions)]
        prepared = _run_worker("prepare", {**common, "engines": args.engines, "batches": parity_batches,
                                           "texts": [e.source for e in checked],
                                           "references": [e.target for e in checked]},
                               work_dir, "prepare", args.threads)
        outputs = prepared["outputs"]
        report["quality"] = prepared["quality"]
        parity: dict[str, dict] = {}
        refused = []
        for engine in args.engines:
            if engine == REFERENCE:
                continue
            count, example = first_difference(outputs[REFERENCE], outputs[engine], test_sources,
                                              vocabulary.decode)
            parity[engine] = {"mismatches": count, "compared": len(test_sources), "first_difference": example,
                              "enforced": engine not in PARITY_EXEMPT}
            status = "OK" if count == 0 else ("differs (allowed, not a reference)" if engine in PARITY_EXEMPT
                                               else "DIFFERS")
            print(f"  {ENGINES[engine]:<40} {count:>4} of {len(test_sources)} sentences differ from ours: "
                  f"{status}")
            if example is not None:
                print(f"    first: sentence {example['sentence']} {example['source']!r}\n"
                      f"      ours:   {example['ours']!r}\n      theirs: {example['theirs']!r} "
                      f"(first differing token {example['first_differing_token']})")
            if engine not in PARITY_EXEMPT and count > args.max_mismatches:
                refused.append(engine)
        report["parity"] = parity
        if refused:
            report["refused"] = (f"engines {refused} disagree with ours on more than {args.max_mismatches} "
                                 "sentences")
            _write_json(args.json, report)
            print(f"refusing to time: {report['refused']}", file=sys.stderr)
            raise SystemExit(2)

        rounds = []
        for round_index in range(args.rounds):
            # Rotate the order so no engine always runs first (cold caches) or right after the same neighbour.
            shift = round_index % len(args.engines)
            order = args.engines[shift:] + args.engines[:shift]
            for engine in order:
                label = f"round {round_index + 1}/{args.rounds}"
                spec = {**common, "engine": engine, "label": label, "min_seconds": args.min_seconds,
                        "batches_by_size": batches_by_size}
                result = _run_worker("time", spec, work_dir, f"{engine}-{round_index}",
                                     openmp_threads(engine, args.threads))
                rounds.append({"round": round_index, **result})
    report["rounds"] = rounds
    report["results"] = summarize(rounds, args.engines, args.batch_sizes)
    report["ratios"] = ratios(report["results"], args.batch_sizes)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    print()
    print(format_table(report["results"], report["ratios"], args.engines, args.batch_sizes))
    _write_json(args.json, report)
    if args.json:
        print(f"\nwrote {args.json}")
    if args.save:
        folder = run_folder("engine")
        _write_json(str(folder / "bench-engine.json"), report)
        write_run_json(folder, ["translator-bench", "engine", *(argv or [])], {"device": args.device})
        print(f"kept in {folder}")
    return report


def _write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        main()
