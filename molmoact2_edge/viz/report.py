"""``molmo-edge report``: the plots a user looks at first, from one telemetry JSONL, as PNGs and one HTML page.

- ``joints.png``: per joint, the policy's target, what was sent and the measured state over
  time; ticks where a safety rule changed the command are marked, held ticks shaded
- ``latency.png``: each inference stage's time per chunk over the run
- ``loop_period_error.png``: how late each control tick went out, against one period
- ``power.png``: power over time and energy per chunk (only when power was measured)
- ``index.html``: the episodes, the numbers behind the plots, what each safety rule means

matplotlib (the ``plots`` extra) draws; the page links the PNGs next to it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.runtimes.plots import STAGE_ORDER, pyplot
from molmoact2_edge.runtimes.telemetry_schema import TelemetryLog, load_telemetry

RULE_TEXT = {
    "limit": "the target was outside the joint's allowed range and was clipped to it",
    "max_step": "the target was further from the last command than one tick's maximum step; the step was shortened",
    "limit+max_step": "both: clipped to the range, then the step shortened",
    "hold": "no action was due (the next chunk was late): the last command was repeated",
    "nonfinite": "the policy produced NaN/inf: refused, the last command was repeated",
}
CLIP_RULES = ("limit", "max_step", "limit+max_step", "nonfinite")


def write_report(telemetry: str | Path, out: str | Path) -> list[Path]:
    """Write the PNGs and ``index.html`` for ``telemetry`` into ``out``; returns the files, the page last."""
    log = load_telemetry(telemetry)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    t0 = float(log.start["t"])
    written = [p for p in (_joints(plt, log, t0, out), _latency(plt, log, t0, out), _period(plt, log, t0, out)) if p]
    power = _power(plt, log, t0, out)
    if power is not None:
        written.append(power)
    page = out / "index.html"
    page.write_text(_page(log, Path(telemetry), written))
    return [*written, page]


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _episode_lines(ax: Any, log: TelemetryLog, t0: float) -> None:
    ticks = log.ticks
    for episode in np.unique(ticks["episode"])[1:]:
        ax.axvline(ticks["t"][ticks["episode"] == episode][0] - t0, color="k", lw=0.6, ls=":")


def _joints(plt: Any, log: TelemetryLog, t0: float, out: Path) -> Path | None:
    ticks = log.ticks
    if len(ticks["t"]) == 0:
        return None
    names = log.joint_names
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.8 * rows), squeeze=False, sharex=True)
    t = ticks["t"] - t0
    clipped = np.isin(ticks["rule"], CLIP_RULES)
    held = ticks["held"]
    limits = log.safety[0] if log.safety else {}
    for j, name in enumerate(names):
        ax = axes[j // cols][j % cols]
        for bound in ("lower", "upper"):
            if bound in limits:
                ax.axhline(limits[bound][j], color="0.5", lw=0.8, ls="-.", label="allowed range" if bound == "lower" else None)
        for n, rows_ in enumerate(_episodes(log)):  # one line per episode: no line across the gap between them
            first = n == 0
            ax.plot(t[rows_], ticks["target"][rows_, j], color="#ff7f0e", lw=1.0, label="policy target" if first else None)
            ax.plot(t[rows_], ticks["sent"][rows_, j], color="#2ca02c", lw=1.0, ls="--", label="sent" if first else None)
            ax.plot(t[rows_], ticks["state"][rows_, j], color="#1f77b4", lw=1.2, label="measured" if first else None)
        changed = clipped & ~np.isclose(ticks["sent"][:, j], ticks["target"][:, j], atol=1e-3)
        ax.plot(t[changed], ticks["sent"][changed, j], "x", color="#d62728", ms=4, label="changed by safety")
        for start, stop in _runs(held):
            ax.axvspan(t[start], t[stop - 1] + 1e-3, color="0.85", lw=0)
        _episode_lines(ax, log, t0)
        ax.set_title(name, fontsize=10)
        if j // cols == rows - 1:
            ax.set_xlabel("time since start (s)")
        if j % cols == 0:
            ax.set_ylabel(f"position ({_units(log)})")
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(plt.Rectangle((0, 0), 1, 1, color="0.85"))
    labels.append("held (no action due)")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("joints: policy target vs what the safety layer sent vs measured (dotted line: new episode)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "joints.png", dpi=100)
    plt.close(fig)
    return out / "joints.png"


def _units(log: TelemetryLog) -> str:
    robot = str(log.start.get("robot", ""))
    return "rad; gripper 0-1" if "yam" in robot else "deg; gripper 0-100" if "so101" in robot else "robot units"


def _episodes(log: TelemetryLog) -> list[np.ndarray]:
    """Tick row indices of each episode, in order."""
    episode = log.ticks["episode"]
    return [np.flatnonzero(episode == e) for e in np.unique(episode)]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges where ``mask`` is true."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _latency(plt: Any, log: TelemetryLog, t0: float, out: Path) -> Path | None:
    timings = log.chunks["timings_ms"]
    if not timings:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.5))
    t = log.chunks["t"] - t0
    for stage in [s for s in STAGE_ORDER if s in timings] + [s for s in timings if s not in STAGE_ORDER]:
        values = timings[stage]
        if np.nanmax(values, initial=0) > 0:
            color = "k" if stage == "total" else f"C{STAGE_ORDER.index(stage) if stage in STAGE_ORDER else 9}"
            for n, episode in enumerate(np.unique(log.chunks["episode"])):
                rows = log.chunks["episode"] == episode
                ax.plot(t[rows], values[rows], ".-", lw=0.8, ms=3, color=color, label=stage if n == 0 else None)
    _episode_lines(ax, log, t0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("ms per chunk")
    ax.set_title("inference latency per stage (one point per action chunk)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, plt, out / "latency.png")


def _period(plt: Any, log: TelemetryLog, t0: float, out: Path) -> Path | None:
    ticks = log.ticks
    if len(ticks["t"]) == 0:
        return None
    fig, ax = plt.subplots(figsize=(9, 3))
    for rows_ in _episodes(log):
        ax.plot(ticks["t"][rows_] - t0, ticks["period_error_ms"][rows_], ".-", lw=0.5, ms=3, color="#1f77b4")
    _episode_lines(ax, log, t0)
    ax.set_ylim(bottom=0)
    if log.hz and np.nanmax(ticks["period_error_ms"]) >= 0.5e3 / log.hz:  # the line only where it is in range
        ax.axhline(1e3 / log.hz, color="r", ls="--", lw=0.8, label=f"one period ({1e3 / log.hz:.0f} ms): an overrun")
        ax.legend(fontsize=7)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("ms late")
    p50, p99 = np.nanpercentile(ticks["period_error_ms"], [50, 99])
    overruns = int(np.sum(ticks["period_error_ms"] >= 1e3 / log.hz)) if log.hz else 0
    ax.set_title(
        f"control loop: how late each command went out (p50 {p50:.2f} ms, p99 {p99:.2f} ms, {overruns} overruns)"
    )
    return _save(fig, plt, out / "loop_period_error.png")


def _power(plt: Any, log: TelemetryLog, t0: float, out: Path) -> Path | None:
    if len(log.power["t"]) == 0:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5))
    top.plot(log.power["t"] - t0, log.power["w"], lw=0.8)
    top.set_ylabel("W")
    top.set_xlabel("time since start (s)")
    top.set_title("power")
    energy = log.chunks["energy_j"]
    bottom.bar(np.arange(len(energy)), np.nan_to_num(energy), color="#9467bd")
    bottom.set_xlabel("chunk")
    bottom.set_ylabel("J")
    bottom.set_title("energy per action chunk")
    return _save(fig, plt, out / "power.png")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(log: TelemetryLog, source: Path, images: list[Path]) -> str:
    ticks = log.ticks
    rules, counts = np.unique(ticks["rule"][ticks["rule"] != ""], return_counts=True)
    episodes = [
        [e.get("episode"), e.get("end"), e.get("ticks"), e.get("held_ticks"), e.get("chunks"), e.get("duration_s")]
        for e in log.episodes
    ]
    stages = [
        [stage, f"{np.nanpercentile(v, 50):.1f}", f"{np.nanpercentile(v, 99):.1f}", f"{np.nanmax(v):.1f}"]
        for stage, v in log.chunks["timings_ms"].items()
        if len(v) and np.nanmax(v) > 0
    ]
    err = ticks["period_error_ms"]
    loop = (
        f"{len(err)} ticks at {log.hz:g} Hz; late by p50 {np.nanpercentile(err, 50):.2f} ms, "
        f"p99 {np.nanpercentile(err, 99):.2f} ms, max {np.nanmax(err):.2f} ms"
        if len(err)
        else "no ticks recorded"
    )
    power = log.start.get("power", {})
    energy = log.chunks["energy_j"]
    power_line = (
        f"{power.get('sampler')}: energy per chunk median {np.nanmedian(energy):.3f} J"
        if len(log.power["t"]) and np.isfinite(energy).any()
        else f"not measured ({html.escape(str(power.get('reason', 'no sampler')))})"
    )
    swaps = log.swaps["delay_ms"]
    swap_line = (
        f"{len(swaps)} chunk swaps; observation-to-use delay p50 {np.nanpercentile(swaps, 50):.0f} ms, "
        f"max {np.nanmax(swaps):.0f} ms"
        if len(swaps)
        else "no chunk swaps recorded"
    )
    rule_rows = [[r, int(c), RULE_TEXT.get(str(r), "")] for r, c in zip(rules, counts, strict=True)]
    figures = "".join(f'<h2>{p.stem.replace("_", " ")}</h2><img src="{p.name}">' for p in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>molmo-edge report: {html.escape(source.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Run report</h1>
<p>From <code>{html.escape(str(source))}</code> (telemetry schema {log.version}); robot
{html.escape(str(log.start.get("robot", "?")))}, backend {html.escape(str(log.start.get("backend", {}).get("backend", "?")))}.</p>
<h2>Episodes</h2>{_table(["episode", "end", "ticks", "held", "chunks", "seconds"], episodes)}
<h2>What the safety layer changed</h2>
<p>Ticks on which a rule changed the command (a tick counts once):</p>
{_table(["rule", "ticks", "meaning"], rule_rows) if rule_rows else "<p>none: every command went out as the policy asked.</p>"}
<h2>Timing</h2>{_table(["stage", "p50 ms", "p99 ms", "max ms"], stages)}
<p>Control loop: {loop}.</p><p>{swap_line}.</p><p>Power: {power_line}.</p>
{figures}
</body></html>
"""
