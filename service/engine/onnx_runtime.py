"""onnxruntime sessions for the model's graphs: providers (CUDA when usable), thread settings, checks.

Also the one CPU setting the engine's own threads take (denormals flushed to zero), since it belongs with
how a session runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import logging
import os
import platform
import re
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import onnxruntime as ort

from service.core.model_format import ModelLoadError

log = logging.getLogger("translator.engine")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# onnxruntime logs a failed CUDA provider and carries on with the CPU; the log says why.
CUDA_FAILED = "its log above says why: usually a CUDA or cuDNN library it cannot find"


def available_providers() -> list[str]:
    return ort.get_available_providers()


_PRELOAD_LOCK = threading.Lock()


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the `nvidia-*` pip packages before the first CUDA session.

    onnxruntime-gpu does not link them from there itself; without this, a machine whose CUDA comes from pip
    (no system toolkit) fails to create the CUDA provider and onnxruntime quietly falls back to the CPU.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21: the libraries must be on the loader's path
        return
    printed = io.StringIO()
    # It reports what it could not load on stdout (in colour): caught for the log. redirect_stdout swaps the
    # process-wide sys.stdout, so engines loading at the same time take turns (functools.cache does not lock).
    with _PRELOAD_LOCK, contextlib.redirect_stdout(printed):
        preload()
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", printed.getvalue()).split())
    if message:
        log.warning("loading CUDA libraries: %s", message)


# Float32 matrix products in float32, not TF32 (the CUDA provider's default on Ampere and later): TF32 keeps
# 10 mantissa bits, which moves log-probs by ~1e-3 and can flip a greedy choice against the PyTorch model.
CUDA_OPTIONS = {"use_tf32": "0"}


def choose_providers(device: str) -> list[str]:
    """`auto` takes CUDA when onnxruntime-gpu sees a GPU; `cuda` insists on it; `cpu` never uses it."""
    available = available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        preload_cuda_libraries()
        return [CUDA, CPU]
    if device == "cuda":
        raise ModelLoadError(f"device 'cuda' asked for, but onnxruntime offers only {available}")
    return [CPU]


# A padded key's attention score is the most negative float, and onnxruntime's CPU softmax takes exp of it
# through denormal intermediates, which CPUs run many times slower (docs/decisions/denormals.md). The threads
# the engine owns (its lane threads, the lane processes) therefore flush denormals to zero for good. The
# caller's threads are left alone: onnxruntime's own option (session.set_denormal_as_zero) would set this on
# whichever thread builds a session, where the caller's code would then run without denormals too.
_MXCSR_FLUSH_DENORMALS = 0x8040  # bit 15: flush to zero; bit 6: denormals are zero


@functools.cache
def _libm() -> ctypes.CDLL | None:
    """glibc's libm on x86-64 (its fenv_t holds the SSE control word MXCSR as the 8th 32-bit field)."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


def flush_denormals_on_this_thread() -> bool:
    """Flush denormal floats to zero on the calling thread from now on; only for threads the engine owns.
    False where that cannot be done (not x86-64 Linux), which only costs speed."""
    libm = _libm()
    environment = (ctypes.c_uint32 * 16)()  # fenv_t is 32 bytes; room to spare
    if libm is None or libm.fegetenv(environment) != 0:
        return False
    environment[7] |= _MXCSR_FLUSH_DENORMALS
    return libm.fesetenv(environment) == 0


# The lanes run the same sessions at once, and a session's CPU arena serves them under one lock; the system
# allocator does not (docs/decisions/cpu-memory-arena.md).
CPU_MEMORY_ARENA = False


def make_session(
    path: Path, providers: list[str], threads: int | None, spinning: bool = False, cuda_graph: bool = False
) -> ort.InferenceSession:
    """An onnxruntime session; `spinning` lets idle intra-op workers busy-wait for the next operator.

    Spinning is off by default: each session has its own pool, so the encoder's workers spin while the
    decoder runs, and any worker spins while Python does the search between steps. On a machine whose
    cores are shared (a server's other threads, other processes) those spinning threads take the cores the
    running ones need: greedy batch 32 on 2 threads of a busy 2-core machine ran 3x faster without it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if providers[0] == CPU:
        options.enable_cpu_mem_arena = CPU_MEMORY_ARENA
    # `cuda_graph`: onnxruntime captures the graph's kernels once per shape and replays them (its inputs and
    # outputs must then stay at the same addresses: service.engine.fixed_step).
    cuda_options = {**CUDA_OPTIONS, "enable_cuda_graph": "1"} if cuda_graph else CUDA_OPTIONS
    provider_options = [cuda_options if name == CUDA else {} for name in providers]
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=providers, provider_options=provider_options
        )
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({error})") from error


def check_signature(
    session: ort.InferenceSession, path: Path, inputs: Iterable[str], outputs: Iterable[str], described: dict
) -> None:
    """The graph must have the inputs/outputs the engine feeds and model.json promises."""
    actual_inputs = [i.name for i in session.get_inputs()]
    actual_outputs = [o.name for o in session.get_outputs()]
    if actual_inputs != list(inputs) or actual_outputs != list(outputs):
        raise ModelLoadError(
            f"{path}: graph has inputs {actual_inputs} and outputs {actual_outputs}, "
            f"expected {list(inputs)} and {list(outputs)}"
        )
    if described.get("inputs") != actual_inputs or described.get("outputs") != actual_outputs:
        raise ModelLoadError(f"{path}: its inputs/outputs do not match those listed in model.json")

