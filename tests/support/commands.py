"""External commands the static checks run (promtool, kubectl, hadolint...): finding them, running them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def tool(name: str, install: str, *, in_ci: bool = True) -> str:
    """A command from the virtualenv (the dev extra's tools) or the PATH.

    Missing, it fails the test in CI (`in_ci`: CI installs it; `install` says how) and skips it elsewhere;
    a tool CI does not install either (in_ci=False) always skips.
    """
    beside = Path(sys.executable).with_name(name)
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        message = f"{name} not found: {install}"
        if in_ci and os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(
    *command: str | Path, timeout: float = 120, env: dict[str, str] | None = None, stderr: bool = False
) -> str:
    """Its standard output (then its standard error, with `stderr`), run from the repository root; the test
    fails when it does."""
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr if stderr else done.stdout
