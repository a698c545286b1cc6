"""Live progress on stderr: a rich live line on a terminal, plain lines otherwise (logs, CI, pipes).

``RunProgress`` watches a closed-loop run through its telemetry records (episode, tick, last
chunk latency, held and clipped ticks, successes so far). ``StepProgress`` counts steps of any
other long command (eval episodes, bench rounds, export graphs, training steps). Both print to
stderr so that ``--json`` output on stdout stays machine-readable, and both are quiet when not
on a terminal: one line per ``every_s`` seconds and one per finished episode or step group,
never a redraw.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text


def stderr_console() -> Console:
    return Console(stderr=True)


class _LiveOrLines:
    """A status line: redrawn in place on a terminal, printed at most every ``every_s`` otherwise."""

    def __init__(self, console: Console | None, every_s: float) -> None:
        self.console = console or stderr_console()
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last_line = 0.0
        self._pending: str | None = None  # the newest line not printed yet (not a terminal)
        self._live: Live | None = None
        if self.console.is_terminal:
            self._live = Live(Text(""), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()

    def show(self, line: str, force: bool = False) -> None:
        """Update the status; ``force``: print it as a permanent line (an episode just ended)."""
        with self._lock:
            if self._live is not None:
                if force:
                    self._live.console.print(line, highlight=False)
                self._live.update(Text(line))
                return
            now = time.monotonic()
            if force or now - self._last_line >= self.every_s:
                self._last_line, self._pending = now, None
                self.console.print(line, highlight=False, soft_wrap=True)
            else:
                self._pending = line

    def close(self) -> None:
        """Stop redrawing; without a terminal, print the last state if it was not printed yet."""
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
            elif self._pending is not None:
                self.console.print(self._pending, highlight=False, soft_wrap=True)
                self._pending = None


class RunProgress(_LiveOrLines):
    """A telemetry observer: ``episode 1 [2/5] | tick 140 | chunk 14, 83 ms | held 3 | clipped 12 | success 1/1``.

    Episodes are numbered from 0 as in the summary and the telemetry; ``[2/5]`` counts them.
    """

    def __init__(self, episodes: int, console: Console | None = None, every_s: float = 5.0) -> None:
        super().__init__(console, every_s)
        self.episodes = episodes
        self.episode = 0
        self.ticks = self.held = self.clipped = self.chunks = 0
        self.chunk_ms: float | None = None
        self.done = self.successes = 0

    def __call__(self, record: Mapping[str, Any]) -> None:
        kind = record.get("type")
        if kind == "episode_start":
            self.episode = int(record["episode"])
            self.ticks = self.held = self.clipped = self.chunks = 0
            self.chunk_ms = None
        elif kind == "tick":
            self.ticks += 1
            self.held += bool(record.get("held"))
            self.clipped += record.get("rule") not in (None, "hold")
        elif kind == "chunk":
            self.chunks += 1
            self.chunk_ms = (record.get("timings_ms") or {}).get("total")
        elif kind == "episode":
            self.done += 1
            self.successes += bool(record.get("success"))
            self.show(self.line(end=str(record.get("end"))), force=True)
            return
        else:
            return
        self.show(self.line())

    def line(self, end: str | None = None) -> str:
        latency = f", {self.chunk_ms:.0f} ms" if self.chunk_ms is not None else ""
        status = f" | ended: {end}" if end is not None else ""
        return (
            f"episode {self.episode} [{self.episode + 1}/{self.episodes}] | tick {self.ticks} | chunk {self.chunks}{latency} | "
            f"held {self.held} | clipped {self.clipped} | success {self.successes}/{self.done}{status}"
        )


class StepProgress(_LiveOrLines):
    """``label 3/50 | note`` for commands that count steps; ``update``/``set_postfix`` as tqdm names them."""

    def __init__(
        self, label: str, total: int | None, console: Console | None = None, every_s: float = 5.0, start: int = 0
    ) -> None:
        super().__init__(console, every_s)
        self.label, self.total, self.done, self.note = label, total, start, ""

    def step(self, done: int, note: str = "", force: bool = False) -> None:
        self.done, self.note = done, note
        total = f"/{self.total}" if self.total is not None else ""
        self.show(f"{self.label} {done}{total}" + (f" | {note}" if note else ""), force=force)

    def update(self, n: int = 1) -> None:
        self.step(self.done + n, self.note)

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        self.note = " ".join(f"{k} {v}" for k, v in values.items())
