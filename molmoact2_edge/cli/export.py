"""``molmo-edge export`` / ``inspect`` / ``build-engines``: checkpoint -> verified bundle -> device engines.

\b
Examples:
  molmo-edge export checkpoints/so101-touch -o bundles/touch-fp16 --precision fp16
  molmo-edge export CKPT -o bundles/int8 --precision int8 --calib data/so101_demo
  molmo-edge export CKPT -o bundles/int4 --precision int4 --fp32-bundle bundles/small-fp32
  molmo-edge inspect bundles/small-fp16 [--json]
  molmo-edge build-engines bundles/small-fp16          (on the Jetson, with TensorRT)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from molmoact2_edge.contract import JOINT_FRAMES, ROBOT_KINDS

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _split(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle directory to write.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration data: LeRobot dataset dir or observations .npz (needed by int8).")
@click.option("--bucket", type=int, help="Prompt length in tokens (default: from the camera count and the prompt).")
@click.option("--cameras", help="Camera order, comma-separated (default: the norm-stats tag's camera_keys).")
@click.option("--tag", help="norm_stats.json embodiment tag (default: the only one).")
@click.option("--target", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True, help="tensorrt also builds engines (needs TensorRT and a GPU here).")
@click.option("--quantizer", type=click.Choice(["ort", "modelopt"]), default="ort", show_default=True, help="int8/int4 quantizer; modelopt needs the 'quant' extra.")
@click.option("--fp32-bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Reuse this fp32 bundle's graphs (same checkpoint) instead of exporting again.")
@click.option("--allow-parity-failure", is_flag=True, help="Keep a bundle that fails the parity gate (the manifest says so).")
@click.option("--control-hz", type=float, help="Rate the policy's actions were recorded at (only for a checkpoint without robot_contract.json).")
@click.option("--joint-frame", type=click.Choice(JOINT_FRAMES), help="Joint frame of the training data (only without robot_contract.json).")
@click.option("--robot", type=click.Choice(ROBOT_KINDS), help="Robot kind the policy drives (only without robot_contract.json).")
@click.option("--rtc", type=click.Choice(["auto", "inference"]), default="auto", show_default=True, help="Real-time chunking in the flow graph: auto = training-time if the checkpoint was trained for it, else none; inference = guided sampling (one extra expert pass per flow step; docs/rtc.md).")
def export(
    checkpoint: Path,
    out: Path,
    precision: str,
    calib: Path | None,
    bucket: int | None,
    cameras: str | None,
    tag: str | None,
    target: str,
    quantizer: str,
    fp32_bundle: Path | None,
    allow_parity_failure: bool,
    control_hz: float | None,
    joint_frame: str | None,
    robot: str | None,
    rtc: str,
) -> None:
    """Export CHECKPOINT to a fixed-shape, quantized ONNX bundle checked for parity against PyTorch.

    \b
    Examples:
      molmo-edge export checkpoints/so101-touch -o bundles/touch-fp16 --precision fp16
      molmo-edge export checkpoints/so101-touch -o bundles/touch-int4 --precision int4
      molmo-edge export MolmoAct2-SO100_101 -o bundles/so101 --cameras front,wrist --precision int8 --calib my_dataset/

    The robot contract (rate, joint frame, cameras, robot kinds) comes from the checkpoint's
    robot_contract.json (written by `molmo-edge train`); a release without one gets the
    conventions of its known tag (printed as ASSUMED); otherwise pass --control-hz,
    --joint-frame and --robot.
    """
    from molmoact2_edge.contract import ContractFlags
    from molmoact2_edge.errors import ParityError
    from molmoact2_edge.export.pipeline import ExportOptions, export_bundle

    options = ExportOptions(
        precision=precision, calib=calib, bucket=bucket, cameras=_split(cameras), tag=tag, target=target,
        quantizer=quantizer, allow_parity_failure=allow_parity_failure, fp32_bundle=fp32_bundle,
        contract_flags=ContractFlags(control_hz, joint_frame, robot), rtc=rtc,
    )  # fmt: skip
    try:
        manifest = export_bundle(checkpoint, out, options, progress=lambda msg: click.echo(f"  {msg}"))
    except ParityError as err:
        _print_parity(getattr(err, "report", None))
        raise
    _print_parity(manifest["parity"])
    size = sum(int(f["bytes"]) for f in manifest["files"].values())
    click.echo(f"bundle {out}: {len(manifest['artifacts'])} graphs, {size / 1e6:.1f} MB, {precision}")


@click.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip hashing the files (sizes and the file set are still checked).")
def inspect(bundle: Path, as_json: bool, no_verify: bool) -> None:
    """Show a bundle's graphs, shapes, precisions, parity report and engines (verifying its files)."""
    from molmoact2_edge.export.quantize import quantized_weight_fraction
    from molmoact2_edge.runtimes.bundle import Bundle
    from molmoact2_edge.runtimes.session import describe

    opened = Bundle.open(bundle, verify=not no_verify)
    summary = describe(opened)
    for name, art in summary["artifacts"].items():  # measured on the graph file: old bundles get it too
        art["quantized_weight_fraction"] = round(quantized_weight_fraction(opened.graph_path(name)), 4)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = summary["model"]
    console.print(f"[bold]{bundle}[/] schema {summary['schema_version']}, {summary['bytes'] / 1e6:.1f} MB, from {summary['source']['checkpoint']}")
    console.print(
        f"mode {m['mode']}, chunk {m['chunk_length']} x {m['action_dim']}, flow steps {m['flow_steps']}, "
        f"bucket {summary['prompt_bucket']}, cameras {summary['cameras']['order']} at {summary['cameras']['image_size']}"
    )
    table = Table(title="graphs")
    for col in ("graph", "precision", "quantized", "opset", "inputs", "outputs"):
        table.add_column(col)
    for name, art in summary["artifacts"].items():
        quantized = f"{art['quantized_weight_fraction']:.0%}"
        table.add_row(name, art["precision"], quantized, str(art["opset"]), _io(art["inputs"]), _io(art["outputs"]))
    console.print(table)
    _print_contract(summary["robot_contract"], console)
    _print_parity(summary["parity"], console)
    for key, engines in summary["engines"].items():
        console.print(f"engines [bold]{key}[/]: {sorted(engines.get('graphs', {}))}")


