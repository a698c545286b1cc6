"""One benchmark contender in its own process: ``python -m molmoact2_edge.runtimes.bench_worker SPEC_JSON``.

``benchmark.compare_backends`` starts one of these per contender and keeps it for the whole
comparison. The worker loads the bundle on its backend (or the eager PyTorch reference
``model.policy.Policy`` on the bundle's checkpoint), makes ``warmup`` untimed calls on the fixed
synthetic observation and prints one JSON line: ``{"ready": describe}``. Then it serves rounds:
each line on stdin is ``{"calls": n, "seed": s}``; it makes one untimed call (the other contenders
just ran on this core: caches and branch predictors are theirs), then ``n`` timed ``act`` calls,
and prints one JSON line with the per-stage seconds. It blocks on stdin in between, so it uses no
CPU while another contender is timed (``compare_backends`` checks that). EOF ends it. Torch is
imported only by the eager contender.

SPEC keys: bundle, backend ("onnxruntime", "torch", ... or "eager"), options (backend options),
threads, warmup, checkpoint (eager only).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

Act = Callable[..., Any]


def _threads_env(threads: int | None) -> None:
    """Pin OpenMP/MKL pools before any numeric library starts them."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)


def load(spec: dict[str, Any]) -> tuple[Act, Any, dict[str, Any], AbstractContextManager[Any]]:
    """The contender's ``act``, the observation it is timed on, what ran (``describe``) and the context to call in."""
    from molmoact2_edge.runtimes.benchmark import synthetic_observation
    from molmoact2_edge.runtimes.session import PolicySession

    threads = spec.get("threads")
    if spec["backend"] != "eager":
        session = PolicySession(spec["bundle"], spec["backend"], **spec.get("options", {}))
        return session.act, synthetic_observation(session), session.backend.describe(), nullcontext()
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
    return policy.act, obs, {"name": "pytorch eager", "threads": torch.get_num_threads()}, torch.inference_mode()


def timed_calls(act: Act, obs: Any, calls: int, seed: int) -> dict[str, list[float]]:
    """Per-stage seconds of ``calls`` timed ``act`` calls (``total``: the whole call, as the caller sees it)."""
    stages: dict[str, list[float]] = {}
    for i in range(calls):
        t0 = time.perf_counter()
        chunk = act(obs, seed=seed + i)
        timings = {**chunk.timings, "total": time.perf_counter() - t0}
        for stage, seconds in timings.items():
            stages.setdefault(stage, []).append(float(seconds))
    return stages


def serve(spec: dict[str, Any]) -> None:
    act, obs, describe, context = load(spec)
    with context:
        timed_calls(act, obs, int(spec.get("warmup", 2)), seed=900_000)  # seeds the timed rounds do not use
        print(json.dumps({"ready": describe}, default=str), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            timed_calls(act, obs, 1, seed=999_999)  # untimed: the core was another contender's until now
            print(json.dumps({"stages": timed_calls(act, obs, int(request["calls"]), int(request["seed"]))}), flush=True)


def main() -> None:
    spec = json.loads(sys.argv[1])
    _threads_env(spec.get("threads"))
    serve(spec)


if __name__ == "__main__":
    main()
