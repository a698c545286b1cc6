"""Real-time chunking (RTC): what the control loop hands a policy so the next chunk continues the current one.

Torch-free (the device imports it). The pieces, in the order a swap uses them:

- ``CommittedPrefix``: the current chunk's actions from the moment the new observation was
  taken (robot units), and the delay in ticks, both from what the control loop actually sent
  (``runtimes/rtc.py`` measures them). The first ``delay`` of them execute while inference runs.
- ``guidance_weights``: the soft mask over the new chunk's horizon (Black et al. 2025, eq. 5):
  1 on the first ``delay`` steps (frozen), decaying exponentially across the rest of the overlap
  with the previous chunk, 0 after it. ``conditioning_weights``: the hard 0/1 mask a model
  trained with training-time RTC takes instead (arXiv 2512.05964).
- ``prefix_inputs``: the flow graph's two extra inputs, ``rtc_prefix`` (ah, ad) normalized and
  zero-padded, and ``rtc_weights`` (ah,). A zero weight vector means "no RTC" (first chunk, a
  stale previous chunk, ``--rtc off``); the graph then returns exactly the plain flow's chunk.

Modes: ``off`` (naive swap), ``inference`` (guided sampling, any flow checkpoint), ``training``
(prefix conditioning; only checkpoints trained with ``rtc_max_delay > 0``), ``auto`` (training
when the checkpoint has it, else off: inference-time guidance measured worse task success than the
naive swap on the bundled checkpoint, so it is opt-in; ``docs/design.md``). A bundle runs what its
flow graph was exported for (``export --rtc inference`` opts in); ``auto`` follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from molmoact2_edge.errors import ConfigError
from molmoact2_edge.normalization import NormStats

MODES = ("off", "inference", "training", "auto")
GUIDANCE_CLIP = 5.0  # beta of Black et al.: the largest guidance weight at any flow step (their default)


@dataclass(frozen=True)
class CommittedPrefix:
    """actions (p, s) robot units: the current chunk from the observation's tick on; delay: ticks of them
    that execute before the new chunk takes over (measured on the previous swap, 0 <= delay <= p)."""

    actions: np.ndarray
    delay: int

    def __post_init__(self) -> None:
        if self.actions.ndim != 2 or not 0 <= self.delay <= len(self.actions):
            raise ConfigError(
                f"committed prefix: expected (p, s) actions and 0 <= delay <= p, got {self.actions.shape}, {self.delay}"
            )


def resolve_mode(requested: str, trained_max_delay: int) -> str:
    """``off`` | ``inference`` | ``training`` for a checkpoint trained with ``trained_max_delay`` (0: without RTC)."""
    if requested not in MODES:
        raise ConfigError(f"--rtc must be one of {MODES}, got {requested!r}")
    if requested == "auto":
        return "training" if trained_max_delay > 0 else "off"
    if requested == "training" and trained_max_delay <= 0:
        raise ConfigError(
            "--rtc training needs a checkpoint trained with training-time RTC (train --rtc-max-delay N); "
            "this one was not: use --rtc inference or auto"
        )
    return requested


def session_mode(requested: str, exported: str | None) -> str | None:
    """The mode a bundle runs: ``exported`` is its flow graph's (``inference``/``training``), None for a bundle
    exported before RTC. Returns None when the graph takes no prefix at all, else ``off`` or the exported mode."""
    if requested not in MODES:
        raise ConfigError(f"--rtc must be one of {MODES}, got {requested!r}")
    if exported in (None, "off"):
        if requested in ("inference", "training"):
            raise ConfigError(
                f"--rtc {requested}: this bundle's flow graph takes no committed prefix; re-export it "
                "(`molmo-edge export --rtc inference`, or a checkpoint trained with `train --rtc-max-delay`)"
            )
        return exported
    if requested in ("inference", "training") and requested != exported:
        raise ConfigError(
            f"--rtc {requested}: this bundle's flow graph was exported for {exported}-time RTC "
            f"(a checkpoint {'with' if exported == 'training' else 'without'} rtc_max_delay); use --rtc auto or off"
        )
    return "off" if requested == "off" else exported


def guidance_weights(horizon: int, delay: int, overlap: int) -> np.ndarray:
    """(horizon,) float32 soft mask: 1 for i < delay, c_i (e^c_i - 1)/(e - 1) with
    c_i = (overlap - i)/(overlap - delay + 1) for delay <= i < overlap, 0 from ``overlap`` on."""
    overlap = min(max(overlap, 0), horizon)
    delay = min(max(delay, 0), overlap)
    w = np.zeros(horizon, np.float32)
    w[:delay] = 1.0
    i = np.arange(delay, overlap, dtype=np.float64)
    c = (overlap - i) / (overlap - delay + 1)
    w[delay:overlap] = c * np.expm1(c) / (math.e - 1)
    return w


def conditioning_weights(horizon: int, delay: int, overlap: int) -> np.ndarray:
    """(horizon,) float32 hard mask: 1 on the committed steps (i < min(delay, overlap)), 0 elsewhere."""
    w = np.zeros(horizon, np.float32)
    w[: min(max(delay, 0), overlap, horizon)] = 1.0
    return w


def prefix_inputs(
    prefix: CommittedPrefix | None,
    mode: str,
    norm: NormStats,
    tag: str | None,
    horizon: int,
    max_action_dim: int,
    first: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The flow graph's ``rtc_prefix`` (horizon, max_action_dim) and ``rtc_weights`` (horizon,), float32.

    first: the chunk row where executed actions start (``n_obs_steps - 1``); rows before it get weight 0.
    No prefix or mode ``off``: zeros (the plain flow).
    """
    values = np.zeros((horizon, max_action_dim), np.float32)
    weights = np.zeros(horizon, np.float32)
    if prefix is None or mode == "off" or len(prefix.actions) == 0:
        return values, weights
    p = min(len(prefix.actions), horizon - first)
    normalized = norm.normalize_action(np.asarray(prefix.actions[:p], np.float32), tag)
    values[first : first + p, : normalized.shape[1]] = normalized
    make = conditioning_weights if mode == "training" else guidance_weights
    weights[first:] = make(horizon - first, prefix.delay, p)
    return values, weights
