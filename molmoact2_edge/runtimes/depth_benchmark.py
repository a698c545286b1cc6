"""The Think depth stage measured with the cache vs without (``molmo-edge bench``'s top-level ``depth`` object).

Frames: the bench's fixed random observation with a block (a stand-in for the arm) sliding
across the main camera, so a few depth cells change per frame and the rest stay put, as on
a robot. Two sessions on the same backend alternate frame by frame: one with the adaptive
cache (unchanged cells replayed, changed cells verified speculatively against their cached
codes in ``decode_block`` calls, ``depth_decode``) and one with the cache disabled (every
cell predicted, one ``decode_step`` call per token). The first frame of the cached session
has nothing cached and is left out of its averages. ``benchmarks/think_depth.py`` measures
the same on sim episodes and also checks the codes against sequential decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.types import Observation


def moving_frames(base: Observation, camera: str, count: int) -> Iterator[Observation]:
    """``count`` observations: ``base`` with a grey block sliding diagonally over ``camera``'s image."""
    image = base.images[camera]
    h, w = image.shape[:2]
    size = max(4, min(h, w) // 5)
    for i in range(count):
        frame = image.copy()
        y = (i * size // 3) % (h - size)
        x = (i * size // 2) % (w - size)
        frame[y : y + size, x : x + size] = 128
        yield Observation(
            images={**base.images, camera: frame},
            state=base.state,
            task=base.task,
            timestamp=time.monotonic(),
        )


def depth_benchmark(
    cached: PolicySession, uncached: PolicySession, base: Observation, frames: int = 10
) -> dict[str, Any]:
    """The ``depth`` object of ``bench --json`` (two sessions of the same Think bundle and backend)."""
    uncached.depth_cache.enabled = False
    cached.reset()
    uncached.reset()
    rows: dict[str, list[float]] = {
        k: [] for k in ("calls", "blocks", "calls_u", "ms", "ms_u", "cells", "rejected")
    }
    for i, obs in enumerate(moving_frames(base, cached.camera_order[0], frames + 1)):
        a = cached.act(obs, seed=i)
        b = uncached.act(obs, seed=i)
        if i == 0:
            continue  # nothing cached yet
        rows["calls"].append(_count(a.info, "depth_graph_calls"))
        rows["blocks"].append(_count(a.info, "depth_block_calls"))
        rows["calls_u"].append(_count(b.info, "depth_graph_calls"))
        rows["ms"].append(a.timings["depth"] * 1e3)
        rows["ms_u"].append(b.timings["depth"] * 1e3)
        rows["cells"].append(_count(a.info, "depth_cells_repredicted"))
        rows["rejected"].append(_count(a.info, "depth_drafts_rejected"))
    return {
        "frames": frames,
        "cells": cached.depth_cache.num_cells,
        "graph_calls_per_frame": float(np.mean(rows["calls"])),
        "graph_calls_per_frame_uncached": float(np.mean(rows["calls_u"])),
        "block_calls_per_frame": float(np.mean(rows["blocks"])),
        "stage_ms_p50": float(np.median(rows["ms"])),
        "stage_ms_p50_uncached": float(np.median(rows["ms_u"])),
        "cells_repredicted_mean": float(np.mean(rows["cells"])),
        "drafts_rejected_mean": float(np.mean(rows["rejected"])),
    }


def _count(info: Mapping[str, object], key: str) -> float:
    value = info[key]
    assert isinstance(value, int), f"chunk.info[{key!r}] = {value!r}"
    return float(value)
