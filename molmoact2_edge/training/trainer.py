"""The MolmoAct2 two-stage recipe end to end: dataset -> tokenizers -> stage 1 -> stage 2 -> released checkpoint.

    cfg = TrainConfig(preset="small", data="data/touch", out="checkpoints/so101-touch")
    train(cfg)            # or: torchrun --nproc-per-node 2 -m molmoact2_edge.cli.main train ...

Order (reference ``vla-landscape.md`` §1.2, DESIGN §4):
1. read the LeRobot dataset, compute q01/q99 norm stats, cut normalized action chunks;
2. fit the tokenizers: OpenFAST on the chunks, a small text BPE on the prompts, and for
   MolmoAct2-Think the 128-code depth codebook on the dataset's depth maps;
3. stage 1: backbone next-token training on the OpenFAST (+ depth) tokens, expert frozen;
4. stage 2: flow-matching expert on the backbone's per-layer K/V, backbone frozen
   (``finetune_backbone`` loosens it and trains both at one rate);
5. the released layout at OUT: config.json, safetensors, norm_stats.json, tokenizer.json,
   the OpenFAST processor files under ``action_tokenizer/`` and, for Think, the depth codebook.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from molmoact2_edge.errors import TrainingError
from molmoact2_edge.training.distributed import DistInfo, barrier, init_distributed
from molmoact2_edge.training.loop import LoopConfig, Stage, latest_checkpoint, run_stage
from molmoact2_edge.training.state import META_FILE

log = logging.getLogger(__name__)

STAGES = ("1", "2", "both")


@dataclass(frozen=True)
class TrainConfig:
    data: str  # LeRobot v3 dataset directory (molmo-edge sim record writes one)
    out: str  # checkpoint directory (released layout)
    preset: str = "small"
    stage: str = "both"  # "1" next-token, "2" flow expert (needs a stage-1 checkpoint in OUT), "both"
    steps: int = 2000  # optimizer steps of stage 1
    steps_stage2: int | None = None  # of stage 2; None = same as stage 1
    batch_size: int = 16  # global, split over ranks
    lr: float = 3e-4
    warmup: int = 50
    flow_samples: int = 4  # (noise, t) draws per chunk in stage 2
    finetune_backbone: bool = False  # stage 2 also trains the backbone (loosened insulation)
    think: bool = False  # MolmoAct2-Think: depth codebook + depth tokens before the action
    action_horizon: int = 10  # ah: chunk length (steps at the dataset's fps)
    n_action_steps: int | None = None  # steps a policy executes per chunk (norm_stats metadata); None = ah
    cameras: tuple[str, ...] | None = (
        None  # camera names to train on, in prompt order; None = all in the dataset
    )
    # Past an episode's end a chunk repeats the last action; True trains on that tail as "hold still"
    # (right for tasks whose success is a hold, e.g. touch), False masks it out of the loss.
    hold_past_end: bool = False
    tag: str = "so100_so101_molmoact2"  # norm_stats.json tag, also the prompt's setup/control text
    joint_frame: str | None = None  # the dataset's joint frame when meta/info.json does not say (robot contract)
    save_every: int = 200
    save_dtype: str = "float32"  # storage dtype of the final weights: float32, float16 or bfloat16
    log_every: int = 10
    seed: int = 0
    # training-time RTC on stage 2: committed prefixes of 0..rtc_max_delay steps, fed clean at flow
    # time 1 and left out of the loss; recorded in config.json so export and runtime use it (0: off)
    rtc_max_delay: int = 0
    # start from this checkpoint (its config, weights, tokenizers and norm stats) instead of the
    # preset: a stage-2 fine-tune, e.g. adding training-time RTC to a trained policy
    init_from: str | None = None
    resume: bool = False
    device: str | None = None  # None: cuda:LOCAL_RANK if available, else cpu
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainingError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise TrainingError(f"--save-dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}")
        if self.flow_samples < 1 or self.action_horizon < 1:
            raise TrainingError(f"--flow-samples ({self.flow_samples}) and --action-horizon must be >= 1")
        if not 0 <= self.rtc_max_delay < self.action_horizon:
            raise TrainingError(f"--rtc-max-delay must be in 0..{self.action_horizon - 1}, got {self.rtc_max_delay}")
        if self.init_from is not None and self.stage != "2":
            raise TrainingError("--init-from fine-tunes a trained checkpoint: use it with --stage 2")

    def loop(self, stage: int) -> LoopConfig:
        steps = self.steps if stage == 1 or self.steps_stage2 is None else self.steps_stage2
        return LoopConfig(
            steps=steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=min(self.warmup, max(1, steps // 10)),
            save_every=self.save_every,
            log_every=self.log_every,
            progress=self.progress,
        )


def _set_trainable(model: torch.nn.Module, stage: int, finetune_backbone: bool) -> None:
    """Stage 1 trains the backbone only; stage 2 the expert (and the backbone if loosened)."""
    for name, param in model.named_parameters():
        in_expert = name.startswith("model.action_expert")
        param.requires_grad_(
            in_expert if stage == 2 and not finetune_backbone else (stage == 2 or not in_expert)
        )


def _saved_progress(out: Path) -> tuple[int, int] | None:
    """(stage, step) of the run's latest checkpoint, None without one."""
    import json

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    meta: dict[str, Any] = json.loads((ckpt / META_FILE).read_text())
    return int(meta["stage"]), int(meta["step"])


