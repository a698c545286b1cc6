"""The comparison method of ``runtimes.benchmark``: turns start only when every contender's process is idle."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time

import pytest

from molmoact2_edge.runtimes import benchmark


class _FakeWorker:
    """A worker whose process keeps using CPU for its first ``busy_polls`` polls (a spinning pool), then stops."""

    def __init__(self, busy_polls: int) -> None:
        self.busy_polls, self.polls, self.used = busy_polls, 0, 0.0

    def cpu_seconds(self) -> float:
        self.polls += 1
        if self.polls <= self.busy_polls:
            self.used += 0.01
        return self.used


def test_settle_waits_until_cpu_time_stops_growing(monkeypatch) -> None:
    monkeypatch.setattr(benchmark, "SETTLE_S", 0.001)
    quiet, spinning = _FakeWorker(0), _FakeWorker(5)
    benchmark._settle([quiet, spinning])  # type: ignore[list-item]
    assert spinning.polls > spinning.busy_polls  # polled past its busy phase, then found it idle
    assert spinning.polls <= spinning.busy_polls + 2


def test_settle_gives_up_and_says_so(monkeypatch, caplog) -> None:
    monkeypatch.setattr(benchmark, "SETTLE_S", 0.001)
    monkeypatch.setattr(benchmark, "SETTLE_MAX_S", 0.02)
    forever = _FakeWorker(10**9)
    with caplog.at_level(logging.WARNING, logger="molmoact2_edge.runtimes.benchmark"):
        benchmark._settle([forever])  # type: ignore[list-item]
    assert "kept using CPU" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc gives a process's CPU time")
def test_cpu_seconds_reads_a_process_cpu_time() -> None:
    """The counter _settle and idle_cpu_ms read: it grows while the process computes and not while it waits."""
    spin = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nsys.stdout.write('x\\n'); sys.stdout.flush(); sys.stdin.read()"
    process = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "x\n"
        worker = object.__new__(benchmark._Worker)
        worker._process = process  # only cpu_seconds is used: it reads the process's /proc entry
        busy = worker.cpu_seconds()
        time.sleep(0.2)
        assert busy >= 0.25 and not math.isnan(busy)
        assert worker.cpu_seconds() - busy < 0.05  # blocked on stdin: no CPU
    finally:
        process.communicate("")


def test_reply_skips_lines_a_library_printed() -> None:
    import io
    import types

    worker = object.__new__(benchmark._Worker)
    worker._process = types.SimpleNamespace(stdout=io.StringIO('loading weights...\n{"ready": {"name": "x"}}\n'))  # type: ignore[assignment]
    assert worker._reply() == {"ready": {"name": "x"}}


def test_fits_together_weighs_the_models_against_available_memory(monkeypatch, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "flow.onnx.data").write_bytes(b"\0" * 1000)
    contenders = [benchmark.Contender(f"c{i}", "onnxruntime") for i in range(3)]
    # 3 workers x 1000 bytes x 2 = 6000 bytes must fit in 75 % of what is available
    monkeypatch.setattr(benchmark, "_available_memory", lambda: 8000)
    assert benchmark.fits_together(bundle, contenders)
    monkeypatch.setattr(benchmark, "_available_memory", lambda: 7999)
    assert not benchmark.fits_together(bundle, contenders)
    monkeypatch.setattr(benchmark, "_available_memory", lambda: None)  # the OS does not say: keep them loaded
    assert benchmark.fits_together(bundle, contenders)


@pytest.mark.slow
def test_one_process_per_turn_times_the_same_calls(monkeypatch) -> None:
    """Where memory cannot hold every contender, each turn starts and ends its process; the report is the same."""
    from tests._runtime_bundle import tiny_bundle

    _, _, bundle = tiny_bundle()
    contenders = [benchmark.Contender("one", "onnxruntime", {"intra_op_threads": 1}), benchmark.Contender("two", "onnxruntime", {"intra_op_threads": 1})]
    monkeypatch.setattr(benchmark, "_available_memory", lambda: 1)
    report = benchmark.compare_backends(bundle, contenders, iterations=4, warmup=1, rounds=2)
    assert report["resident"] is False and "ended for each turn" in report["method"]
    for result in report["backends"].values():
        assert result["stages_ms"]["total"]["count"] == 4 and len(result["spread_ms"]["round_medians"]) == 2
        assert result["idle_cpu_ms"] == 0  # no other contender's process exists during a turn
