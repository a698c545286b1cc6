"""RAM, disk and time to export the 4B model, measured on the 4B preset's widths with few layers and
extrapolated per layer (an EXTRAPOLATION, not a measurement of the 4B export).

\b
  nice -n 5 python benchmarks/export_4b.py                   # 1 and 2 layers (ViT, LLM, expert alike)
  nice -n 5 python benchmarks/export_4b.py --layers 2        # one point: the per-layer split comes from parameter bytes

Each export runs in its own process (fp32, the default export options, the real pipeline: torch.onnx
export of every graph, side files, the parity gate), so its peak resident memory is that process's
``ru_maxrss``. Disk is the checkpoint, the bundle and the peak of both plus the export's staging
folder. Two points give a straight line per layer; the 4B release has 27 ViT layers and 36 LLM
(and expert) layers, so the line is split between the ViT and the LLM+expert by their parameter
bytes and extended to those counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402

VIT_LAYERS, LLM_LAYERS = 27, 36  # the release (reference §2)


def release_width_checkpoint(layers: int, ckpt: Path) -> dict[str, int]:
    """Write a checkpoint of the 4B preset's widths with ``layers`` ViT, LLM and expert layers (random weights,
    a stand-in tokenizer padded to Qwen3's ids) to ``ckpt``; its parameter counts (``vit``, ``total``)."""
    import dataclasses

    import numpy as np
    import torch

    from molmoact2_edge.checkpoint import save_checkpoint
    from molmoact2_edge.config import QWEN3_BASE_VOCAB, get_preset
    from molmoact2_edge.model.molmoact2 import MolmoAct2
    from molmoact2_edge.normalization import NormStats
    from molmoact2_edge.tokenizers.text import train_small_tokenizer

    torch.set_num_threads(1)
    base = get_preset("molmoact2-4b")
    assert base.action_expert_config is not None
    config = base.with_changes(
        vit_config=dataclasses.replace(base.vit_config, num_hidden_layers=layers),
        adapter_config=dataclasses.replace(base.adapter_config, vit_layers=(-1,) if layers == 1 else (-1, -2)),
        text_config=dataclasses.replace(base.text_config, num_hidden_layers=layers),
        action_expert_config=dataclasses.replace(base.action_expert_config, num_layers=layers),
        # the stand-in tokenizer (a small BPE padded to Qwen3's 151,669 ids) puts its chat markers last
        pad_token_id=QWEN3_BASE_VOCAB - 3,
        bos_token_id=QWEN3_BASE_VOCAB - 1,
        eos_token_id=QWEN3_BASE_VOCAB - 1,
    )
    model = MolmoAct2.from_config(config, seed=0)
    params = {
        "vit": sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "vit" in n),
        "total": sum(p.numel() for p in model.parameters()),
    }
    rng = np.random.default_rng(0)
    norm = NormStats.compute(
        "so100_so101_molmoact2", rng.normal(size=(200, 6)) * 30, rng.normal(size=(200, 6)) * 30,
        setup_type="single so100/so101 robotic arm in molmoact2", control_mode="absolute joint pose", action_horizon=30,
    )  # fmt: skip
    save_checkpoint(model, config, ckpt, norm_stats=norm)
    del model
    corpus = ["The task is to pick up the red cube."] * 20
    train_small_tokenizer(corpus, base_vocab_size=QWEN3_BASE_VOCAB).save(ckpt / "tokenizer.json")
    return params


def _child(layers: int, root: Path) -> dict[str, float]:
    """In a fresh process: write the checkpoint, export it, report seconds / peak RSS / bytes."""
    from molmoact2_edge.contract import ContractFlags
    from molmoact2_edge.export.pipeline import ExportOptions, export_bundle

    ckpt = root / "ckpt"
    params = release_width_checkpoint(layers, ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    start = time.perf_counter()
    options = ExportOptions(cameras=("front", "wrist"), allow_parity_failure=True, contract_flags=ContractFlags())
    manifest = export_bundle(ckpt, root / "bundle", options)
    seconds = time.perf_counter() - start
    bundle_bytes = sum(int(f["bytes"]) for f in manifest["files"].values())
    return {
        "layers": layers,
        "export_s": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "checkpoint_gb": ckpt_bytes / 1e9,
        "bundle_gb": bundle_bytes / 1e9,
        "vit_params": params["vit"],
        "params": params["total"],
    }


def measure(layers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(layers), "--root", tmp], check=True, stdout=subprocess.PIPE, text=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def extrapolate(points: list[dict[str, float]]) -> dict[str, float]:
    """Fixed cost + per-layer slope, the slope split ViT : LLM+expert by parameter bytes, extended to the release."""
    a = points[0]
    if len(points) > 1:
        b = points[-1]
        span = b["layers"] - a["layers"]
        slope = {k: (b[k] - a[k]) / span for k in ("export_s", "peak_rss_gb", "checkpoint_gb", "bundle_gb", "params", "vit_params")}
    else:  # one point: per-layer = the parameter share of the layers (fixed part = embeddings and heads)
        raise SystemExit("give two --layers values for a slope")
    vit_share = slope["vit_params"] / slope["params"]
    layers_equiv = vit_share * VIT_LAYERS + (1 - vit_share) * LLM_LAYERS  # release layers in "one of each" units
    return {k: a[k] + slope[k] * (layers_equiv - a["layers"]) for k in ("export_s", "peak_rss_gb", "checkpoint_gb", "bundle_gb")} | {
        "layers_equiv": layers_equiv
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.root)), flush=True)
        return
    points = [measure(n) for n in sorted(args.layers)]
    est = extrapolate(points)
    headers = ["layers (ViT = LLM = expert)", "export s", "peak RAM GB", "checkpoint GB", "bundle GB", "disk peak GB"]
    rows = [
        [int(p["layers"]), f"{p['export_s']:.0f}", f"{p['peak_rss_gb']:.1f}", f"{p['checkpoint_gb']:.2f}",
         f"{p['bundle_gb']:.2f}", f"{p['checkpoint_gb'] + 2 * p['bundle_gb']:.2f}"]
        for p in points
    ]  # fmt: skip
    rows.append([
        "4B release (27 ViT, 36 LLM): EXTRAPOLATED", f"{est['export_s']:.0f}", f"{est['peak_rss_gb']:.0f}",
        f"{est['checkpoint_gb']:.1f}", f"{est['bundle_gb']:.1f}", f"{est['checkpoint_gb'] + 2 * est['bundle_gb']:.0f}",
    ])  # fmt: skip
    table = markdown_table(headers, rows)
    print(table)
    body = (
        f"`nice -n 5 python benchmarks/export_4b.py --layers {' '.join(map(str, args.layers))}`: fp32 export of the "
        "4B preset's widths (random weights, two 378 px cameras, default options incl. the parity gate) with "
        "few layers, one process per point, one torch thread, on a shared loaded 2-core machine.\n\n" + table + "\n\n"
        "The last row is an **extrapolation**, not a measurement: the per-layer slope between the measured points, "
        "split between ViT and LLM+expert by parameter bytes, extended to the release's layer counts. "
        "Disk peak = checkpoint + bundle + the export's fp32 staging copy (same size as the bundle). "
        "Lower precisions reuse the fp32 graphs (`--fp32-bundle`) and add their own bundle."
    )
    write_section("export-4b", "Export of the 4B model: RAM, disk, time (extrapolated)", body)


if __name__ == "__main__":
    main()
