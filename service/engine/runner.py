"""`Runner`: one lane's means of decoding: the model's sessions, the backend over them, the shared search.

An engine runs one Runner in its own process (in-process lanes share it: onnxruntime sessions may run from
several threads at once) or one per lane process (service.engine.lane_worker). Every search returns its own
timings with its results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from service.core.model_format import (
    ENCODER_INPUTS,
    FIXED_STEP,
    STEP_GRAPHS,
    ModelLoadError,
    ModelVersion,
    decoder_inputs,
    decoder_outputs,
    encoder_outputs,
    fixed_step_inputs,
    fixed_step_outputs,
    select_inputs,
    select_outputs,
)
from service.core.options import TranslateOptions, max_steps
from service.core.running_batch import RunningBatch
from service.core.search import Hypothesis, padded, search
from service.engine.backend import OnnxBackend
from service.engine.fixed_step import FixedStepBackend
from service.engine.onnx_runtime import CUDA, check_signature, make_session
from service.engine.timing import Searched, StageTimes, TimedBackend

log = logging.getLogger("translator.engine")


class Runner:
    """Sessions for `providers` with `threads` intra-op threads each, checked against model.json.

    `provider` is the one the sessions really got: onnxruntime falls back to the CPU when it cannot start
    CUDA, and the caller decides what that means (service.engine.engine).
    """

    def __init__(
        self,
        model: ModelVersion,
        providers: list[str],
        threads: int,
        spinning: bool = False,
        io_binding: bool | None = None,
        step_graph: str = "dynamic",
    ) -> None:
        if step_graph not in STEP_GRAPHS:
            raise ValueError(f"step_graph must be one of {STEP_GRAPHS}, got {step_graph!r}")
        self.model = model
        self.step_graph = step_graph
        self.special_ids = model.special_ids
        self.encoder = make_session(model.graph_file("encoder"), providers, threads, spinning)
        self.decoder = make_session(model.graph_file("decoder"), providers, threads, spinning)
        self.selector = make_session(model.graph_file("select"), providers, 1, spinning)
        self.provider = self.encoder.get_providers()[0]
        self._check_signatures()
        self._check_shapes()
        on_cuda = self.provider == CUDA
        # IO binding (caches kept on the device between steps) is automatic on CUDA; on CPU there is no
        # copy to spare, so plain numpy feeds stay the default there (`io_binding=True` forces it, for tests).
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        architecture = model.architecture
        graphs = OnnxBackend(
            self.encoder,
            self.decoder,
            self.selector,
            architecture.n_decoder_layers,
            architecture.n_heads,
            architecture.head_dim,
            self.special_ids["pad"],
            n_encoder_layers=architecture.n_encoder_layers,
            io_binding=self.io_binding,
            device_type="cuda" if on_cuda else "cpu",
            device_id=0,
        )
        # What the search steps: the backend above, or the fixed-shape step over its encoder.
        self.backend: OnnxBackend | FixedStepBackend = graphs
        if step_graph == "fixed":
            path = model.fixed_step_file()
            fixed = make_session(path, providers, threads, spinning, cuda_graph=on_cuda)
            layers = architecture.n_decoder_layers
            check_signature(fixed, path, fixed_step_inputs(layers), fixed_step_outputs(layers),
                            model.description["graphs"][FIXED_STEP])
            self.backend = FixedStepBackend(
                graphs, fixed, architecture.tgt_vocab_size, self.special_ids["pad"],
                max_capacity=model.max_positions, device_type="cuda" if on_cuda else "cpu",
                cuda_graph=on_cuda,
            )

    def search(
        self,
        sources: list[list[int]],
        options: TranslateOptions,
        max_length_limit: int,
        on_token: Callable[[int, int], object] | None = None,
        is_abandoned: Callable[[int], bool] | None = None,
        on_done: Callable[[int, Hypothesis], object] | None = None,
    ) -> Searched:
        """The shared search over one padded batch of source ids, each row with its own length limit."""
        times = StageTimes()
        ids = self.special_ids
        hypotheses = search(
            TimedBackend(self.backend, times),
            padded(sources, ids["pad"]),
            pad_id=ids["pad"],
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            beam_size=options.beam_size,
            max_length=np.array([max_steps(len(s), options.max_length, max_length_limit) for s in sources]),
            length_penalty=options.length_penalty,
            with_attention=options.needs_attention,
            on_token=on_token,
            is_abandoned=is_abandoned,
            on_done=on_done,
        )
        return Searched(hypotheses, times)

    def running_batch(
        self,
        options: TranslateOptions,
        on_token: Callable[[object, int], object] | None = None,
        on_done: Callable[[object, Hypothesis], object] | None = None,
        is_abandoned: Callable[[object], bool] | None = None,
    ) -> TimedRunningBatch:
        """A running batch on this runner (greedy, no attention: `TranslateOptions.joins_running_batch`)."""
        if not options.joins_running_batch:
            raise ValueError("only greedy search without attention maps runs as a running batch")
        times = StageTimes()
        ids = self.special_ids
        batch = RunningBatch(
            TimedBackend(self.backend, times),
            pad_id=ids["pad"],
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            length_penalty=options.length_penalty,
            on_token=on_token,
            on_done=on_done,
            is_abandoned=is_abandoned,
            max_positions=self.model.max_positions,
        )
        return TimedRunningBatch(batch, times)

    def _check_signatures(self) -> None:
        """The graphs must have the inputs/outputs the backend feeds and model.json promises."""
        architecture, graphs = self.model.architecture, self.model.description["graphs"]
        layers = architecture.n_decoder_layers
        for session, name, inputs, outputs in (
            (self.encoder, "encoder", ENCODER_INPUTS, encoder_outputs(architecture.n_encoder_layers, layers)),
            (self.decoder, "decoder", decoder_inputs(layers), decoder_outputs(layers)),
            (self.selector, "select", select_inputs(layers), select_outputs(layers)),
        ):
            check_signature(session, self.model.graph_file(name), inputs, outputs, graphs.get(name, {}))

    def _check_shapes(self) -> None:
        """The graphs' fixed dimensions must be the ones model.json describes (layers, heads, vocabulary)."""
        architecture = self.model.architecture
        layers, heads, head_dim = architecture.n_decoder_layers, architecture.n_heads, architecture.head_dim
        expected = {("decoder", "log_probs"): [None, architecture.tgt_vocab_size]}
        for i in range(layers):
            expected["encoder", f"cross_key.{i}"] = [None, heads, None, head_dim]
            expected["encoder", f"cross_value.{i}"] = [None, heads, None, head_dim]
            expected["decoder", f"past_self_key.{i}"] = [None, heads, None, head_dim]
            expected["decoder", f"past_self_value.{i}"] = [None, heads, None, head_dim]
        sessions = {"encoder": self.encoder, "decoder": self.decoder}
        for (graph, name), dims in expected.items():
            session = sessions[graph]
            values = {v.name: v.shape for v in [*session.get_inputs(), *session.get_outputs()]}
            actual = [d if isinstance(d, int) else None for d in values[name]]
            if actual != dims:
                raise ModelLoadError(
                    f"{self.model.graph_file(graph)}: '{name}' has dimensions {values[name]}, but "
                    f"model.json describes {layers} decoder layers, {heads} heads of size "
                    f"{head_dim} and a vocabulary of {architecture.tgt_vocab_size}"
                )


class TimedRunningBatch:
    """A `RunningBatch` whose `add` returns the encoder seconds it took and `step` the decoder seconds
    (`ProcessRunningBatch` has the same interface for a batch running in a lane process)."""

    def __init__(self, batch: RunningBatch, times: StageTimes) -> None:
        self.batch = batch
        self._times = times

    @property
    def size(self) -> int:
        """Rows still decoding."""
        return self.batch.size

    def add(self, keys: list[object], sources: list[list[int]], max_lengths: list[int]) -> float:
        before = self._times.encode_s
        self.batch.add(keys, sources, max_lengths)
        return self._times.encode_s - before

    def step(self) -> float:
        before = self._times.decode_s
        self.batch.step()
        return self._times.decode_s - before

    def close(self) -> None:
        self.batch.close()
