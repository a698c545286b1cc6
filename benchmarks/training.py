"""Training throughput (samples/s per preset and stage) on this machine, and the bundled checkpoint's success table.

    python benchmarks/training.py [--presets tiny small-fast small] [--steps 6] [--threads 1]

Throughput: a 3-episode touch dataset is recorded into a temporary directory, then for each
preset the real stage objectives run ``--steps`` optimizer steps (after one warm-up step) at
batch 8; samples/s counts forward + backward + AdamW per sample, data already in memory.
Success: the eval JSON files that ``molmo-edge eval --json`` wrote next to each bundled
checkpoint (``checkpoints/*/eval_*.json``), one row each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def throughput(presets: list[str], steps: int, batch_size: int) -> list[list[object]]:
    from molmoact2_edge.sim.record import record_demos
    from molmoact2_edge.training import trainer
    from molmoact2_edge.training.distributed import init_distributed
    from molmoact2_edge.training.setup import build_run

    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "touch"
        record_demos(data, ["touch"], 3, seed=0, size=112, codec="libx264")
        for preset in presets:
            horizon = 8 if preset == "tiny" else 10
            cfg = trainer.TrainConfig(
                data=str(data), out=tmp, preset=preset, batch_size=batch_size, action_horizon=horizon
            )
            run = build_run(cfg, init_distributed("cpu"))
            for stage in (1, 2):
                trainer._set_trainable(run.model, stage, finetune_backbone=False)
                objective = run.objective(stage)
                params = [p for p in objective.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4)
                for step in range(steps + 1):
                    if step == 1:
                        start = time.perf_counter()  # step 0 is the warm-up
                    loss, _ = objective(run.batches(step, slice(0, batch_size)))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                per_s = steps * batch_size / (time.perf_counter() - start)
                rows.append(
                    [
                        preset,
                        stage,
                        batch_size,
                        f"{sum(p.numel() for p in params) / 1e6:.2f} M",
                        f"{per_s:.2f}",
                    ]
                )
                print(f"{preset} stage {stage}: {per_s:.2f} samples/s", flush=True)
    return rows


def success_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for path in sorted(ROOT.glob("checkpoints/*/eval_*.json")):
        r = json.loads(path.read_text())
        # eval_demo_<precision>.json (benchmarks/demo_success.py): the exported bundle in the demo loop
        mode = r.get("mode") or f"{r['precision']} bundle, demo loop"
        per_chunk = r.get("mean_seconds_per_chunk")
        rows.append([path.parent.name, path.stem.removeprefix("eval_"), r["task"], mode,
                     f"{r['successes']}/{r['episodes']}", f"{100 * r['success_rate']:.0f}%",
                     "-" if per_chunk is None else f"{1000 * per_chunk:.0f}"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "small-fast", "small"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--success-only", action="store_true", help="Only rewrite the success table.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.success_only:
        write_throughput(args)
    write_success()


def write_throughput(args: argparse.Namespace) -> None:
    rows = throughput(args.presets, args.steps, args.batch_size)
    body = (
        f"CPU, {args.threads} torch thread(s), one process. Stage 1 = next-token on "
        "OpenFAST tokens (backbone trains); stage 2 = flow expert with the backbone frozen (4 flow samples "
        "per chunk). Samples/s include forward, backward and the AdamW step. The full runs behind the "
        "bundled checkpoints (two gloo ranks of one thread, 8 flow samples, backbone fine-tuned) are in "
        "their READMEs: `so101-touch` 34-41 samples/s on a quiet machine.\n\n"
        + markdown_table(["preset", "stage", "batch", "trainable params", "samples/s"], rows)
    )
    write_section("training-throughput", "Training throughput", body)


def write_success() -> None:
    success = success_rows()
    if success:
        body = (
            "Closed-loop success in the simulated SO-101 (`molmo-edge eval --json`, seeded episodes "
            "100000+, disjoint from the training demos' seeds). Time per chunk is the PyTorch reference "
            "policy on this shared CPU. One row per `eval_*.json` beside each committed checkpoint; each "
            "checkpoint's README has its recipe and evaluation commands.\n\n"
            + markdown_table(["checkpoint", "run", "task", "mode", "successes", "rate", "ms/chunk"], success)
        )
        write_section("training-success", "Bundled checkpoint success rate", body)
        print(markdown_table(["checkpoint", "run", "task", "mode", "successes", "rate", "ms/chunk"], success))


if __name__ == "__main__":
    main()
