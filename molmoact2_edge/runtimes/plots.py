"""PNG plots of a benchmark or run: latency histogram per stage, loop period error, power over time.

matplotlib is imported only here and only when plotting (``pip install 'molmoact2-edge[plots]'``);
the Agg backend is forced so plots work headless on a Jetson.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from molmoact2_edge.errors import DependencyError

STAGE_ORDER = ("vision", "prefill", "depth", "decode", "flow", "total")


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise DependencyError("plots need matplotlib: pip install 'molmoact2-edge[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_histograms(stage_samples: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Path:
    """stage_samples: backend -> stage -> seconds. One subplot per stage, backends overlaid."""
    plt = pyplot()
    stages = [s for s in STAGE_ORDER if any(any(v > 0 for v in b.get(s, [])) for b in stage_samples.values())]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=False):
        for backend, samples in stage_samples.items():
            values = [v * 1e3 for v in samples.get(stage, [])]
            if values:
                ax.hist(values, bins=20, alpha=0.6, label=backend)
        ax.set_title(stage)
        ax.set_xlabel("ms")
    axes[0][0].set_ylabel("calls")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loop_jitter(period_errors_ms: Sequence[float], hz: float, path: Path) -> Path:
    """Period error of every control tick (send time - deadline), with the period marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(list(period_errors_ms), lw=0.8)
    ax.axhline(1e3 / hz, color="r", ls="--", lw=0.8, label=f"one period ({1e3 / hz:.1f} ms)")
    ax.set_xlabel("tick")
    ax.set_ylabel("period error (ms)")
    ax.set_title(f"control loop at {hz:g} Hz with inference running")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def power_trace(trace: Sequence[tuple[float, float]], path: Path, title: str = "power") -> Path | None:
    """Watts over time; None (no file) when there is no trace (power unavailable)."""
    if not trace:
        return None
    plt = pyplot()
    t0 = trace[0][0]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot([t - t0 for t, _ in trace], [w for _, w in trace], lw=0.8)
    ax.set_xlabel("s")
    ax.set_ylabel("W")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def benchmark_plots(report: Mapping[str, Any], out_dir: str | Path, hz: float) -> list[Path]:
    """The three plots of a ``run_benchmark`` report; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = {name: r.get("raw_s", {}) for name, r in report["backends"].items()}
    written = [latency_histograms(samples, out / "latency_per_stage.png")]
    written.append(loop_jitter(report["loop"]["period_errors_ms"], hz, out / "loop_jitter.png"))
    power = power_trace(report.get("power_trace", []), out / "power.png")
    return written + ([power] if power else [])
