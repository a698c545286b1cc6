"""Training submodule: both losses fall, a killed run resumes to the same weights, DDP gradients agree
with a single process on the combined batch, the depth codebook round-trips, ``molmo-edge eval`` runs.

Everything on the tiny preset and a 3-episode dataset recorded with ``sim record``'s library call.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from molmoact2_edge.cli import main as cli_main
from molmoact2_edge.errors import TrainingError
from molmoact2_edge.training import trainer as trainer_mod
from molmoact2_edge.training.batches import BatchMaker
from molmoact2_edge.training.depth_vq import DepthVQConfig, load_depth_vq, save_depth_vq, train_depth_vq
from molmoact2_edge.training.distributed import DistInfo
from molmoact2_edge.training.loop import LoopConfig, Stage, run_stage
from molmoact2_edge.training.setup import build_run
from molmoact2_edge.training.trainer import TrainConfig, train

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """One torch thread: on a shared 2-core machine, 2 threads contend and run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from molmoact2_edge.sim.record import record_demos

    out = tmp_path_factory.mktemp("data") / "touch"
    record_demos(out, ["touch"], 3, seed=0, size=64, codec="libx264")
    return out


def _config(data: Path, out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(
        data=str(data), out=str(out), preset="tiny", steps=4, batch_size=4, action_horizon=8,
        flow_samples=2, save_every=2, log_every=1, progress=False,
    )  # fmt: skip
    return replace(base, **changes)


def _fixed_loss(objective: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(objective(batch)[0])


def test_both_losses_fall(dataset: Path, tmp_path: Path) -> None:
    cfg = _config(dataset, tmp_path / "ckpt", steps=12, lr=3e-3, warmup=2)
    run = build_run(cfg, CPU)
    batch = run.batches(0, slice(0, cfg.batch_size))
    for index in (1, 2):
        trainer_mod._set_trainable(run.model, index, finetune_backbone=False)
        objective = run.objective(index)
        before = _fixed_loss(objective, batch)
        stage = Stage(index, objective, run.batches, run.save, run.load_model)
        run_stage(stage, cfg.loop(index), CPU, tmp_path / f"stage{index}", resume=False)
        after = _fixed_loss(objective, batch)
        assert after < 0.9 * before, f"stage {index}: loss {before:.4f} -> {after:.4f}"


def test_stage2_leaves_backbone_untouched(dataset: Path, tmp_path: Path) -> None:
    cfg = _config(dataset, tmp_path / "ckpt", steps=2)
    run = build_run(cfg, CPU)
    trainer_mod._set_trainable(run.model, 2, finetune_backbone=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run_stage(
        Stage(2, run.objective(2), run.batches, run.save, run.load_model), cfg.loop(2), CPU, tmp_path, False
    )
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.action_expert.") for k in changed), sorted(changed)[:5]


def test_killed_run_resumes_to_the_same_weights(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = train(_config(dataset, tmp_path / "whole"))
    calls = {"n": 0}
    original = BatchMaker.__call__

    def dies_in_stage2(self: BatchMaker, step: int, shard: slice) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 8:  # stage 1 made 4 batches; this is stage 2's 4th, after its step-2 checkpoint
            raise KeyboardInterrupt
        return original(self, step, shard)

    monkeypatch.setattr(BatchMaker, "__call__", dies_in_stage2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(dataset, tmp_path / "killed"))
    monkeypatch.setattr(BatchMaker, "__call__", original)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "training_state.json").read_text())
    assert (state["stage"], state["step"]) == (2, 2)
    with pytest.raises(TrainingError, match="--resume"):
        train(_config(dataset, tmp_path / "killed"))
    resumed = train(_config(dataset, tmp_path / "killed", resume=True))
    from molmoact2_edge.checkpoint import read_tensors

    a, b = read_tensors(whole), read_tensors(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for name in (
        "config.json",
        "norm_stats.json",
        "tokenizer.json",
        "action_tokenizer/processor_config.json",
    ):
        assert (resumed / name).is_file(), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from molmoact2_edge.training.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    run = build_run(cfg, info)
    trainer_mod._set_trainable(run.model, 1, finetune_backbone=False)
    model = torch.nn.parallel.DistributedDataParallel(run.objective(1))
    loss, _ = model(run.batches(0, info.shard(cfg.batch_size)))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    from safetensors.torch import save_file

    save_file(grads, f"{out}/grads{rank}.safetensors")
    # Stage 2 with the backbone loosened (lm_head, ln_f get no gradient) through the real loop under DDP.
    trainer_mod._set_trainable(run.model, 2, finetune_backbone=True)
    stage = Stage(2, run.objective(2), run.batches, run.save, run.load_model, find_unused_parameters=True)
    run_stage(stage, replace(cfg, steps=2, save_every=10).loop(2), info, Path(out) / "ddp", resume=False)
    save_file(
        {k: v.contiguous() for k, v in run.model.state_dict().items()}, f"{out}/weights{rank}.safetensors"
    )
    shutdown()


def test_ddp_gradients_match_single_process(dataset: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _config(dataset, tmp_path / "ckpt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    g0, g1 = load_file(str(tmp_path / "grads0.safetensors")), load_file(str(tmp_path / "grads1.safetensors"))
    run = build_run(cfg, CPU)
    trainer_mod._set_trainable(run.model, 1, finetune_backbone=False)
    loss, _ = run.objective(1)(run.batches(0, slice(0, cfg.batch_size)))  # the combined batch
    loss.backward()
    single = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
    assert g0.keys() == g1.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)  # DDP averaged: identical on ranks
        torch.testing.assert_close(g0[name], grad, rtol=1e-4, atol=1e-6)
    w0, w1 = (
        load_file(str(tmp_path / "weights0.safetensors")),
        load_file(str(tmp_path / "weights1.safetensors")),
    )
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks stayed in sync through the loop


def test_depth_codebook_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    depth = np.full((64, 40, 40), 1.0, dtype=np.float32)
    for d in depth:
        x, y = rng.integers(0, 28, size=2)
        d[y : y + 12, x : x + 12] = 0.5 + 0.4 * rng.random()
    vq, metrics = train_depth_vq(depth, DepthVQConfig(), steps=60, batch_size=16)
    codes = vq.encode(torch.from_numpy(depth[:8]))
    assert codes.shape == (8, 100) and int(codes.min()) >= 0 and int(codes.max()) < 128
    assert metrics["mae_m"] < 0.2
    save_depth_vq(vq, tmp_path)
    assert torch.equal(load_depth_vq(tmp_path).encode(torch.from_numpy(depth[:8])), codes)


def test_eval_cli_runs_a_trained_tiny_checkpoint(dataset: Path, tmp_path: Path) -> None:
    ckpt = train(_config(dataset, tmp_path / "ckpt", steps=2))
    args = [
        "eval",
        str(ckpt),
        "--task",
        "touch",
        "--episodes",
        "1",
        "--json",
        "--videos",
        str(tmp_path / "v"),
    ]
    result = CliRunner().invoke(cli_main.cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["episodes"] == 1 and 0.0 <= summary["success_rate"] <= 1.0
    assert summary["per_episode"][0]["steps"] >= 1
    assert Path(summary["videos"][0]).stat().st_size > 0


def test_stage2_without_stage1_is_refused(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="stage 1"):
        train(_config(dataset, tmp_path / "empty", stage="2"))


def test_loop_config_rejects_nonsense() -> None:
    with pytest.raises(TrainingError):
        LoopConfig(steps=10, batch_size=0)


def test_think_stage2_with_the_backbone_loosened_keeps_the_depth_token_loss(tmp_path: Path) -> None:
    """A Think backbone fine-tuned on the flow loss also keeps stage 1's cross-entropy on the depth (and action)
    tokens, whose gradient reaches lm_head; without the loosened backbone stage 2 is the flow loss alone."""
    from molmoact2_edge.sim.record import record_demos

    data = tmp_path / "touch_depth"
    record_demos(data, ["touch"], 2, seed=0, size=64, codec="libx264", depth_cameras=("front",))
    cfg = _config(data, tmp_path / "ckpt", think=True, finetune_backbone=True, cameras=("front",))
    run = build_run(cfg, CPU)
    batch = run.batches(0, slice(0, cfg.batch_size))
    assert (batch["labels"] >= run.config.depth_token_start_id).any()  # depth codes are targets
    trainer_mod._set_trainable(run.model, 2, finetune_backbone=True)
    loss, metrics = run.objective(2)(batch)
    assert loss.item() > metrics["flow_loss"] > 0 and 0.0 <= metrics["token_acc"] <= 1.0
    loss.backward()
    assert run.model.lm_head.weight.grad is not None and run.model.lm_head.weight.grad.abs().sum() > 0
    insulated = build_run(replace(cfg, finetune_backbone=False), CPU).objective(2)
    assert insulated(batch)[1] == {}
