"""The training loop (nanoGPT style): one function, one screen, for either stage.

A stage is an ``Objective`` (a module whose forward returns the loss of a batch), a
``make_batch(step, shard)`` that draws the global batch of a step from (seed, step)
and returns this rank's slice, and a ``save_model(dir)`` / ``load_model(dir)`` pair
that writes and reads the released checkpoint layout.

Checkpoints: every ``save_every`` steps the run writes ``OUT/checkpoint/`` (released
layout + ``training_state.*``) through a staging directory and a rename, so a run killed
at any moment resumes from its last complete checkpoint and loses at most one interval.
Only rank 0 writes; every rank reads on resume.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from molmoact2_edge.errors import TrainingError
from molmoact2_edge.training.distributed import DistInfo, barrier
from molmoact2_edge.training.state import META_FILE, load_training_state, save_training_state

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 16  # global batch, split evenly across ranks
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_every: int = 200  # steps between checkpoints; a killed run loses at most this many
    log_every: int = 10
    progress: bool = True  # live step progress on rank 0 (viz.progress.StepProgress)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.save_every < 1:
            raise TrainingError(
                f"steps ({self.steps}) must be >= 0, batch size ({self.batch_size}) and save interval "
                f"({self.save_every}) >= 1"
            )


@dataclass
class Stage:
    """One training stage as the loop sees it."""

    index: int  # 1 = next-token (backbone), 2 = flow matching (expert)
    objective: nn.Module  # forward(batch) -> (loss, {metric: float})
    make_batch: Callable[[int, slice], Any]  # (step, this rank's slice of the global batch) -> batch
    save_model: Callable[[Path], None]  # writes the released layout into a directory
    load_model: Callable[[Path], None]  # loads weights saved by save_model, in place
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in training_state.json
    # DDP must be told when some trainable parameters get no gradient (stage 2 with the backbone
    # loosened: lm_head, ln_f and the last block's output path do not reach the K/V the expert reads).
    find_unused_parameters: bool = False


def learning_rate(step: int, cfg: LoopConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    )


def latest_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint of a run (``checkpoint/``, or ``checkpoint.old`` if a swap was cut short)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (out / name / META_FILE).is_file():
            return out / name
    return None


def run_stage(stage: Stage, cfg: LoopConfig, info: DistInfo, out: Path, resume: bool) -> dict[str, float]:
    """Train one stage to ``cfg.steps``, checkpointing and resuming; returns the last logged metrics."""
    params = [p for p in stage.objective.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"stage {stage.index} has no trainable parameters")
    # Weight decay only on matrices (not norms, biases, embeddings' scalars), as in nanoGPT.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    step = _resume(stage, optimizer, out, info) if resume else 0
    model: nn.Module = stage.objective
    if info.world_size > 1:  # gradients are averaged across ranks during backward
        model = DistributedDataParallel(
            stage.objective,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=stage.find_unused_parameters,
        )
    shard = info.shard(cfg.batch_size)
    bar = _progress(cfg, info, step, stage.index)
    metrics: dict[str, float] = {}
    t0, samples = time.perf_counter(), 0
    model.train()
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss, step_metrics = model(stage.make_batch(step, shard))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        samples += cfg.batch_size
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = {
                "loss": loss.item(),
                **step_metrics,
                "grad_norm": float(grad_norm),
                "lr": optimizer.param_groups[0]["lr"],
            }
            metrics["samples_per_s"] = samples / (time.perf_counter() - t0)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            if info.is_main:
                log.info("stage %d step %d: %s", stage.index, step, metrics)
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(stage, optimizer, cfg, info, out, step)
    if bar is not None:
        bar.close()
    return metrics


def save_checkpoint(
    stage: Stage, optimizer: torch.optim.Optimizer, cfg: LoopConfig, info: DistInfo, out: Path, step: int
) -> None:
    """Rank 0 writes ``OUT/checkpoint`` via a staging dir; a crash at any point leaves one complete copy."""
    if info.is_main:
        staging, current, old = (
            out / (CHECKPOINT_DIR + ".tmp"),
            out / CHECKPOINT_DIR,
            out / (CHECKPOINT_DIR + ".old"),
        )
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        stage.save_model(staging)
        meta = {
            "stage": stage.index,
            "step": step,
            "done": step >= cfg.steps,
            "loop": asdict(cfg),
            **stage.meta,
        }
        save_training_state(staging, optimizer, meta)
        if current.exists():
            shutil.rmtree(old, ignore_errors=True)
            current.rename(old)
        staging.rename(current)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def _resume(stage: Stage, optimizer: torch.optim.Optimizer, out: Path, info: DistInfo) -> int:
    """Load the latest checkpoint of this stage; 0 if the run has none yet."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        if info.is_main:
            log.info("no checkpoint under %s: starting stage %d from scratch", out, stage.index)
        return 0
    stage.load_model(ckpt)
    meta = load_training_state(ckpt, optimizer)
    if meta["stage"] != stage.index:
        raise TrainingError(
            f"{ckpt} holds stage {meta['stage']} state, cannot resume stage {stage.index} from it"
        )
    if info.is_main:
        log.info("resumed stage %d at step %d from %s", stage.index, meta["step"], ckpt)
    return int(meta["step"])


def _progress(cfg: LoopConfig, info: DistInfo, start: int, index: int) -> Any:
    if not (cfg.progress and info.is_main):
        return None
    from molmoact2_edge.viz.progress import StepProgress  # rich on a terminal, plain lines in logs

    return StepProgress(f"train stage {index}: step", cfg.steps, start=start)
