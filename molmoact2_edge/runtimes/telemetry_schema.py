"""The telemetry JSONL schema (versioned) and a loader that returns numpy arrays.

``docs/telemetry.md`` documents every record; this module is the code side of it:
``tick_fields`` builds the per-tick payload the control loop hands to ``Telemetry.tick``,
and ``load_telemetry`` reads a file back into arrays (one row per tick, per chunk, per
swap, per power sample) for plots, reports and notebooks.

Adding a field: add it to the dict ``tick_fields`` (or the caller's ``extra``) returns and,
if it should come back as an array, to ``TICK_VECTORS`` / ``TICK_SCALARS`` below. Readers
ignore fields they do not know, so adding one does not bump ``SCHEMA_VERSION``; renaming or
changing the meaning of one does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.errors import DatasetError

# 1: latency, loop and power only (before per-tick records); 2: + tick, swap, power, episode_start records
SCHEMA_VERSION = 2

# which safety rule changed a tick's command (``rule`` of a tick record); None: sent as the policy asked
RULES = ("limit", "max_step", "limit+max_step", "hold", "nonfinite")

# per-tick fields returned as (n_ticks, n_joints) float arrays (NaN where a tick has none) ...
TICK_VECTORS = ("state", "target", "sent", "clip")
# ... and as (n_ticks,) arrays
TICK_SCALARS = {
    "episode": np.int64,
    "tick": np.int64,
    "t": np.float64,
    "deadline": np.float64,
    "period_error_ms": np.float64,
    "held": np.bool_,
    "chunk": np.int64,
    "chunk_t": np.float64,
    "action": np.int64,
    "state_age_ms": np.float64,
}


def _rounded(values: Any) -> list[float] | None:
    """A joint vector as a short JSON list (4 decimals: 1e-4 degree is far below servo resolution)."""
    if values is None:
        return None
    return [round(float(v), 4) for v in np.asarray(values, np.float64).ravel()]


def tick_fields(
    *,
    tick: int,
    chunk: int,
    action: int,
    target: np.ndarray | None,
    sent: np.ndarray,
    held: bool,
    gate: Any,
    now: float,
    chunk_t: float | None = None,
) -> dict[str, Any]:
    """The per-tick payload: state, target, sent, the safety rule that changed it and by how much.

    tick: the loop's tick number (deadline index since the episode started: skipped ticks show as gaps).
    chunk: how many chunks this episode used before the current one; chunk_t: the current chunk's
    observation time, which names it uniquely (a chunk record's ``obs_t``).
    gate: the loop's ``ActionGate``; a ``SafetyLayer`` exposes ``last_rule`` (which clamp fired on the
    last send) and ``measured``/``measured_t`` (the last joint state read from the bus and when). Gates
    without them (a dry run) leave those fields null.
    """
    rule = "hold" if held else getattr(gate, "last_rule", None)
    measured = getattr(gate, "measured", None)
    measured_t = getattr(gate, "measured_t", None)
    clip = None
    if target is not None and rule is not None:
        clip = np.asarray(sent, np.float64) - np.asarray(target, np.float64)
    return {
        "tick": tick,
        "chunk": chunk,
        "chunk_t": chunk_t,
        "action": action,
        "state": _rounded(measured),
        "state_age_ms": round((now - measured_t) * 1e3, 3) if measured_t is not None else None,
        "target": _rounded(target),
        "sent": _rounded(sent),
        "rule": rule,
        "clip": _rounded(clip),
    }


@dataclass
class TelemetryLog:
    """A telemetry file as arrays. Times are ``time.monotonic()`` seconds of the machine that ran.

    ticks: field -> (n,) or (n, joints) array (see ``TICK_SCALARS``, ``TICK_VECTORS``; ``rule`` is a
        str array, "" where no rule fired; ``chunk_row`` the row of the tick's chunk in ``chunks``, -1
        when none). chunks: ``index``, ``episode``, ``t``, ``obs_t``,
        ``energy_j`` and the ``DEPTH_INFO`` fields (n_chunks,) arrays, ``timings_ms`` stage -> (n_chunks,)
        and ``actions`` a list of (ah, ad) arrays. swaps: ``episode``, ``tick``, ``chunk``, ``t``,
        ``delay_ms``, ``start_action``. power: ``t``, ``w`` (n_samples,).
    """

    version: int
    start: dict[str, Any]
    joint_names: list[str]
    ticks: dict[str, np.ndarray]
    chunks: dict[str, Any]
    swaps: dict[str, np.ndarray]
    power: dict[str, np.ndarray]
    episodes: list[dict[str, Any]] = field(default_factory=list)
    safety: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def hz(self) -> float | None:
        return self.start.get("control_hz")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a telemetry file; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"telemetry file {path} does not exist (write one with `molmo-edge run ... --telemetry FILE`)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                continue
            raise DatasetError(f"{path}:{number}: not a JSON record ({err})") from err
    if not records or records[0].get("type") != "start":
        raise DatasetError(f"{path}: not a molmo-edge telemetry file (it must open with a 'start' record)")
    return records


def load_telemetry(path: str | Path) -> TelemetryLog:
    """Read a telemetry JSONL into arrays (see ``TelemetryLog``)."""
    records = read_records(path)
    start = records[0]
    version = int(start.get("schema", 1))
    if version > SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: telemetry schema {version} is newer than this molmo-edge reads ({SCHEMA_VERSION}); upgrade"
        )
    by_type: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_type.setdefault(str(record.get("type")), []).append(record)
    names = next((list(r["joint_names"]) for r in by_type.get("episode_start", []) if r.get("joint_names")), [])
    ticks = by_type.get("tick", [])
    if not names and ticks:
        width = max(len(r.get("sent") or []) for r in ticks)
        names = [f"joint{j}" for j in range(width)]
    summaries = by_type.get("summary", [])
    tick_arrays = _tick_arrays(ticks, len(names))
    chunk_arrays = _chunk_arrays(by_type.get("chunk", []))
    # a chunk is named by its observation time: the loop's per-episode count and the telemetry's
    # index differ when a chunk finished but was never used (replaced by a fresher one, or at episode end)
    rows = {t: row for row, t in enumerate(chunk_arrays["obs_t"].tolist())}
    tick_arrays["chunk_row"] = np.array([rows.get(t, -1) for t in tick_arrays["chunk_t"].tolist()], np.int64)
    return TelemetryLog(
        version=version,
        start=start,
        joint_names=names,
        ticks=tick_arrays,
        chunks=chunk_arrays,
        swaps=_columns(by_type.get("swap", []), ("episode", "tick", "chunk", "t", "delay_ms", "start_action")),
        power=_power_arrays(by_type.get("power", [])),
        episodes=by_type.get("episode", []),
        safety=by_type.get("safety", []),
        summary=summaries[-1] if summaries else None,
    )


def _vector(values: Sequence[float] | None, width: int) -> np.ndarray:
    row = np.full(width, np.nan)
    if values is not None:
        row[: len(values)] = values
    return row


def _tick_arrays(ticks: list[dict[str, Any]], width: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in TICK_SCALARS.items():
        fill: Any = np.nan if dtype is np.float64 else (False if dtype is np.bool_ else -1)
        arrays[name] = np.array([fill if r.get(name) is None else r[name] for r in ticks], dtype=dtype)
    for name in TICK_VECTORS:
        arrays[name] = np.array([_vector(r.get(name), width) for r in ticks]).reshape(len(ticks), width)
    arrays["rule"] = np.array([r.get("rule") or "" for r in ticks], dtype=str)
    return arrays


DEPTH_INFO = ("depth_cells_repredicted", "depth_drafts_rejected", "depth_block_calls", "depth_graph_calls")


def _columns(records: list[dict[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {
        name: np.array([np.nan if r.get(name) is None else r[name] for r in records], dtype=np.float64)
        for name in names
    }


def _chunk_arrays(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    arrays: dict[str, Any] = _columns(chunks, ("index", "episode", "t", "obs_t", "energy_j"))
    for key in DEPTH_INFO:  # Think chunks (``runtimes.depth_decode.DepthStats``); NaN elsewhere
        arrays[key] = np.array([c.get("info", {}).get(key, np.nan) for c in chunks], dtype=np.float64)
    stages = sorted({stage for c in chunks for stage in c.get("timings_ms", {})})
    arrays["timings_ms"] = {
        stage: np.array([c["timings_ms"].get(stage, np.nan) for c in chunks], dtype=np.float64) for stage in stages
    }
    arrays["actions"] = [np.asarray(c["actions"], np.float64) if c.get("actions") else None for c in chunks]
    return arrays


def _power_arrays(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    t = [v for r in records for v in r["t"]]
    w = [v for r in records for v in r["w"]]
    return {"t": np.asarray(t, np.float64), "w": np.asarray(w, np.float64)}