def train(cfg: TrainConfig) -> Path:
    """Run the recipe; returns OUT. Resumes from OUT/checkpoint with ``cfg.resume``."""
    from molmoact2_edge.training.setup import build_run

    info: DistInfo = init_distributed(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not cfg.resume and cfg.stage != "2" and latest_checkpoint(out) is not None:
        raise TrainingError(
            f"{out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    torch.manual_seed(cfg.seed)
    run = build_run(cfg, info)
    stages = [1, 2] if cfg.stage == "both" else [int(cfg.stage)]
    progress = _saved_progress(out) if (cfg.resume or cfg.stage == "2") else None
    for index in stages:
        resume_here = False
        if progress is not None:
            saved, step = progress
            # "Done" against this invocation's step count, so --resume with more steps extends a stage.
            done = step >= cfg.loop(saved).steps
            if saved > index or (saved == index and done):
                if info.is_main:
                    log.info("stage %d already complete in %s", index, out)
                if index == stages[-1]:
                    run.load_model(latest_checkpoint(out))  # type: ignore[arg-type]
                continue
            if saved == index:
                resume_here = True
            elif saved == index - 1:  # start stage 2 from the finished stage 1 weights
                run.load_model(latest_checkpoint(out))  # type: ignore[arg-type]
        elif index == 2 and cfg.stage == "2" and cfg.init_from is None:
            raise TrainingError(f"--stage 2 needs a finished stage-1 run in {out} (train --stage 1 first)")
        _set_trainable(run.model, index, cfg.finetune_backbone)
        stage = Stage(
            index=index,
            objective=run.objective(index),
            make_batch=run.batches,
            save_model=run.save,
            load_model=run.load_model,
            meta={"train_config": asdict(cfg)},
            find_unused_parameters=index == 2 and cfg.finetune_backbone,
        )
        metrics = run_stage(stage, cfg.loop(index), info, out, resume_here)
        if info.is_main:
            log.info("stage %d finished: %s", index, metrics)
    if info.is_main:
        run.save(out, dtype=getattr(torch, cfg.save_dtype))  # periodic checkpoints stay float32 for resuming
        _copy_training_state(out)
    barrier()
    return out


def _copy_training_state(out: Path) -> None:
    """Keep the final training_state next to the released files (what a resumed fine-tune starts from)."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        for item in ckpt.iterdir():
            if item.name.startswith("training_state"):
                shutil.copy2(item, out / item.name)
