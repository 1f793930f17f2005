"""Waiting in tests: poll a condition until it holds or the test fails."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, message: str = "condition", every: float = 0.02
) -> T:
    """Call `condition` every `every` seconds until it returns something true, and return that; fail the
    test once `timeout` seconds have passed."""
    end = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(every)
