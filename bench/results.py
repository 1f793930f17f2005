"""Where a benchmark run keeps its files: ``docs/results/<date>_<commit>_<machine>_<bench>/``.

* ``run_folder(bench)`` returns (and creates) the folder of a new run: the UTC date, the short commit of HEAD
  (``-dirty`` when tracked files have uncommitted changes; ``unknown`` without git), a short machine name
  (``cpu<N>`` without a GPU, else the GPU's model, ``h100``, ``h200``, with ``x<count>`` for several) and the
  benchmark's name. A folder already closed by a ``run.json`` is never reused: a second run of the same
  benchmark on the same day, commit and machine gets ``<bench>-2``, then ``-3``.
* ``write_run_json(folder, command, extra)`` closes it with ``run.json``: date, commit, machine, bench, the
  command line, the Python and onnxruntime versions, the GPU if any, and ``extra``'s fields.

The benchmark's own files go in the folder as written (``report.json``, ``plot.png``, ``run.log``...), and
``translator-bench performance`` builds docs/PERFORMANCE.md from every folder.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
RUN_JSON = "run.json"
TIMEOUT_S = 10.0
FOLDER_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})_([^_]+)_([^_]+)_([^_]+)$")
# Words of a GPU's name that say nothing about its model.
GPU_NOISE = frozenset({"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "corporation"})


def _output(command: Sequence[str], cwd: Path | None = None) -> str | None:
    """The command's stdout, stripped; None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def slug(text: str) -> str:
    """Lower case letters, digits and single hyphens ("B16 delay_2" -> "b16-delay-2")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit(repo: Path = ROOT) -> str:
    """Short commit of HEAD, "-dirty" when tracked files have uncommitted changes; "unknown" without git."""
    commit = _output(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
    if not commit:
        return "unknown"
    changes = _output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return commit + ("-dirty" if changes else "")


def gpu_names() -> list[str]:
    """Names of the GPUs nvidia-smi lists (none where it is missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    text = _output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def gpu_slug(name: str) -> str:
    """A GPU's model in a few characters: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA GeForce RTX 4090" ->
    "rtx4090", "NVIDIA A100-SXM4-80GB" -> "a100"."""
    words = [w for w in re.split(r"\s+", name.lower()) if w and w not in GPU_NOISE]
    kept: list[str] = []
    for word in words:
        if any(c.isdigit() for c in word):
            kept.append(word.split("-")[0])
            break
        kept.append(word)
    return slug("".join(kept)) or "gpu"


def machine_name() -> str:
    """``cpu<N>`` (N = os.cpu_count()) without a GPU; else the first GPU's model, ``x<count>`` for several."""
    names = gpu_names()
    if not names:
        return f"cpu{os.cpu_count() or 0}"
    return gpu_slug(names[0]) + (f"x{len(names)}" if len(names) > 1 else "")


def run_folder(bench: str, root: Path = RESULTS, machine: str | None = None) -> Path:
    """Create and return ``root/<YYYY-MM-DD>_<commit>_<machine>_<bench>/`` for a new run of `bench`.

    A folder that already holds a run.json belongs to an earlier run: the next free ``<bench>-<n>`` is used.
    """
    name = slug(bench)
    if not name:
        raise ValueError(f"benchmark name {bench!r} has no letters or digits")
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    stem = f"{date}_{git_commit()}_{slug(machine) if machine else machine_name()}_{name}"
    folder = root / stem
    number = 1
    while (folder / RUN_JSON).exists():
        number += 1
        folder = root / f"{stem}-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _version(module: str) -> str | None:
    """The imported module's own version (onnxruntime-gpu and onnxruntime share a module name)."""
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # any failure to import means "not recorded"
        return None


def write_run_json(folder: Path, command: Sequence[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/run.json`` describing the run; `extra`'s fields are added and win over the defaults."""
    folder = Path(folder)
    match = FOLDER_NAME.match(folder.name)
    date, commit, machine, bench = match.groups() if match else (None, git_commit(), machine_name(), None)
    repeat = re.fullmatch(r"(.+)-\d+", bench or "")
    if repeat and (folder.parent / f"{date}_{commit}_{machine}_{repeat.group(1)}").is_dir():
        bench = repeat.group(1)  # "load-2" beside "load": the second run of "load"
    gpus = gpu_names()
    info: dict[str, Any] = {
        "date": date or datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "machine": machine,
        "bench": bench or slug(folder.name),
        "command": shlex.join(command),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "cpus": os.cpu_count(),
        "gpu": gpus[0] if gpus else None,
        **(extra or {}),
    }
    path = folder / RUN_JSON
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
