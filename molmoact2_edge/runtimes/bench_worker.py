"""One benchmark contender in its own process: ``python -m molmoact2_edge.runtimes.bench_worker SPEC_JSON``.

``benchmark.compare_backends`` starts one of these per contender and round, one at a time,
so contenders never share cores, thread pools or caches while timed. The worker loads the
bundle on its backend (or the eager PyTorch reference ``model.policy.Policy`` on the
bundle's checkpoint), makes ``warmup`` untimed calls, then ``iterations`` timed ``act``
calls on the fixed synthetic observation, and prints one JSON line: per-stage seconds and
what ran (``describe``). Torch is imported only by the torch and eager contenders.

SPEC keys: bundle, backend ("onnxruntime", "torch", ... or "eager"), options (backend
options), threads, iterations, warmup, seed (first flow-noise seed), checkpoint (eager only).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _threads_env(threads: int | None) -> None:
    """Pin OpenMP/MKL pools before any numeric library starts them."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from molmoact2_edge.runtimes.benchmark import synthetic_observation
    from molmoact2_edge.runtimes.session import PolicySession

    threads = spec.get("threads")
    if spec["backend"] == "eager":
        import torch

        from molmoact2_edge.model.policy import Policy

        if threads:
            torch.set_num_threads(threads)
        if spec.get("options", {}).get("flush_denormals"):  # as the onnxruntime backend does on CPU
            torch.set_flush_denormal(True)
        probe = PolicySession(spec["bundle"], "onnxruntime", graphs=("vision",), providers=("CPUExecutionProvider",))
        obs = synthetic_observation(probe)
        policy = Policy.from_checkpoint(
            spec["checkpoint"], camera_order=probe.camera_order, bucket=int(probe.bundle.prompt["bucket"])
        )
        probe.close()
        act, describe = policy.act, {"name": "pytorch eager", "threads": torch.get_num_threads()}
        context: Any = torch.inference_mode()
    else:
        from contextlib import nullcontext

        session = PolicySession(spec["bundle"], spec["backend"], **spec.get("options", {}))
        obs = synthetic_observation(session)
        act, describe, context = session.act, session.backend.describe(), nullcontext()
    stages: dict[str, list[float]] = {}
    seed = int(spec.get("seed", 0))
    with context:
        for i in range(int(spec.get("warmup", 2)) + int(spec["iterations"])):
            t0 = time.perf_counter()
            chunk = act(obs, seed=seed + i)
            total = time.perf_counter() - t0
            if i < int(spec.get("warmup", 2)):
                continue
            timings = dict(chunk.timings)
            timings["total"] = total
            for stage, seconds in timings.items():
                stages.setdefault(stage, []).append(float(seconds))
    return {"stages": stages, "describe": describe}


def main() -> None:
    spec = json.loads(sys.argv[1])
    _threads_env(spec.get("threads"))
    print(json.dumps(run(spec), default=str))


if __name__ == "__main__":
    main()
