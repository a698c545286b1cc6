"""``plan``: roofline bounds against hand-computed figures, the 4B release estimate, and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from molmoact2_edge.cli.main import cli
from molmoact2_edge.config import get_preset
from molmoact2_edge.errors import ConfigError
from molmoact2_edge.export.plan import (
    DEVICES,
    Device,
    Workload,
    depth_block_cost,
    flow_cost,
    load_target,
    plan,
    weight_parameters,
)

# A device with round numbers: 1 TFLOP/s at every precision, 1 GB/s.
UNIT = Device("unit", "unit device", {"fp16": 1.0, "int8": 1.0}, 1.0, 1.0, 0.0, "test")


def test_flow_cost_matches_hand_count_for_tiny() -> None:
    # tiny: expert width e=32, mlp hidden 128, 2 layers, max_action_dim 8, chunk 8, 10 steps.
    config = get_preset("tiny")
    work = Workload(cameras=1, prompt_tokens=20).resolve(config)
    cost = flow_cost(config, work)
    # weights per step: action_embed 8*32 + per layer (3e^2 + e^2 + 2e^2 + 2*e*128 + 128*e) + final 32*8
    per_layer = 3 * 32 * 32 + 32 * 32 + 2 * 32 * 32 + 2 * 32 * 128 + 128 * 32
    per_step = 8 * 32 + 2 * per_layer + 32 * 8
    assert per_step == 37376
    assert cost.weights == 10 * per_step
    # flops: 2 * tokens(8) * weights per step, plus attention 4*ah*ah*e + 4*ah*t*e per layer
    attention = 2 * (4 * 8 * 8 * 32 + 4 * 8 * 20 * 32)
    assert cost.flops == 10 * (2 * 8 * per_step + attention)
    # context K and V read per step and layer: 2 * 20 * 32 values
    assert cost.activations == 10 * 2 * (2 * 20 * 32)


def test_bound_on_unit_device_is_hand_computed() -> None:
    config = get_preset("tiny")
    report = plan(config, UNIT, "bf16", Workload(cameras=1, prompt_tokens=20))
    flow = report["stages"]["flow"]
    flops = 10 * (2 * 8 * 37376 + 2 * (4 * 8 * 8 * 32 + 4 * 8 * 20 * 32))  # 6_553_600
    nbytes = 10 * 37376 * 2 + 10 * 2 * 2 * 20 * 32 * 2  # bf16 weights and context, 798_720
    assert flow["gflops"] == pytest.approx(flops / 1e9, abs=1e-3)
    assert flow["compute_ms"] == pytest.approx(1e3 * flops / 1e12, abs=1e-3)  # 0.0066 ms
    assert flow["memory_ms"] == pytest.approx(1e3 * nbytes / 1e9, abs=1e-3)  # 0.799 ms
    assert flow["bound"] == "memory"
    assert flow["lower_bound_ms"] == pytest.approx(0.799, abs=1e-3)
    assert report["path"] == ["vision", "prefill", "flow"]
    assert report["total_lower_bound_ms"] == pytest.approx(
        sum(report["stages"][s]["lower_bound_ms"] for s in report["path"]), abs=2e-3
    )
    assert report["fits"] is (report["memory_gb"] <= 1.0)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_weight_count_matches_the_model(preset: str) -> None:
    torch = pytest.importorskip("torch")
    from molmoact2_edge.model.molmoact2 import MolmoAct2

    config = get_preset(preset)
    with torch.device("meta"):
        model = MolmoAct2(config)
    params = sum(p.numel() for p in model.parameters())
    assert weight_parameters(config) == pytest.approx(params, rel=0.01)  # biases and norm weights aside


@pytest.mark.parametrize(
    ("device", "precision", "estimate_ms"),
    [("agx-orin-64gb", "int8", 80), ("agx-orin-64gb", "bf16", 157), ("thor", "bf16", 62), ("thor", "fp8", 32),
     ("orin-nano-8gb", "int4", 175)],
)
def test_4b_release_reproduces_the_independent_estimate(device: str, precision: str, estimate_ms: float) -> None:
    config, work = load_target("molmoact2-4b")
    report = plan(config, DEVICES[device], precision, work)
    assert report["workload"]["prompt_tokens"] == 2 * 198 + 84
    assert report["total_lower_bound_ms"] == pytest.approx(estimate_ms, rel=0.2)


def test_4b_fits_orin_nano_in_int4_not_bf16() -> None:
    config, work = load_target("molmoact2-4b")
    assert plan(config, DEVICES["orin-nano-8gb"], "int4", work)["fits"]
    assert not plan(config, DEVICES["orin-nano-8gb"], "bf16", work)["fits"]


def test_depth_cache_lowers_the_think_stage() -> None:
    config = get_preset("molmoact2-4b").with_changes(enable_depth_reasoning=True)
    report = plan(config, DEVICES["agx-orin-64gb"], "int8", Workload())
    stages = report["stages"]
    assert stages["depth_full"]["lower_bound_ms"] == pytest.approx(103 * stages["depth_step"]["lower_bound_ms"], rel=1e-3)
    assert stages["depth_cached"]["lower_bound_ms"] < stages["depth_full"]["lower_bound_ms"] / 4
    assert "depth_cached" in report["path"]
    # a block call reads the weights once, like one step: memory-bound on the device
    assert stages["depth_block"]["bound"] == "memory"
    assert stages["depth_block"]["lower_bound_ms"] == pytest.approx(stages["depth_step"]["lower_bound_ms"], rel=0.01)


def test_depth_block_and_think_ratio_are_hand_computed() -> None:
    # tiny: LLM 2 layers, hidden 64, q 64, kv 32, mlp 128, vocab 5120, 100 depth codes, 128 depth rows, expert 32
    config = get_preset("tiny").with_changes(enable_depth_reasoning=True)
    work = Workload(cameras=1, prompt_tokens=20, depth_rejections=2.0)
    cost = depth_block_cost(config, work.resolve(config))
    block, keys = 102, 20 + 100 + 3  # <depth_start> + 100 codes + <depth_end>; prompt + codes + 3 markers
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 64 * 2 * 128 + 128 * 64
    assert cost.weights == 2 * per_layer + 64 * 5120 + 32 * 2 * 32  # blocks, lm_head, expert context K/V
    assert cost.flops == (
        2 * block * 2 * per_layer + 2 * 4 * block * keys * 64  # GEMMs and attention of both layers
        + 2 * 2 * 64 * 5120 + 2 * block * 64 * 128  # full vocabulary after the last two, depth rows for all
        + 2 * (2 * block) * 32 * 64  # the block's expert context, per layer
    )  # fmt: skip
    assert cost.activations == 2 * keys * 2 * 32  # the KV cache read

    report = plan(config, UNIT, "bf16", work)
    stages = report["stages"]
    assert report["path"] == ["vision", "prefill", "depth_cached", "flow"]
    one = stages["depth_block"]["lower_bound_ms"]
    assert stages["depth_cached"]["lower_bound_ms"] == pytest.approx(3 * one, abs=2e-3)  # 1 + 2 rejections
    continuous = sum(stages[s]["lower_bound_ms"] for s in ("vision", "prefill", "flow"))
    assert report["think_vs_continuous"] == pytest.approx((continuous + 3 * one) / continuous, abs=2e-3)
    assert report["max_rejections_for_1_3x"] == pytest.approx(0.3 * continuous / one - 1, abs=0.01)


def test_cli_plan_json_and_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["plan", "molmoact2-4b", "--device", "thor", "--precision", "fp8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["stages"]["prefill"]) >= {"lower_bound_ms", "bound"}
    assert report["stages"]["prefill"]["bound"] in ("compute", "memory")
    assert {"total_lower_bound_ms", "memory_gb", "fits"} <= set(report)
    bad = runner.invoke(cli, ["plan", "no-such-thing", "--device", "thor"])
    assert bad.exit_code != 0 and "neither a bundle" in bad.output
    with pytest.raises(ConfigError):
        plan(get_preset("tiny"), UNIT, "fp4", Workload())
