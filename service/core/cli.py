"""What every translator-* command does with its arguments and its errors.

argparse types that refuse a bad value with a one-line usage error (exit 2) before any work starts, and
`run_command`, which turns the errors a user causes (a missing or unreadable file, a model that does not
load, a value out of range found later) into one line on stderr and exit status 1 instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# Set to get the traceback of a failing command as well (for reporting a bug).
TRACEBACK_VARIABLE = "TRANSLATOR_TRACEBACK"


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: integers of at least 1, separated by commas, none empty."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected integers of at least 1 separated by commas, got {text!r}")
    return values


def output_file(text: str) -> Path:
    """A file the command will write (creating missing folders, as the commands do): refused at once if it
    cannot be, rather than after minutes of work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    # Tried rather than judged from permission bits, which root passes even where nothing can be written
    # (/proc, a read-only mount): the file itself if it exists, else a scratch file in the nearest folder
    # that exists.
    try:
        if path.exists():
            with open(path, "a"):
                pass
        else:
            folder = next(p for p in path.absolute().parents if p.exists())
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {error.strerror}") from None
    return path


def input_file(text: str) -> Path:
    """A file the command reads, resolved against the caller's folder (what it starts may run elsewhere)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path.resolve()


def server_address(text: str) -> str:
    """host:port (or [v6]:port, or unix:PATH), with a port gRPC can dial: out of range it would wrap."""
    if text.startswith("unix:"):
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port from 1 to 65535, got {text!r}")
    return text


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def run_command(prog: str, main: Callable[[], Any]) -> Any:
    """Run a command's main; the errors a user causes end it with one line (exit 1), Ctrl-C with exit 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (OSError, ValueError, RuntimeError) as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        message = str(error) or type(error).__name__
        if isinstance(error, OSError):
            if error.filename is not None and str(error.filename) not in message:
                message = f"{error.filename}: {message}"
        else:  # a ValueError or RuntimeError may also be a bug: say how to see where it came from
            message += f" ({TRACEBACK_VARIABLE}=1 shows the traceback)"
        fail(prog, message)


def absolute_path(text: str) -> Path:
    """A path resolved against the caller's folder (for paths handed to processes that run elsewhere)."""
    return Path(text).resolve()
