"""``molmo-edge plan CKPT|BUNDLE|PRESET --device NAME --precision P``: a roofline lower bound per stage, memory and fit.

\b
Examples:
  molmo-edge plan molmoact2-4b --device agx-orin-64gb --precision int8
  molmo-edge plan checkpoints/so101-touch --device orin-nano-8gb --precision int4 --json
  molmo-edge plan bundle/ --device thor --precision fp8
"""

from __future__ import annotations

import json

import click

from molmoact2_edge.export.plan import (
    DEPTH_REJECTIONS,
    DEVICES,
    PRECISIONS,
    Workload,
    load_target,
    plan,
    render,
)


@click.command("plan")
@click.argument("target")
@click.option("--device", "device_name", type=click.Choice(sorted(DEVICES)), required=True, help="Device from the plan table.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True)
@click.option("--cameras", type=int, help="Cameras (checkpoint/preset only; a bundle has its own). Default 2.")
@click.option("--prompt-tokens", type=int, help="Prompt length (default: a bundle's bucket, else image tokens + 84).")
@click.option(
    "--depth-rejections", type=float, default=DEPTH_REJECTIONS, show_default=True,
    help="Think: drafts rejected per frame (each costs one more decode_block call); measure with bench.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(
    target: str,
    device_name: str,
    precision: str,
    cameras: int | None,
    prompt_tokens: int | None,
    depth_rejections: float,
    as_json: bool,
) -> None:
    """Lower-bound latency per stage (compute- or memory-bound) and memory for TARGET on a device.

    TARGET is a checkpoint directory, a bundle directory or a preset name (e.g. molmoact2-4b).
    The figures are a roofline bound from public peak numbers, not a measurement.
    """
    config, work = load_target(target)
    changes = {
        "cameras": cameras if cameras is not None else work.cameras,
        "prompt_tokens": prompt_tokens if prompt_tokens is not None else work.prompt_tokens,
    }
    work = Workload(**{**work.__dict__, **changes, "depth_rejections": depth_rejections})
    report = plan(config, DEVICES[device_name], precision, work)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
