"""Export time and bundle size per precision, for the ``tiny`` and ``small`` presets (random weights).

\b
  python benchmarks/export.py                      # tiny and small, every precision
  python benchmarks/export.py --presets tiny --precisions fp32 int4

What each time includes: fp32 = loading the checkpoint + torch.onnx.export (dynamo) of every graph
+ checker/allow-list + copying side files + the parity gate. fp16/int8/int4 reuse the fp32 graphs
(``--fp32-bundle``), so their time is the conversion/quantization (fp16 also re-exports the flow graph
with an fp16 expert; int8 includes recording calibration inputs) + the parity gate. Weights are
random (export cost does not depend on training); sizes are the whole bundle directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.checkpoint import save_checkpoint  # noqa: E402
from molmoact2_edge.config import get_preset  # noqa: E402
from molmoact2_edge.contract import ContractFlags  # noqa: E402
from molmoact2_edge.export.calibration import save_observations, synthetic_observations  # noqa: E402
from molmoact2_edge.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from molmoact2_edge.model.molmoact2 import MolmoAct2  # noqa: E402
from molmoact2_edge.normalization import NormStats  # noqa: E402
from molmoact2_edge.tokenizers.text import train_small_tokenizer  # noqa: E402

CAMERAS = ("front", "wrist")
CORPUS = ["The task is to pick up the red cube. The setup is so101 arm. The current state of the robot is"] * 20


def make_checkpoint(preset: str, path: Path) -> Path:
    config = get_preset(preset)
    model = MolmoAct2.from_config(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rng = np.random.default_rng(0)
    horizon = min(config.max_action_horizon, 30)
    norm = NormStats.compute(
        "so101", rng.normal(size=(200, 6)) * 30, rng.normal(size=(200, 6)) * 30,
        setup_type="so101 arm", control_mode="absolute joint pose", action_horizon=horizon,
    )  # fmt: skip
    save_checkpoint(model, config, path, norm_stats=norm)
    train_small_tokenizer(CORPUS).save(path / "tokenizer.json")
    return path


HEADERS = ["preset", "precision", "export s", "bundle MB", "x checkpoint", "worst graph rel RMS", "e2e ratio", "gate"]


def report(rows: list[list[object]]) -> None:
    """Print the table and (re)write this benchmark's section of docs/benchmarks.md."""
    table = markdown_table(HEADERS, rows)
    print(table, flush=True)
    body = (
        table
        + "\n\nfp32 times include the torch.onnx.export of every graph; the other precisions reuse those graphs "
        "(fp16 re-exports only the flow graph). `e2e ratio` = max|bundle - PyTorch| / max|PyTorch(seed A) - "
        "PyTorch(seed B)| (gate: <= 0.5). Random weights; one run on a shared 2-core machine: compare ratios."
    )
    write_section("export", "Export: time and bundle size per precision", body)


def run(presets: list[str], precisions: list[str]) -> list[list[object]]:
    """Export every preset in every precision; the report is rewritten after each preset (small is slow)."""
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for preset in presets:
            ckpt = make_checkpoint(preset, root / f"ckpt-{preset}")
            calib = root / f"calib-{preset}.npz"
            meta = NormStats.load(ckpt / "norm_stats.json").tag()
            save_observations(calib, synthetic_observations(CAMERAS, meta, 4, seed=1))
            ckpt_mb = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e6
            fp32 = root / f"{preset}-fp32"
            for precision in ["fp32", *[p for p in precisions if p != "fp32"]]:
                out = root / f"{preset}-{precision}"
                options = ExportOptions(
                    precision=precision, cameras=CAMERAS, allow_parity_failure=True,
                    calib=calib if precision == "int8" else None,
                    fp32_bundle=fp32 if precision != "fp32" else None,
                    contract_flags=ContractFlags(control_hz=10.0, joint_frame="lerobot", robot="so101"),
                )  # fmt: skip
                start = time.perf_counter()
                manifest = export_bundle(ckpt, out, options, progress=lambda m: print("   ", m, flush=True))
                seconds = time.perf_counter() - start
                size = sum(int(f["bytes"]) for f in manifest["files"].values()) / 1e6
                gate = manifest["parity"]
                worst = max(g["rel_rms"] for g in gate["graphs"].values())
                if precision in precisions:
                    rows.append([
                        preset, precision, f"{seconds:.1f}", f"{size:.2f}", f"{size / ckpt_mb:.2f}",
                        f"{worst:.2g}", f"{gate['end_to_end']['ratio']:.3g}", "pass" if gate["passed"] else "FAIL",
                    ])  # fmt: skip
                print(rows[-1] if rows else "", flush=True)
            report(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    run(args.presets, args.precisions)


if __name__ == "__main__":
    main()
