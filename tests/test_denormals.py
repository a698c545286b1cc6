"""Flush-to-zero around CPU graph runs: denormals vanish inside the scope, the thread's mode is back after it."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from molmoact2_edge.runtimes.backends.denormals import flush_denormals

TINY = np.float32(1e-38)  # normal; times 1e-3 it is a denormal

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or platform.system() != "Linux",
    reason="the flush was only run on x86-64 Linux",
)


def test_denormals_flush_inside_the_scope_and_come_back_after() -> None:
    assert TINY * np.float32(1e-3) > 0  # IEEE denormal before
    with flush_denormals():
        assert TINY * np.float32(1e-3) == 0
        assert np.float32(1e-30) * np.float32(1e-3) > 0  # normal results are untouched
    assert TINY * np.float32(1e-3) > 0


def test_the_mode_is_restored_when_the_run_raises() -> None:
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("graph failed")
    assert TINY * np.float32(1e-3) > 0