@click.command("build-engines")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--graph", "graphs", multiple=True, help="Only these graphs (repeatable; default all).")
@click.option("--workspace-gib", type=float, default=4.0, show_default=True)
def build_engines(bundle: Path, graphs: tuple[str, ...], workspace_gib: float) -> None:
    """Build TensorRT engines for BUNDLE on this device and record them in its manifest."""
    from molmoact2_edge.export.tensorrt_build import build_engines as build

    key = build(bundle, list(graphs) or None, workspace_gib=workspace_gib)
    click.echo(f"engines for {key} written to {bundle}/engines/{key}")


def _print_contract(contract: dict[str, Any], console: Any) -> None:
    """The robot contract: what the policy expects of the robot (and where each assumed value came from)."""
    joints = contract["joints"]
    console.print(
        f"robot contract ({contract['provenance']}): tag {contract['embodiment_tag']}, robots {contract['robot_kinds']}, "
        f"{contract['control_hz']:g} Hz, {contract['executed_steps']} steps executed per chunk, "
        f"joint frame {joints['frame']}"
    )
    console.print(f"  joints: {', '.join(f'{n} [{u}]' for n, u in zip(joints['names'], joints['units'], strict=True))}")
    cams = ", ".join(f"{c['name']} ({c['role']}, {c['image_size']})" for c in contract["cameras"])
    console.print(f"  cameras: {cams}; state {contract['state']!r}, action {contract['action']!r}")
    for name, source in contract.get("assumed", {}).items():
        console.print(f"  [yellow]assumed[/] {name}: {source}")


def _io(specs: list[dict[str, Any]]) -> str:
    return "\n".join(f"{s['name']} {tuple(s['shape'])} {s['dtype']}" for s in specs)


def _print_parity(report: dict[str, Any] | None, console: Any = None) -> None:
    """The parity report as a rich table (export and inspect)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not report:
        console.print("parity: not run")
        return
    table = Table(title=f"parity ({report['backend']}, {report['observations']} obs, seeds {report['seeds']})")
    for col in ("check", "precision", "value", "limit", "result"):
        table.add_column(col)
    for graph, r in report["graphs"].items():
        table.add_row(graph, r["precision"], f"{r['rel_rms']:.3g} rel RMS", f"{r['limit']:.3g}", _verdict(r["passed"]))
    e = report["end_to_end"]
    table.add_row(
        "end to end", "", f"{e['max_diff']:.3g} / spread {e['seed_spread']:.3g} = {e['ratio']:.3g}",
        f"{e['limit']:.3g}", _verdict(e["passed"]),
    )  # fmt: skip
    console.print(table)
    if report.get("allowed_failure"):
        console.print("[yellow]parity FAILED; kept because of --allow-parity-failure[/]")


def _verdict(ok: bool) -> str:
    return "[green]pass[/]" if ok else "[red]FAIL[/]"
