"""The MolmoAct2 network: static KV cache vs full forward, expert conditioning, flow loop, shapes, counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from molmoact2_edge.config import get_preset
from molmoact2_edge.model import masks
from molmoact2_edge.model.connector import pooling_windows
from molmoact2_edge.model.flow import action_dim_mask, euler_sample, interpolate, sample_flow_time
from molmoact2_edge.model.molmoact2 import MolmoAct2

CFG = get_preset("tiny")


def random_model(config=CFG, seed: int = 0) -> MolmoAct2:
    """A tiny model whose weights are all non-trivial (init_weights zeroes the adaLN gates)."""
    model = MolmoAct2.from_config(config, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def prompt_ids(config=CFG, cameras: int = 2) -> np.ndarray:
    c = config
    image = [c.image_start_token_id] + [c.image_patch_id] * c.tokens_per_image + [c.image_end_token_id]
    text = [11, 12, 13, c.state_start_token_id, c.state_token_start_id + 7, c.state_end_token_id]
    tail = [c.eos_token_id, 14, c.action_output_token_id]
    return np.asarray([[c.bos_token_id] + image * cameras + text + tail], dtype=np.int64)


def prefill_inputs(model: MolmoAct2, ids: np.ndarray, images: torch.Tensor):
    feats = model.encode_images(images)
    positions = torch.from_numpy(masks.image_token_positions(ids, model.config))
    embeds = model.embed(torch.from_numpy(ids), feats, positions)
    am = np.ones_like(ids)
    bias = torch.from_numpy(masks.prefill_attention_bias(am, masks.token_type_ids(ids, model.config)))
    cross = torch.from_numpy(masks.cross_attention_bias(masks.cross_attention_valid(ids, am, model.config)))
    return embeds, bias, cross


def images(b: int = 1, n: int = 2) -> torch.Tensor:
    h, w = CFG.vit_config.image_default_input_size
    return torch.randint(0, 256, (b, n, h, w, 3), dtype=torch.uint8)


@torch.no_grad()
def test_decode_steps_match_one_full_pass():
    model = random_model()
    T, P, L = 12, 5, 16  # sequence, prompt, static cache length
    ids = torch.randint(0, 2000, (1, T))
    causal = torch.from_numpy(masks.prefill_attention_bias(np.ones((1, T)), np.zeros((1, T))))
    full = model.prefill(model.embed_tokens(ids), causal)

    out = model.prefill(model.embed_tokens(ids[:, :P]), causal[:, :, :P, :P], cache_len=L)
    k_cache, v_cache = out.k_cache, out.v_cache
    assert k_cache.shape == (CFG.text_config.num_hidden_layers, 1, CFG.text_config.num_key_value_heads, L, 16)
    torch.testing.assert_close(out.logits, full.logits[:, :P], rtol=1e-5, atol=1e-5)
    for pos in range(P, T):
        bias = torch.from_numpy(masks.decode_attention_bias(np.arange(L)[None] <= pos))
        k_before = k_cache.clone()
        logits, k_cache_new, v_cache_new = model.decode_step(
            ids[:, pos : pos + 1], torch.tensor([[pos]]), torch.tensor([pos]), k_cache, v_cache, bias
        )
        assert torch.equal(k_cache, k_before), "decode_step must not modify its input cache"
        torch.testing.assert_close(logits[:, 0], full.logits[:, pos], rtol=1e-5, atol=1e-5)
        k_cache, v_cache = k_cache_new, v_cache_new
    torch.testing.assert_close(k_cache[:, :, :, :T], full.k_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache[:, :, :, :T], full.v_cache, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(k_cache[:, :, :, T:]) == 0


@torch.no_grad()
def test_context_of_layer_i_reaches_the_expert_only_through_block_i_cross_attention():
    model = random_model()
    ids = prompt_ids()
    embeds, bias, cross = prefill_inputs(model, ids, images())
    out = model.prefill(embeds, bias)
    expert = model.model.action_expert
    x_t, t = torch.randn(1, CFG.max_action_horizon, CFG.max_action_dim), torch.tensor([0.3])

    def trace(ctx_k):
        record = {}
        hooks = [
            mod.register_forward_hook(lambda m, a, o, key=key: record.__setitem__(key, o.clone()))
            for i, blk in enumerate(expert.blocks)
            for key, mod in [((i, "block"), blk), ((i, "self"), blk.self_attn), ((i, "cross"), blk.cross_attn)]
        ]
        v = model.expert_velocity(x_t, t, ctx_k, out.expert_v, cross)
        for h in hooks:
            h.remove()
        return record, v

    base, v0 = trace(out.expert_k)
    layer = 1
    perturbed = out.expert_k.clone()
    perturbed[layer] += torch.randn_like(perturbed[layer])
    changed, v1 = trace(perturbed)
    for i in range(layer):
        assert torch.equal(base[(i, "block")], changed[(i, "block")])
    assert torch.equal(base[(layer, "self")], changed[(layer, "self")])
    assert not torch.allclose(base[(layer, "cross")], changed[(layer, "cross")])
    assert not torch.allclose(v0, v1)


@torch.no_grad()
def test_project_context_uses_only_its_own_llm_layer():
    model = random_model()
    k = torch.randn(2, 1, 2, 7, 16)
    v = torch.randn(2, 1, 2, 7, 16)
    ek, ev = model.model.action_expert.project_context(k, v)
    k2 = k.clone()
    k2[0] *= 3.0 + torch.rand_like(k2[0])
    ek2, ev2 = model.model.action_expert.project_context(k2, v)
    assert torch.equal(ek[1], ek2[1]) and torch.equal(ev, ev2)
    assert not torch.allclose(ek[0], ek2[0])
    assert ek.shape == (2, 1, 7, CFG.action_expert_config.hidden_size)


def test_euler_loop_time_schedule_masking_and_purity():
    seen = []
    const = torch.arange(8, dtype=torch.float32).expand(2, 3, 8)

    def velocity(x, t):
        seen.append(t.clone())
        return const

    noise = torch.randn(2, 3, 8)
    noise_copy = noise.clone()
    mask = action_dim_mask(5, 8)
    x = euler_sample(velocity, noise, 4, mask)
    assert torch.equal(noise, noise_copy)
    assert [float(t[0]) for t in seen] == [0.0, 0.25, 0.5, 0.75]
    assert all(t.shape == (2,) for t in seen)
    torch.testing.assert_close(x[..., :5], noise[..., :5] + const[..., :5])
    assert torch.count_nonzero(x[..., 5:]) == 0
    unmasked = euler_sample(velocity, noise, 1)
    torch.testing.assert_close(unmasked, noise + const)


@torch.no_grad()
def test_sample_actions_masks_padding_and_is_deterministic():
    model = random_model()
    embeds, bias, cross = prefill_inputs(model, prompt_ids(), images())
    out = model.prefill(embeds, bias)
    noise = torch.randn(1, CFG.max_action_horizon, CFG.max_action_dim)
    a1 = model.sample_actions(noise, out.expert_k, out.expert_v, cross, action_dim_mask(6, CFG.max_action_dim))
    a2 = model.sample_actions(noise, out.expert_k, out.expert_v, cross, action_dim_mask(6, CFG.max_action_dim))
    assert a1.dtype == torch.float32 and a1.shape == noise.shape
    assert torch.equal(a1, a2)
    assert torch.count_nonzero(a1[..., 6:]) == 0 and torch.count_nonzero(a1[..., :6]) > 0


def test_flow_training_helpers():
    cfg = get_preset("tiny")
    t = sample_flow_time((4096,), cfg)
    assert float(t.min()) >= cfg.flow_matching_time_offset and float(t.max()) <= 1.0
    noise, actions = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    x0, target = interpolate(noise, actions, torch.zeros(3))
    x1, _ = interpolate(noise, actions, torch.ones(3))
    assert torch.equal(x0, noise) and torch.equal(x1, actions) and torch.equal(target, actions - noise)


@torch.no_grad()
def test_image_features_are_added_at_patch_positions():
    model = random_model()
    ids = prompt_ids()
    feats = model.encode_images(images())
    assert feats.shape == (1, 2 * CFG.tokens_per_image, CFG.text_config.hidden_size)
    positions = masks.image_token_positions(ids, CFG)
    embeds = model.embed(torch.from_numpy(ids), feats, torch.from_numpy(positions))
    plain = model.embed_tokens(torch.from_numpy(ids))
    torch.testing.assert_close(embeds[0, positions[0]], plain[0, positions[0]] + feats[0])
    others = np.setdiff1d(np.arange(ids.shape[1]), positions[0])
    assert torch.equal(embeds[0, others], plain[0, others])


@torch.no_grad()
def test_float_images_are_requantized_like_uint8():
    model = random_model()
    u8 = images()
    as_float = u8.float() / 255 * 2 - 1 + 1e-3  # off-grid by less than half a level
    torch.testing.assert_close(model.encode_images(u8), model.encode_images(as_float))


def test_pooling_windows_match_the_release_layout():
    w = pooling_windows(27, 27)
    assert w.shape == (196, 4)
    assert w[0].tolist() == [0, 1, 27, 28]  # (0,0),(0,1),(1,0),(1,1)
    assert (w[-1] == -1).sum() == 3  # bottom-right corner
    assert (w[13] == -1).sum() == 2  # last column
    assert pooling_windows(8, 8).min() >= 0


def test_masks_prefill_and_cross():
    c = CFG
    ids = np.array([[c.bos_token_id, c.image_start_token_id, c.image_patch_id, c.image_end_token_id, 5,
                     c.action_start_token_id, c.action_token_start_id, c.action_end_token_id, 6, c.eos_token_id]])
    am = np.ones_like(ids)
    am[0, -1] = 0
    bias = masks.prefill_attention_bias(am, masks.token_type_ids(ids, c))[0, 0]
    allowed = bias == 0
    assert allowed[1, 3] and allowed[2, 3]  # image tokens see each other both ways
    assert not allowed[0, 1] and not allowed[4, 5]  # text stays causal
    assert not allowed[:, 9].any()  # padding is never a key
    valid = masks.cross_attention_valid(ids, am, c)[0]
    assert valid.tolist() == [False, True, True, True, True, False, False, False, True, False]
    continuous = dataclasses.replace(c, action_mode="continuous")
    assert masks.cross_attention_valid(ids, am, continuous)[0].sum() == 9
    open_span = np.array([[5, c.action_start_token_id, 6, 7]])
    assert masks.cross_attention_valid(open_span, np.ones_like(open_span), c)[0].tolist() == [True, False, False, False]


def test_release_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = MolmoAct2(get_preset("molmoact2-4b"))
    counts = model.parameter_counts()
    assert counts["total"] == 5_442_196_208
    assert counts["action_expert"] == 577_564_448
    assert len([k for k in model.state_dict() if k.startswith("model.action_expert.")]) == 588
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.transformer.blocks.0.self_attn.att_proj.weight"] == (6144, 2560)
    assert shapes["model.transformer.blocks.35.mlp.ff_proj.weight"] == (19456, 2560)
    assert shapes["model.vision_backbone.image_vit.transformer.resblocks.24.feed_forward.w1.weight"] == (4304, 1152)
    assert "model.vision_backbone.image_vit.transformer.resblocks.25.ffn_norm.weight" not in shapes
    assert shapes["model.vision_backbone.image_pooling_2d.wq.weight"] == (1152, 2304)
    assert shapes["model.action_expert.blocks.0.modulation.linear.weight"] == (6912, 768)
    assert shapes["lm_head.weight"] == (154624, 2560)


def test_presets_sizes_and_seed_determinism():
    assert MolmoAct2.from_config(CFG).parameter_counts()["total"] < 5_000_000
    with torch.device("meta"):
        small = MolmoAct2(get_preset("small")).parameter_counts()["total"]
    assert 15_000_000 <= small <= 30_000_000
    a, b = MolmoAct2.from_config(CFG, seed=3), MolmoAct2.from_config(CFG, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@torch.no_grad()
@pytest.mark.parametrize("variant", ["olmo-qk-norm", "depth-gate-per-layer", "depth-gate-last"])
def test_variants_build_and_run(variant):
    if variant == "olmo-qk-norm":
        cfg = dataclasses.replace(CFG, text_config=dataclasses.replace(CFG.text_config, qk_norm_type="olmo"))
    else:
        cfg = dataclasses.replace(
            CFG, action_expert_depth_gate=True, action_expert_depth_gate_per_layer=variant.endswith("per-layer")
        )
    model = random_model(cfg)
    ids = prompt_ids(cfg)
    ids[0, -2] = cfg.depth_token_start_id
    embeds, bias, cross = prefill_inputs(model, ids, images())
    am = np.ones_like(ids)
    out = model.prefill(
        embeds,
        bias,
        context_valid=torch.from_numpy(masks.cross_attention_valid(ids, am, cfg)),
        depth_mask=torch.from_numpy(masks.depth_token_mask(ids, cfg)),
    )
    assert torch.isfinite(out.expert_k).all() and torch.isfinite(out.logits).all()
    if variant == "olmo-qk-norm":
        assert model.model.transformer.blocks[0].self_attn.q_norm.weight.shape == (cfg.text_config.q_dim,)
    else:
        keys = [k for k in model.state_dict() if k.startswith("model.action_expert_depth_gate")]
        assert len(keys) == (2 * cfg.text_config.num_hidden_layers if variant.endswith("per-layer") else 2)


@torch.no_grad()
def test_depth_gate_scales_only_depth_positions_before_projection():
    cfg = dataclasses.replace(CFG, action_expert_depth_gate=True)
    model = random_model(cfg)
    ids = prompt_ids(cfg)
    ids[0, -2] = cfg.depth_token_start_id
    embeds, bias, _ = prefill_inputs(model, ids, images())
    am = np.ones_like(ids)
    valid = torch.from_numpy(masks.cross_attention_valid(ids, am, cfg))
    depth = torch.from_numpy(masks.depth_token_mask(ids, cfg))
    gate = model.model.action_expert_depth_gate
    gate.bias.fill_(-40.0)  # sigmoid ~ 4e-18: depth tokens all but vanish from the context
    closed = model.prefill(embeds, bias, context_valid=valid, depth_mask=depth)
    gate.bias.fill_(40.0)  # sigmoid == 1.0 in fp32: the gate is a no-op
    opened = model.prefill(embeds, bias, context_valid=valid, depth_mask=depth)
    ungated = model.model.action_expert.project_context(opened.k_cache, opened.v_cache)
    torch.testing.assert_close(opened.expert_k, ungated[0])
    pos = int(np.flatnonzero(depth[0].numpy())[0])
    assert float(closed.expert_v[:, 0, pos].abs().max()) < 1e-6
    others = [i for i in range(ids.shape[1]) if i != pos]
    torch.testing.assert_close(closed.expert_v[:, 0, others], opened.expert_v[:, 0, others])
