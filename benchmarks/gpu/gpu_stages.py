"""Per-stage act() latency of a bundle on TensorRT (CUDA graphs), onnxruntime CUDA and CPU, and GPU-vs-CPU parity.

NOT RUN YET: written without a GPU. Run by ``benchmarks/gpu/run_gpu_check.sh`` on a GPU machine
(TensorRT engines built into the bundle first). Torch-free, like the device side.

    python benchmarks/gpu/gpu_stages.py BUNDLE --rounds 3 --iterations 30 --out report.json

Latency: each backend in its own process, alternated over rounds (``compare_backends``).
Parity: the GPU backends' chunks against the CPU bundle's on the same observation and flow
noise seeds, as a fraction of the CPU chunks' spread between two seeds (the export parity
gate's measure; the gate passes at 0.5).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from molmoact2_edge.runtimes.benchmark import Contender, compare_backends, synthetic_observation  # noqa: E402
from molmoact2_edge.runtimes.session import PolicySession  # noqa: E402

SEED_SPREAD_FRACTION = 0.5  # export/parity.py's end-to-end limit (that module imports torch)
CPU_ORT = {"providers": ["CPUExecutionProvider"]}
CUDA_ORT = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda_graph": True}
CONTENDERS = [
    Contender("tensorrt (CUDA graph)", "tensorrt", {"cuda_graph": True}),
    Contender("tensorrt (no graph)", "tensorrt", {"cuda_graph": False}),
    Contender("onnxruntime CUDA", "onnxruntime", CUDA_ORT),
    Contender("onnxruntime CPU", "onnxruntime", CPU_ORT),
]


def chunks(bundle: Path, backend: str, options: dict[str, Any], seeds: list[int]) -> list[np.ndarray]:
    with PolicySession(bundle, backend, **options) as session:
        obs = synthetic_observation(session)
        session.act(obs, seed=seeds[0])  # warm-up (engine setup, graph capture)
        return [session.act(obs, seed=s).actions for s in seeds]


def parity(bundle: Path, seeds: list[int]) -> dict[str, Any]:
    reference = chunks(bundle, "onnxruntime", CPU_ORT, seeds)
    spread = float(np.abs(reference[0] - reference[1]).max())
    out: dict[str, Any] = {"seed_spread": spread}
    for contender in CONTENDERS[:3]:
        got = chunks(bundle, contender.backend, contender.options, seeds)
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, reference, strict=True))
        ratio = diff / spread if spread > 0 else float("inf")
        out[contender.label] = {"max_diff": diff, "ratio": ratio, "passed": ratio <= SEED_SPREAD_FRACTION}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    latency = compare_backends(args.bundle, CONTENDERS, args.iterations, rounds=args.rounds)
    report = {"bundle": str(args.bundle), "latency": latency, "parity": parity(args.bundle, [0, 1, 2])}
    for result in report["latency"]["backends"].values():
        result.pop("raw_s", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\n### {args.bundle.name}\n\n{latency['method']}\n")
    print("| backend | vision | prefill | flow | total p50 ms | p25-p75 | parity (of limit) |\n|---|---|---|---|---|---|---|")
    for name, result in latency["backends"].items():
        st = result["stages_ms"]
        cells = [f"{st[s]['p50']:.2f}" if s in st else "-" for s in ("vision", "prefill", "flow", "total")]
        check = report["parity"].get(name)
        verdict = f"{'pass' if check['passed'] else 'FAIL'} {check['ratio']:.3f}" if check else "reference"
        spread = result["spread_ms"]
        print(f"| {name} | {' | '.join(cells)} | {spread['p25']:.2f}-{spread['p75']:.2f} | {verdict} |")
    return 0 if all(v["passed"] for k, v in report["parity"].items() if k != "seed_spread") else 1


if __name__ == "__main__":
    sys.exit(main())
