"""Stream a run to rerun: cameras, depth cells, joints, chunks, latency and power (``run/demo --display``).

``RerunDisplay`` is a telemetry observer (it sees every JSONL record as it is written) plus a
gate wrapper (``watch``) that shows each observation the policy is fed. Entity paths:

- ``camera/<name>``: the image the policy saw; ``camera/<name>/depth_repredicted``: boxes on the
  depth cells the Think decoder re-predicted for that chunk (the others were replayed from cache)
- ``depth/grid``: the depth codes as a grid image, re-predicted cells in red
- ``joints/<name>/state``, ``/target``, ``/sent``: measured state, the policy's target, what went out
- ``safety/rule``: a text line each time a safety rule starts changing commands (limit, max_step, hold)
- ``chunk/trajectory``: each action chunk as one line per joint (x: seconds after its observation);
  ``chunk/index``, ``chunk/swap_delay_ms``
- ``latency/<stage>``: per-chunk stage time in ms; ``loop/period_error_ms`` per tick
- ``power/watts`` per sample and ``power/energy_per_chunk_j``

One timeline, ``time``: seconds since the run started (the telemetry's monotonic clock).

The control thread only puts records on a queue; a ``rerun-display`` thread logs them, so
serialization and sinks never run inside a control tick. A display that falls more than
``QUEUE_LIMIT`` records behind drops the newest ones and says how many at close.

Modes: ``viewer`` spawns the native viewer on this machine; ``serve`` (a headless Jetson) serves
the data over gRPC on port 9876 and the web viewer on port 9090, for a browser on another
machine; ``save_rrd`` writes the same stream to a file (``rerun FILE.rrd`` opens it).
rerun-sdk is imported only here, only when a display or recording is asked for.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.errors import DependencyError, MolmoEdgeError
from molmoact2_edge.types import Observation

log = logging.getLogger(__name__)

MODES = ("auto", "viewer", "serve")
GRPC_PORT = 9876
WEB_PORT = 9090
QUEUE_LIMIT = 20_000  # records (~10 min of ticks at 30 Hz)


def _rerun() -> Any:
    try:
        import rerun
    except ImportError as err:
        raise DependencyError("--display and --save-rrd need rerun-sdk: pip install 'molmoact2-edge[display]'") from err
    return rerun


def resolve_mode(mode: str) -> str:
    """``auto``: the native viewer when this machine has a screen, else serve to a browser elsewhere."""
    if mode not in MODES:
        raise MolmoEdgeError(f"--display {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    has_screen = sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return "viewer" if has_screen else "serve"


def open_instructions(host: str | None = None) -> str:
    """What to type on the other machine to watch a served run."""
    host = host or socket.gethostname()
    grpc = f"rerun+http://{host}:{GRPC_PORT}/proxy"
    return (
        f"rerun: serving on gRPC port {GRPC_PORT} and a web viewer on port {WEB_PORT}. From another machine, open\n"
        f"  http://{host}:{WEB_PORT}/?url={grpc.replace(':', '%3A').replace('/', '%2F').replace('+', '%2B')}\n"
        f"or, with the native viewer there (pip install rerun-sdk): rerun {grpc}\n"
        f"(use the robot computer's IP address if '{host}' does not resolve)"
    )


class RerunDisplay:
    """A telemetry observer that logs every record to a rerun recording stream."""

    def __init__(self, recording: Any, rr: Any) -> None:
        self.rec, self.rr = recording, rr
        self.t0: float | None = None
        self.joint_names: list[str] = []
        self.hz = 30.0
        self._image_size: dict[str, tuple[int, int]] = {}
        self._last_rule: str | None = None
        self.dropped = 0
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._drain, name="rerun-display", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, mode: str | None, save_rrd: Path | None = None, app_id: str = "molmo-edge") -> RerunDisplay:
        """mode: None (no live display), ``auto``, ``viewer`` or ``serve``; save_rrd: also write this file."""
        rr = _rerun()
        rec = rr.RecordingStream(app_id)
        sinks = []
        if save_rrd is not None:
            Path(save_rrd).parent.mkdir(parents=True, exist_ok=True)
            sinks.append(rr.FileSink(str(save_rrd)))
        mode = resolve_mode(mode) if mode is not None else None
        if mode == "serve":
            # the web viewer is served from this machine, so the browser's origin is this machine's port 9090
            sinks.append(rr.GrpcServerSink(port=GRPC_PORT, cors_allow_origin=[f"http://*:{WEB_PORT}"]))
        if sinks:
            rec.set_sinks(*sinks)
        if mode == "viewer":
            # spawn() replaces the sinks: connect the file sink again beside the viewer's
            rec.spawn(port=GRPC_PORT, connect=False)
            rec.set_sinks(rr.GrpcSink(f"rerun+http://127.0.0.1:{GRPC_PORT}/proxy"), *sinks)
        if mode == "serve":
            rr.serve_web_viewer(web_port=WEB_PORT, open_browser=False)
        return cls(rec, rr)

    # --- feeding -------------------------------------------------------------------------

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Queue ``record`` for the display thread (never blocks the caller)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        while (record := self._queue.get()) is not None:
            handler = getattr(self, f"_on_{record.get('type')}", None)
            if handler is not None:
                try:
                    handler(record)
                except Exception:  # a display bug must not stop the robot: log it and go on
                    log.exception("rerun display: could not log a %s record", record.get("type"))

    def watch(self, gate: Any) -> _WatchedGate:
        """``gate`` with every observation it returns also shown on ``camera/<name>``."""
        return _WatchedGate(gate, self)

    def observation(self, observation: Observation) -> None:
        self({"type": "observation", "t": observation.timestamp, "images": observation.images})

    def close(self) -> None:
        """Log what is still queued, then flush and disconnect the sinks."""
        self._queue.put(None)
        self._thread.join()
        if self.dropped:
            log.warning("rerun display fell behind and dropped %d records", self.dropped)
        self.rec.flush()
        self.rec.disconnect()

    # --- one handler per record type -----------------------------------------------------

    def _at(self, t: float) -> None:
        if self.t0 is None:
            self.t0 = t
        self.rec.set_time("time", duration=max(0.0, t - self.t0))

    def _scalar(self, path: str, value: Any) -> None:
        if value is not None and np.isfinite(value):
            self.rec.log(path, self.rr.Scalars(float(value)))

    def _on_start(self, record: Mapping[str, Any]) -> None:
        self.t0 = float(record["t"])
        self.hz = float(record.get("control_hz") or self.hz)

    def _on_episode_start(self, record: Mapping[str, Any]) -> None:
        self.joint_names = list(record.get("joint_names") or self.joint_names)
        self._at(float(record["t"]))
        self.rec.log("episode", self.rr.TextLog(f"episode {record['episode']}: {record.get('task', '')}"))

    def _on_observation(self, record: Mapping[str, Any]) -> None:
        self._at(float(record["t"]))
        for name, image in record["images"].items():
            self._image_size[name] = (int(image.shape[1]), int(image.shape[0]))
            self.rec.log(f"camera/{name}", self.rr.Image(image))

    def _on_tick(self, record: Mapping[str, Any]) -> None:
        self._at(float(record["t"]))
        names = self.joint_names or [f"joint{j}" for j in range(len(record.get("sent") or []))]
        for field in ("state", "target", "sent"):
            values = record.get(field)
            if values is not None:
                for name, value in zip(names, values, strict=False):
                    self._scalar(f"joints/{name}/{field}", value)
        self._scalar("loop/period_error_ms", record.get("period_error_ms"))
        rule = record.get("rule")
        if rule and rule != self._last_rule:
            clip = record.get("clip") or []
            worst = max((abs(c) for c in clip), default=0.0)
            self.rec.log("safety/rule", self.rr.TextLog(f"{rule}: changed the command by up to {worst:.2f}"))
        self._last_rule = rule

    def _on_swap(self, record: Mapping[str, Any]) -> None:
        self._at(float(record["t"]))
        self._scalar("chunk/swap_delay_ms", record.get("delay_ms"))

    def _on_chunk(self, record: Mapping[str, Any]) -> None:
        self._at(float(record["t"]))
        self._scalar("chunk/index", record.get("index"))
        for stage, ms in record.get("timings_ms", {}).items():
            if ms:
                self._scalar(f"latency/{stage}", ms)
        self._scalar("power/energy_per_chunk_j", record.get("energy_j"))
        actions = record.get("actions")
        if actions is not None:
            self._log_trajectory(np.asarray(actions, np.float64))
        self._log_depth(record.get("info") or {})

    def _log_trajectory(self, actions: np.ndarray) -> None:
        seconds = np.arange(len(actions)) / self.hz
        strips = [np.stack([seconds, actions[:, j]], axis=1) for j in range(actions.shape[1])]
        labels = self.joint_names[: actions.shape[1]] or None
        self.rec.log("chunk/trajectory", self.rr.LineStrips2D(strips, labels=labels))

    def _log_depth(self, info: Mapping[str, Any]) -> None:
        if "depth_codes" not in info:
            return
        grid = int(info["depth_grid"])
        codes = np.asarray(info["depth_codes"], np.float64).reshape(grid, grid)
        repredicted = np.zeros(grid * grid, bool)
        repredicted[np.asarray(info["depth_repredicted"], np.int64)] = True
        gray = (255 * codes / max(1.0, codes.max())).astype(np.uint8)
        image = np.stack([gray, gray, gray], axis=-1)
        image[repredicted.reshape(grid, grid)] = (230, 40, 40)
        self.rec.log("depth/grid", self.rr.Image(image))
        camera = str(info.get("depth_camera"))
        if camera in self._image_size:
            width, height = self._image_size[camera]
            cells = np.flatnonzero(repredicted)
            w, h = width / grid, height / grid
            mins = np.stack([(cells % grid) * w, (cells // grid) * h], axis=1)
            self.rec.log(
                f"camera/{camera}/depth_repredicted",
                self.rr.Boxes2D(mins=mins, sizes=np.tile([w, h], (len(cells), 1)), colors=[(230, 40, 40)]),
            )

    def _on_power(self, record: Mapping[str, Any]) -> None:
        for t, w in zip(record["t"], record["w"], strict=True):
            self._at(float(t))
            self._scalar("power/watts", w)


class _WatchedGate:
    """An ``ActionGate`` that also shows each observation; everything else goes to the wrapped gate."""

    def __init__(self, gate: Any, display: RerunDisplay) -> None:
        self._gate, self._display = gate, display

    def observe(self, task: str) -> Observation:
        observation = self._gate.observe(task)
        self._display.observation(observation)
        return observation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gate, name)
