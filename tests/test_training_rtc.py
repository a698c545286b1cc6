"""Training-time RTC: committed steps are fed clean and left out of the loss; the option travels in config.json
to the reference policy and the exported flow graph; ``--init-from`` fine-tunes a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from molmoact2_edge.export.graphs import rtc_mode
from molmoact2_edge.model.policy import Policy
from molmoact2_edge.training import trainer as trainer_mod
from molmoact2_edge.training.setup import build_run
from molmoact2_edge.training.trainer import train
from tests.test_training import CPU, _config, _one_thread, dataset  # noqa: F401  (shared fixtures)


def test_committed_steps_get_no_loss_gradient(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    run = build_run(_config(dataset, tmp_path / "ckpt", rtc_max_delay=5), CPU)
    trainer_mod._set_trainable(run.model, 2, finetune_backbone=False)
    batch = run.batches(3, slice(0, 4))
    delay = batch["rtc_delay"].flatten()  # (b*k,)
    assert delay.max() <= 5 and len(set(delay.tolist())) > 1
    outputs: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        outputs["velocity"] = out

    handle = run.model.model.action_expert.final_layer.register_forward_hook(keep)
    loss, _ = run.objective(2)(batch)
    loss.backward()
    handle.remove()
    grad = outputs["velocity"].grad  # (b*k, ah, ad)
    valid = batch["action_mask"].repeat_interleave(batch["t"].shape[1], dim=0)  # past an episode's end: no loss
    trained = 0
    for row, d in enumerate(delay.tolist()):
        assert torch.count_nonzero(grad[row, :d]) == 0  # the committed prefix is not trained on
        assert (torch.count_nonzero(grad[row, d:]) > 0) == bool(valid[row, d:].any())
        trained += bool(valid[row, d:].any())
    assert trained > 0


def test_rtc_fine_tune_is_recorded_and_picked_up(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    base = train(_config(dataset, tmp_path / "base", stage="1", steps=1))
    tuned = train(_config(dataset, tmp_path / "rtc", stage="2", steps=2, init_from=str(base), rtc_max_delay=3))
    assert json.loads((tuned / "config.json").read_text())["rtc_max_delay"] == 3
    policy = Policy.from_checkpoint(tuned)  # --rtc auto
    assert policy.rtc == "training" and rtc_mode(policy.config) == "training"
    assert Policy.from_checkpoint(base).rtc == "off"  # inference-time guidance is opt-in
