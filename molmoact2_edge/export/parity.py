"""The parity gate: the finished bundle, run through the device's ``PolicySession``, against the PyTorch reference.

Two checks, as vla-edge's gates (``reference/molmoact2-checkpoint.md`` §8.4):

- **per graph**: every graph call the session makes on the parity observations is
  replayed through the PyTorch wrapper of that graph (``graphs.py``) on the SAME
  inputs; relative RMS = ||candidate - reference|| / ||reference||, worst output,
  worst call. Thresholds depend on the precision the graph was stored in.
- **end to end** (flow bundles): with seeds A and B,
  max|candidate(A) - reference(A)| <= 0.5 * max|reference(A) - reference(B)|, per
  observation: the bundle must be closer to the reference than the reference is to
  itself under another noise draw. A zero seed spread (the policy ignores its noise)
  fails: the gate could not tell anything apart. Discrete bundles have no noise; their
  chunks must match the reference to ``DISCRETE_ATOL`` of the action range. Flow graphs
  that take a committed prefix (real-time chunking) are checked the same way once more
  with reference(B) as the prefix (delay ``RTC_PARITY_DELAY``): guided or conditioned.
- **depth codes** (Think bundles): the session's codes must EQUAL the reference's on every
  parity observation, decoded sequentially (the first frame) and again speculatively
  (``runtimes.depth_decode``) from adversarial drafts; the chunk after them passes the
  end-to-end check too.

The report goes into the manifest; a failure raises ``ParityError`` unless the
caller allows it (the manifest then records ``allowed_failure``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from molmoact2_edge.errors import ParityError
from molmoact2_edge.rtc import CommittedPrefix
from molmoact2_edge.runtimes import bundle as B
from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)

# Per-graph relative RMS allowed, by the precision the graph is stored in. fp32 is exporter/runtime
# noise; fp16 the half-precision floor vla-edge gates bf16 stages at (0.04-0.06); the quantized ones are loose: the
# end-to-end seed gate is what decides whether the policy still behaves.
GRAPH_RMS_LIMITS = {"fp32": 1e-4, "fp16": 5e-2, "int8": 0.25, "int4": 0.4}
SEED_SPREAD_FRACTION = 0.5
DISCRETE_ATOL = 1e-3
DEFAULT_SEEDS = (1234, 4321)
DRAFT_STRIDE = 10  # Think: every 10th draft is made wrong in the speculative check (11 rejections per 100 cells)
RTC_PARITY_DELAY = 2


def relative_rms(candidate: np.ndarray, reference: np.ndarray) -> float:
    """||c - r|| / ||r|| (shapes must match; an all-zero reference compares absolute RMS)."""
    c, r = np.asarray(candidate, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if c.shape != r.shape:
        raise ParityError(f"shape mismatch: candidate {c.shape} vs reference {r.shape}")
    if not np.all(np.isfinite(c)):
        return float("inf")
    num, den = np.linalg.norm(c - r), np.linalg.norm(r)
    return float(num / den) if den > 0 else float(num / np.sqrt(max(r.size, 1)))


@dataclass
class FirstCalls:
    """A ``record_feeds`` hook keeping a copy of the first ``per_graph`` calls of each graph."""

    per_graph: int = 1
    calls: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def __call__(self, graph: str, feeds: Mapping[str, np.ndarray]) -> None:
        kept = self.calls.setdefault(graph, [])
        if len(kept) < self.per_graph:
            kept.append({k: np.array(v, copy=True) for k, v in feeds.items()})


def graph_parity(
    session: PolicySession, reference_graphs: Mapping[str, nn.Module], calls: Mapping[str, list[dict[str, np.ndarray]]]
) -> dict[str, float]:
    """graph -> worst relative RMS of its outputs over the recorded calls."""
    worst: dict[str, float] = {}
    for graph, feeds_list in calls.items():
        spec = B.GRAPHS[graph]
        for feeds in feeds_list:
            candidate = session.backend.run(graph, feeds)
            with torch.no_grad():
                ref = reference_graphs[graph](*(torch.from_numpy(np.asarray(feeds[n])) for n in spec.inputs))
            ref = ref if isinstance(ref, tuple) else (ref,)
            names = [o["name"] for o in session.bundle.output_specs(graph)]
            for name, r in zip(names, ref, strict=True):
                err = relative_rms(candidate[name], r.float().numpy())
                worst[graph] = max(worst.get(graph, 0.0), err)
    return worst


def run_parity(
    reference: Any,
    session: PolicySession,
    reference_graphs: Mapping[str, nn.Module],
    observations: Sequence[Observation],
    graph_precisions: Mapping[str, str],
    seeds: tuple[int, int] = DEFAULT_SEEDS,
) -> dict[str, Any]:
    """Run the gate; returns the report (``passed`` says whether it holds). Nothing is raised here.

    reference: the PyTorch ``model.policy.Policy`` (same camera order, bucket and tag as the bundle).
    """
    seed_a, seed_b = seeds
    e2e: list[dict[str, float]] = []
    depth: list[dict[str, Any]] = []
    worst: dict[str, float] = {}
    for obs in observations:
        reference.reset()
        session.reset()
        ref_a = reference.act(obs, seed=seed_a).actions
        reference.reset()
        ref_b = reference.act(obs, seed=seed_b).actions
        recorder = FirstCalls()
        session.record_feeds = recorder  # the session's own feeds: what the device would run
        try:
            chunk = session.act(obs, seed=seed_a)
        finally:
            session.record_feeds = None
        e2e.append(_end_to_end(chunk.actions, ref_a, ref_b, session.discrete))
        if session.depth:
            codes = reference.depth_cache.codes(session.camera_order[0])
            depth.append(_depth_codes(session, codes, chunk.info))
            session.record_feeds = recorder  # now the speculative path's decode_block call too
            try:
                chunk = _speculative_act(session, obs, codes, seed_a)
            finally:
                session.record_feeds = None
            depth.append(_depth_codes(session, codes, chunk.info))
            e2e.append(_end_to_end(chunk.actions, ref_a, ref_b, session.discrete))
        for graph, err in graph_parity(session, reference_graphs, recorder.calls).items():
            worst[graph] = max(worst.get(graph, 0.0), err)
        if session.rtc not in (None, "off") and not session.discrete:
            prefix = CommittedPrefix(ref_b, min(RTC_PARITY_DELAY, len(ref_b)))
            reference.reset()
            session.reset()
            ref_rtc = reference.act(obs, seed=seed_a, prefix=prefix).actions
            e2e.append(_end_to_end(session.act(obs, seed=seed_a, prefix=prefix).actions, ref_rtc, ref_b, False))
    graphs = {}
    for graph, err in worst.items():
        limit = GRAPH_RMS_LIMITS[graph_precisions[graph]]
        graphs[graph] = {"precision": graph_precisions[graph], "rel_rms": err, "limit": limit, "passed": err <= limit}
    worst_e2e = max(e2e, key=lambda r: r["ratio"])
    end_to_end = {**worst_e2e, "limit": SEED_SPREAD_FRACTION if not session.discrete else DISCRETE_ATOL}
    end_to_end["passed"] = all(r["passed"] for r in e2e)
    passed = end_to_end["passed"] and all(g["passed"] for g in graphs.values()) and all(d["passed"] for d in depth)
    report = {
        "passed": bool(passed),
        "backend": session.backend.name,
        "observations": len(observations),
        "seeds": list(seeds),
        "graphs": graphs,
        "end_to_end": end_to_end,
    }
    if depth:
        report["depth_codes"] = {
            "frames": len(depth),
            "mismatched_cells": max(d["mismatched_cells"] for d in depth),
            "graph_calls": [d["graph_calls"] for d in depth],
            "passed": all(d["passed"] for d in depth),
        }
    return report


def _speculative_act(session: PolicySession, obs: Observation, codes: np.ndarray, seed: int) -> ActionChunk:
    """Act again on ``obs`` with every cell treated as changed and adversarial drafts: the reference codes with
    every ``DRAFT_STRIDE``-th one wrong, so the speculative path must reject and recover (and must still
    give the reference codes)."""
    camera, cache = session.camera_order[0], session.depth_cache
    drafts = codes.copy()
    drafts[::DRAFT_STRIDE] = (drafts[::DRAFT_STRIDE] + 1) % int(session.token_ids["num_depth_tokens"])
    cache.set_codes(camera, drafts)
    saved, cache.threshold = cache.threshold, 2.0  # cosine similarity never reaches 2: every cell is checked
    try:
        return session.act(obs, seed=seed)
    finally:
        cache.threshold = saved


def _depth_codes(session: PolicySession, reference_codes: np.ndarray, info: Mapping[str, Any]) -> dict[str, Any]:
    """Exact equality of the session's last depth codes with the reference's (argmax: no tolerance)."""
    codes = session.depth_cache.codes(session.camera_order[0])
    assert codes is not None
    mismatched = int(np.sum(codes != reference_codes))
    return {"mismatched_cells": mismatched, "graph_calls": info["depth_graph_calls"], "passed": mismatched == 0}


def _end_to_end(cand: np.ndarray, ref_a: np.ndarray, ref_b: np.ndarray, discrete: bool) -> dict[str, float]:
    diff = float(np.max(np.abs(cand.astype(np.float64) - ref_a)))
    spread = float(np.max(np.abs(ref_a.astype(np.float64) - ref_b)))
    if discrete:
        scale = max(float(np.max(np.abs(ref_a))), 1.0)
        return {"max_diff": diff, "seed_spread": spread, "ratio": diff / scale, "passed": diff <= DISCRETE_ATOL * scale}
    ratio = diff / spread if spread > 0 else float("inf")
    return {"max_diff": diff, "seed_spread": spread, "ratio": ratio, "passed": spread > 0 and ratio <= SEED_SPREAD_FRACTION}


def enforce(report: Mapping[str, Any], allow_failure: bool, where: str) -> None:
    """Raise ParityError describing what failed, unless failures are allowed (then log it)."""
    if report["passed"]:
        return
    bad = [f"{g} rel RMS {r['rel_rms']:.3g} > {r['limit']:.3g}" for g, r in report["graphs"].items() if not r["passed"]]
    depth = report.get("depth_codes")
    if depth and not depth["passed"]:
        bad.append(f"depth codes differ from the reference in {depth['mismatched_cells']} cell(s)")
    e = report["end_to_end"]
    if not e["passed"]:
        bad.append(f"end to end max|cand-ref| {e['max_diff']:.3g} vs seed spread {e['seed_spread']:.3g} (ratio {e['ratio']:.3g})")
    message = f"{where}: parity gate failed: " + "; ".join(bad)
    if allow_failure:
        log.warning("%s (allowed by --allow-parity-failure; the manifest records it)", message)
        return
    error = ParityError(message + ". Use a higher precision, or --allow-parity-failure to keep the bundle anyway")
    error.report = dict(report)  # type: ignore[attr-defined]
    raise error
