"""``molmo-edge train``: the two-stage MolmoAct2 recipe on a LeRobot dataset, writing the released layout."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="train")
@click.option(
    "--preset",
    default="small",
    show_default=True,
    help="Model preset: tiny, small (molmoact2-4b needs GPUs).",
)
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="LeRobot v3.0/v2.1 dataset directory (e.g. from `molmo-edge sim record`).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint directory to write.")
@click.option("--stage", type=click.Choice(["1", "2", "both"]), default="both", show_default=True,
              help="1: next-token (OpenFAST/depth tokens), 2: flow expert on a finished stage 1, both: 1 then 2.")  # fmt: skip
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps of stage 1.")
@click.option("--steps-stage2", type=int, default=None, help="Optimizer steps of stage 2 [default: --steps].")
@click.option(
    "--batch-size", type=int, default=16, show_default=True, help="Global batch (split over torchrun ranks)."
)
@click.option(
    "--lr", type=float, default=3e-4, show_default=True, help="Peak learning rate (warmup + cosine)."
)
@click.option(
    "--flow-samples", type=int, default=4, show_default=True, help="(noise, t) draws per chunk in stage 2."
)
@click.option(
    "--action-horizon", type=int, default=10, show_default=True, help="Chunk length ah in dataset steps."
)
@click.option(
    "--n-action-steps", type=int, default=None, help="Steps a policy executes per chunk [default: ah]."
)
@click.option(
    "--camera",
    "cameras",
    multiple=True,
    help="Train on these cameras only, in this order (repeat) [default: all].",
)
@click.option(
    "--think", is_flag=True, help="MolmoAct2-Think: depth codebook + depth tokens (dataset needs depth)."
)
@click.option(
    "--finetune-backbone", is_flag=True, help="Stage 2 also trains the backbone (no stop-gradient)."
)
@click.option(
    "--hold-past-end",
    is_flag=True,
    help="Train the chunk tail past an episode's end (the last action repeated) instead of masking it: "
    "the policy learns to hold still once done (tasks whose success is a hold, e.g. touch).",
)
@click.option(
    "--joint-frame",
    type=click.Choice(["lerobot", "so100_101_legacy", "native"]),
    default=None,
    help="Joint frame of the dataset, recorded in the checkpoint's robot contract "
    "[default: meta/info.json joint_frame; SO-100/101 data without it must say].",
)
@click.option("--save-every", type=int, default=200, show_default=True, help="Checkpoint interval in steps.")
@click.option(
    "--save-dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the final weights (checkpoints for --resume stay float32).",
)
@click.option("--rtc-max-delay", type=int, default=0, show_default=True,
              help="Training-time RTC on stage 2: committed prefixes of 0..N steps, fed clean (0: off).")  # fmt: skip
@click.option("--init-from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Fine-tune this trained checkpoint (stage 2) instead of starting from the preset.")  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda [default: cuda:LOCAL_RANK if available].")
@click.option(
    "--threads", type=int, default=None, help="torch CPU threads per rank (1 is fastest on a busy CPU)."
)
def train(
    preset: str,
    data: Path,
    out: Path,
    stage: str,
    steps: int,
    steps_stage2: int | None,
    batch_size: int,
    lr: float,
    flow_samples: int,
    action_horizon: int,
    n_action_steps: int | None,
    cameras: tuple[str, ...],
    think: bool,
    finetune_backbone: bool,
    hold_past_end: bool,
    joint_frame: str | None,
    save_every: int,
    save_dtype: str,
    rtc_max_delay: int,
    init_from: Path | None,
    resume: bool,
    seed: int,
    device: str | None,
    threads: int | None,
) -> None:
    """Train a MolmoAct2-style policy: OpenFAST next-token stage, then the flow-matching expert.

    \b
    Examples:
      molmo-edge sim record --task touch --episodes 300 --noise 2 --size 112 --out data/touch
      molmo-edge train --preset small --data data/touch --out ckpt/touch --steps 1500
      molmo-edge train --preset small --data data/touch --out ckpt/touch --resume      # after a kill
      molmo-edge train --init-from ckpt/touch --stage 2 --rtc-max-delay 4 --data data/touch --out ckpt/touch-rtc
      torchrun --nproc-per-node 8 -m molmoact2_edge.cli.main train --preset small --data ... --out ...
    """
    import os

    import torch

    from molmoact2_edge.training.trainer import TrainConfig
    from molmoact2_edge.training.trainer import train as run_training

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        preset=preset,
        stage=stage,
        steps=steps,
        steps_stage2=steps_stage2,
        batch_size=batch_size,
        lr=lr,
        flow_samples=flow_samples,
        action_horizon=action_horizon,
        n_action_steps=n_action_steps,
        cameras=cameras or None,
        think=think,
        finetune_backbone=finetune_backbone,
        hold_past_end=hold_past_end,
        joint_frame=joint_frame,
        save_every=save_every,
        save_dtype=save_dtype,
        rtc_max_delay=rtc_max_delay,
        init_from=str(init_from) if init_from is not None else None,
        resume=resume,
        seed=seed,
        device=device,
    )
    path = run_training(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line per run under torchrun
        click.echo(f"wrote {path}")
