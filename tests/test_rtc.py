"""Real-time chunking: weights, the guided / conditioned samplers, the exported flow graph, training-time RTC.

The flow graph is exported from a tiny expert (2 Euler steps) and run by onnxruntime against the
PyTorch reference samplers; zero weights must give today's plain flow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from molmoact2_edge.config import get_preset
from molmoact2_edge.errors import ConfigError
from molmoact2_edge.export.graphs import FlowGraph, GraphShapes
from molmoact2_edge.export.onnx_export import export_module
from molmoact2_edge.model.flow import action_dim_mask, euler_sample
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.model.rtc_flow import conditioned_euler_sample, guided_euler_sample
from molmoact2_edge.rtc import CommittedPrefix, guidance_weights, resolve_mode, session_mode
from molmoact2_edge.runtimes import bundle as B
from tests.test_export import _one_thread  # noqa: F401  (autouse: one torch thread)

AH, T = 8, 12  # chunk length, context length


@pytest.fixture(scope="module")
def expert():
    """The tiny preset's expert with every weight perturbed (adaLN-Zero would otherwise output ~0)."""
    torch.manual_seed(0)
    config = get_preset("tiny").with_changes(flow_matching_num_steps=2)
    model = MolmoAct2.from_config(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return config, model.model.action_expert.eval()


def _inputs(config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers, width = config.text_config.num_hidden_layers, config.action_expert_config.hidden_size
    AD = config.max_action_dim
    return {
        "noise": torch.randn(1, AH, AD, generator=g),
        "context_k": torch.randn(layers, 1, T, width, generator=g),
        "context_v": torch.randn(layers, 1, T, width, generator=g),
        "cross_bias": torch.zeros(1, 1, 1, T),
        "action_dim_mask": action_dim_mask(6, AD),
        "rtc_prefix": torch.randn(1, AH, AD, generator=g) * action_dim_mask(6, AD),
        "rtc_weights": torch.from_numpy(guidance_weights(AH, 2, 6))[None],
    }


def _velocity(expert, x):
    return lambda a, t: expert(a, t, x["context_k"], x["context_v"], x["cross_bias"])


# --- weights and modes -----------------------------------------------------------------------


def test_guidance_weights_follow_the_soft_mask() -> None:
    w = guidance_weights(10, 3, 7)
    assert np.all(w[:3] == 1) and np.all(w[7:] == 0)
    assert np.all(np.diff(w[3:7]) < 0) and 0 < w[6] < w[3] < 1  # exponential decay over the overlap
    assert np.all(guidance_weights(10, 0, 0) == 0)  # nothing to continue: no guidance
    assert np.all(guidance_weights(10, 9, 4)[:4] == 1)  # delay capped at the overlap


def test_modes_resolve_and_refuse_what_the_checkpoint_or_bundle_lacks() -> None:
    assert resolve_mode("auto", 0) == "off" and resolve_mode("auto", 4) == "training"
    with pytest.raises(ConfigError, match="training-time RTC"):
        resolve_mode("training", 0)
    assert session_mode("auto", None) is None and session_mode("off", "training") == "off"
    assert session_mode("auto", "inference") == "inference" and session_mode("auto", "off") == "off"
    with pytest.raises(ConfigError, match="export --rtc inference"):
        session_mode("inference", "off")
    with pytest.raises(ConfigError, match="exported for training-time"):
        session_mode("inference", "training")
    with pytest.raises(ConfigError):
        CommittedPrefix(np.zeros((3, 6), np.float32), delay=4)


# --- samplers ----------------------------------------------------------------------------------


def test_zero_weights_give_the_plain_flow(expert) -> None:
    config, net = expert
    x = _inputs(config)
    mask, zero = x["action_dim_mask"], torch.zeros(1, AH)
    with torch.no_grad():
        plain = euler_sample(_velocity(net, x), x["noise"], 2, mask)
        for vjp in ("fd", "identity"):
            guided = guided_euler_sample(_velocity(net, x), x["noise"], 2, x["rtc_prefix"], zero, mask, vjp=vjp)
            assert torch.equal(guided, plain), vjp
        conditioned = conditioned_euler_sample(_velocity(net, x), x["noise"], 2, x["rtc_prefix"], zero, mask)
    torch.testing.assert_close(conditioned, plain, atol=1e-5, rtol=0)


def test_guidance_pulls_the_committed_steps_toward_the_prefix(expert) -> None:
    config, net = expert
    x = _inputs(config)
    mask, y = x["action_dim_mask"], x["rtc_prefix"]
    with torch.no_grad():
        plain = euler_sample(_velocity(net, x), x["noise"], 2, mask)
    results = {}
    for vjp in ("autograd", "fd", "identity"):
        results[vjp] = guided_euler_sample(_velocity(net, x), x["noise"], 2, y, x["rtc_weights"], mask, vjp=vjp)
        gap = (results[vjp] - y)[0, :2].abs().mean()
        assert gap < 0.5 * (plain - y)[0, :2].abs().mean(), vjp
    # the exportable finite-difference VJP lands near the exact one (docs/rtc.md measures it on the real checkpoint)
    assert (results["fd"] - results["autograd"]).abs().max() < 0.25 * (plain - results["autograd"]).abs().max()


def test_conditioning_pins_the_committed_steps(expert) -> None:
    config, net = expert
    x = _inputs(config)
    hard = torch.tensor([[1.0, 1.0, 1.0] + [0.0] * (AH - 3)])
    with torch.no_grad():
        out = conditioned_euler_sample(_velocity(net, x), x["noise"], 2, x["rtc_prefix"], hard, x["action_dim_mask"])
    assert torch.equal(out[0, :3], x["rtc_prefix"][0, :3])


# --- the exported graph ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_exported_rtc_flow_graph_matches_the_reference(expert, mode: str, tmp_path: Path) -> None:
    config, net = expert
    graph = FlowGraph(net, 2, mask_padding=True, rtc=mode).eval()
    shapes = GraphShapes(1, (28, 28), T, T, T, AH, 4)
    examples = shapes.example_inputs(config)[B.FLOW.name]
    exported = export_module(graph, examples, tmp_path / "flow.onnx", B.FLOW.inputs, B.FLOW.outputs)
    assert exported.op_counts  # check_graph ran: onnx.checker + the TensorRT allow-list accepted it
    session = ort.InferenceSession(str(tmp_path / "flow.onnx"), providers=["CPUExecutionProvider"])
    x = _inputs(config, seed=3)
    if mode == "training":
        x["rtc_weights"] = torch.tensor([[1.0, 1.0] + [0.0] * (AH - 2)])
    feeds = {k: v.numpy() for k, v in x.items()}
    with torch.no_grad():
        reference = graph(*(x[n] for n in B.FLOW.inputs)).numpy()
        plain = euler_sample(_velocity(net, x), x["noise"], 2, x["action_dim_mask"]).numpy()
    (got,) = session.run(None, feeds)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-2  # the prefix changed the chunk
    feeds["rtc_weights"] = np.zeros((1, AH), np.float32)
    (zero,) = session.run(None, feeds)
    np.testing.assert_allclose(zero, plain, atol=1e-4)  # zero weights: today's flow output
