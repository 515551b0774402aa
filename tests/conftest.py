"""Shared test helpers (fixtures)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def wait_for_metrics() -> Callable[[Path, int], None]:
    """``wait(run, n)``: block until ``run/metrics.jsonl`` holds ``n`` lines (a running job has logged
    ``n`` records), for at most two minutes."""

    def wait(run: Path, n: int, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        m = run / "metrics.jsonl"
        while time.time() < deadline:
            if m.exists() and len(m.read_text().splitlines()) >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"{m} did not reach {n} lines in {timeout:.0f} s")

    return wait
