"""Episode videos: the camera view beside a panel of commanded vs actual joint positions, as MP4.

Each frame is the camera image (scaled up, nearest neighbour) on the left and, on the right,
one row per joint across its allowed range: the measured position (blue dot), the policy's
target (orange bar) and what the safety layer sent (green triangle); a row turns red on a tick
where a safety rule changed the command. ``demo --video`` and ``eval --videos`` write them.

matplotlib (the ``plots`` extra) draws the panel, av (the ``sim`` extra) encodes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.runtimes.plots import pyplot

PANEL_PX = 360


@dataclass
class EpisodeFrames:
    """What one episode's video shows, tick by tick. Vectors are (joints,) floats, NaN where unknown."""

    joint_names: Sequence[str]
    lower: np.ndarray
    upper: np.ndarray
    fps: float
    frames: list[np.ndarray] = field(default_factory=list)
    state: list[np.ndarray] = field(default_factory=list)
    target: list[np.ndarray] = field(default_factory=list)
    sent: list[np.ndarray] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)

    def add(
        self,
        frame: np.ndarray,
        state: Any,
        target: Any,
        sent: Any = None,
        rule: str | None = None,
    ) -> None:
        width = len(self.joint_names)
        self.frames.append(np.asarray(frame, np.uint8))
        for store, values in ((self.state, state), (self.target, target), (self.sent, sent)):
            store.append(np.full(width, np.nan) if values is None else np.asarray(values, np.float64)[:width])
        self.rule.append(rule or "")


class TickFrameCollector:
    """A telemetry observer for one episode: on each tick record, the latest camera frame + the tick's joints."""

    def __init__(self, episode: int, frames: EpisodeFrames, grab: Callable[[], np.ndarray | None]) -> None:
        self.episode, self.data, self.grab = episode, frames, grab

    def __call__(self, record: Mapping[str, Any]) -> None:
        if record.get("type") != "tick" or record.get("episode") != self.episode:
            return
        frame = self.grab()
        if frame is not None:
            self.data.add(frame, record.get("state"), record.get("target"), record.get("sent"), record.get("rule"))


class _Panel:
    """The joint panel, drawn once and updated per frame (matplotlib artists moved, not recreated)."""

    def __init__(self, data: EpisodeFrames) -> None:
        plt = pyplot()
        self.plt, self.data = plt, data
        n = len(data.joint_names)
        self.fig, self.ax = plt.subplots(figsize=(PANEL_PX / 100, PANEL_PX / 100), dpi=100)
        ax = self.ax
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_yticks(range(n), list(data.joint_names), fontsize=8)
        ax.set_xticks([0, 0.5, 1], ["lower\nlimit", "", "upper\nlimit"], fontsize=7)
        ax.grid(axis="x", lw=0.4, alpha=0.5)
        self.rows = [ax.axhspan(j - 0.45, j + 0.45, color="#e33", alpha=0.0, lw=0) for j in range(n)]
        y = np.arange(n)
        (self.state,) = ax.plot(np.zeros(n), y, "o", color="#1f77b4", ms=7, label="actual")
        (self.target,) = ax.plot(np.zeros(n), y, "|", color="#ff7f0e", ms=16, mew=3, label="policy target")
        (self.sent,) = ax.plot(np.zeros(n), y, "v", color="#2ca02c", ms=6, label="sent")
        self.fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
        self.title = self.fig.suptitle("", fontsize=8)
        self.fig.tight_layout(rect=(0, 0.06, 1, 0.94))

    def _scaled(self, values: np.ndarray) -> np.ndarray:
        span = np.maximum(self.data.upper - self.data.lower, 1e-6)
        return np.clip((values - self.data.lower) / span, -0.05, 1.05)

    def render(self, k: int) -> np.ndarray:
        d = self.data
        for artist, values in ((self.state, d.state[k]), (self.target, d.target[k]), (self.sent, d.sent[k])):
            artist.set_xdata(self._scaled(values))
        changed = ~np.isclose(d.sent[k], d.target[k], atol=1e-3) & np.isfinite(d.target[k])
        for row, hit in zip(self.rows, changed, strict=True):
            row.set_alpha(0.25 if hit and d.rule[k] else 0.0)
        rule = f"\nsafety rule: {d.rule[k]}" if d.rule[k] else "\n"
        self.title.set_text(f"commanded vs actual, tick {k} (t = {k / d.fps:.1f} s){rule}")
        self.fig.canvas.draw()
        return np.asarray(self.fig.canvas.buffer_rgba())[..., :3].copy()

    def close(self) -> None:
        self.plt.close(self.fig)


def _fit(frame: np.ndarray, height: int) -> np.ndarray:
    """Scale a camera frame to ``height`` rows by an integer-ish nearest-neighbour factor."""
    rows = np.linspace(0, frame.shape[0] - 1, height).round().astype(int)
    width = int(round(frame.shape[1] * height / frame.shape[0])) // 2 * 2
    cols = np.linspace(0, frame.shape[1] - 1, width).round().astype(int)
    return frame[rows][:, cols]


def write_episode_video(data: EpisodeFrames, path: Path) -> Path | None:
    """The MP4 of ``data`` (camera left, joint panel right); None when the episode had no frames."""
    from molmoact2_edge.data.video import VideoEncoder

    if not data.frames:
        return None
    panel = _Panel(data)
    try:
        first = np.concatenate([_fit(data.frames[0], PANEL_PX), panel.render(0)], axis=1)
        height, width = first.shape[:2]
        encoder = VideoEncoder(path, fps=max(1, int(round(data.fps))), width=width, height=height, codec="libx264", crf=23)
        try:
            encoder.add(first)
            for k in range(1, len(data.frames)):
                encoder.add(np.concatenate([_fit(data.frames[k], PANEL_PX), panel.render(k)], axis=1))
        finally:
            encoder.close()
    finally:
        panel.close()
    return path
