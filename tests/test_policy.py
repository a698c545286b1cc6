"""Reference policy on the tiny preset: shapes, seeds, bucket invariance, depth cache, discrete decode, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molmoact2_edge.checkpoint import save_checkpoint
from molmoact2_edge.config import get_preset
from molmoact2_edge.depth_cache import DepthCache
from molmoact2_edge.errors import ObservationError, PromptTooLongError, TokenizerError
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.model.policy import Policy
from molmoact2_edge.normalization import NormStats
from molmoact2_edge.preprocess import cells_changed, depth_cell_vectors
from molmoact2_edge.tokenizers.openfast import ACTION_TOKENIZER_DIR, OpenFASTTokenizer
from molmoact2_edge.tokenizers.text import train_small_tokenizer
from molmoact2_edge.types import STAGES, Observation, flow_noise

TASK = "pick up the red cube"
CORPUS = [
    "The task is to pick up the red cube. The setup is so101 arm. The current state of the robot is"
] * 20


@pytest.fixture(autouse=True)
def _one_thread():
    """The shared 2-core machine: one torch thread is several times faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(config, seed: int = 0) -> MolmoAct2:
    """Init, then perturb every weight so the adaLN-Zero expert and the gates are not trivially zero."""
    model = MolmoAct2.from_config(config, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return train_small_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def norm() -> NormStats:
    rng = np.random.default_rng(0)
    return NormStats.compute(
        "so101",
        rng.normal(size=(200, 6)) * 30,
        rng.normal(size=(200, 6)) * 30,
        setup_type="so101 arm",
        control_mode="absolute joint pose",
        action_horizon=8,
        n_action_steps=6,
    )


def observation(seed: int = 0, cameras=("front", "wrist")) -> Observation:
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for name in cameras}
    return Observation(images=images, state=rng.normal(size=6).astype(np.float32) * 20, task=TASK)


def test_continuous_shapes_seeds_and_timings(tokenizer, norm) -> None:
    config = get_preset("tiny")
    policy = Policy(random_model(config), config, tokenizer, norm)
    obs = observation()
    chunk = policy.act(obs, seed=3)
    assert chunk.actions.shape == (6, 6) and chunk.actions.dtype == np.float32  # n_action_steps x action_dim
    assert set(chunk.timings) == set(STAGES) and chunk.timings["total"] >= chunk.timings["flow"] > 0
    assert chunk.timestamp == obs.timestamp and chunk.info["prompt_tokens"] > 2 * config.tokens_per_image
    np.testing.assert_array_equal(policy.act(obs, seed=3).actions, chunk.actions)
    assert np.abs(policy.act(obs, seed=4).actions - chunk.actions).max() > 1e-3
    explicit = policy.act(obs, noise=flow_noise(3, (8, config.max_action_dim)))
    np.testing.assert_array_equal(explicit.actions, chunk.actions)
    with pytest.raises(ObservationError, match="wrist"):
        policy.act(observation(cameras=("front",)), seed=0)
    with pytest.raises(ObservationError, match="noise"):
        policy.act(obs, noise=np.zeros((3, 3), np.float32))


def test_bucket_padding_does_not_change_actions(tokenizer, norm) -> None:
    """Right-padding to a fixed bucket (export's shapes) leaves valid-token math unchanged."""
    config = get_preset("tiny")
    model = random_model(config)
    obs = observation(1)
    plain = Policy(model, config, tokenizer, norm).act(obs, seed=0)
    padded = Policy(model, config, tokenizer, norm, bucket=300).act(obs, seed=0)
    np.testing.assert_allclose(padded.actions, plain.actions, atol=1e-4)
    with pytest.raises(PromptTooLongError):
        Policy(model, config, tokenizer, norm, bucket=64).act(obs, seed=0)


def test_depth_cache_replays_unchanged_cells(tokenizer, norm) -> None:
    """Identical frame -> 0 cells re-predicted and (replays fed as one chunk) the same chunk as predicting
    them one by one; a changed patch -> exactly the cells whose pixels changed are re-predicted."""
    config = get_preset("tiny").with_changes(enable_depth_reasoning=True)
    policy = Policy(random_model(config, seed=1), config, tokenizer, norm, camera_order=["front"])
    obs = observation(2, cameras=("front",))
    first = policy.act(obs, seed=0)
    assert first.info["depth_cells_repredicted"] == 100 and first.timings["depth"] > 0
    again = policy.act(obs, seed=0)
    assert again.info["depth_cells_repredicted"] == 0
    np.testing.assert_allclose(again.actions, first.actions, atol=1e-4)
    moved = obs.images["front"].copy()
    moved[:10, :12] = 255 - moved[:10, :12]  # top-left corner of the frame
    expected = cells_changed(depth_cell_vectors(obs.images["front"]), depth_cell_vectors(moved))
    third = policy.act(Observation(images={"front": moved}, state=obs.state, task=TASK), seed=0)
    assert third.info["depth_cells_repredicted"] == expected.sum() and 0 < expected.sum() < 20
    policy.reset()
    assert policy.act(obs, seed=0).info["depth_cells_repredicted"] == 100


def test_depth_cache_keeps_the_last_codes_as_drafts_across_a_reset() -> None:
    """After a reset every cell is re-predicted, but the camera's last codes come back as drafts (the next
    episode's scene is usually the same one); another camera, or a disabled cache, gets none."""
    cache = DepthCache()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    cells, previous, changed = cache.plan("front", image)
    assert previous is None and changed.all()
    codes = np.arange(cache.num_cells) % 128
    cache.update("front", cells, codes, changed)
    cache.reset()
    _, drafts, changed = cache.plan("front", image)
    assert changed.all() and drafts is not None and np.array_equal(drafts, codes)
    assert cache.plan("wrist", image)[1] is None
    cache.enabled = False
    assert cache.plan("front", image)[1] is None


def fast_tokenizer(horizon: int = 8, dim: int = 6) -> OpenFASTTokenizer:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, horizon)[:, None]
    chunks = [
        np.clip(rng.uniform(-0.8, 0.8, dim) * np.sin(2 * t + rng.uniform(0, 3, dim)), -1, 1)
        for _ in range(300)
    ]
    return OpenFASTTokenizer.train(chunks, vocab_size=400)


def chained_model(config, chain: list[int]) -> MolmoAct2:
    """A model whose greedy decoding walks ``chain`` (token i -> token i+1): every block's output
    projection is zero, so the hidden state at a position is ln_f of that token's embedding; chain tokens
    get orthonormal embeddings and lm_head maps each to its successor."""
    model = random_model(config)
    e = config.text_config.hidden_size
    assert len(chain) - 1 <= e
    with torch.no_grad():
        for block in model.model.transformer.blocks:
            block.self_attn.attn_out.weight.zero_()
            block.mlp.ff_out.weight.zero_()
        model.lm_head.weight.mul_(0.01)
        for i, (tok, nxt) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
            model.model.transformer.wte.embedding[tok] = torch.eye(e)[i]
            model.lm_head.weight[nxt] = torch.eye(e)[i] * 10
    return model


def test_discrete_mode_decodes_the_action_span(tokenizer, norm) -> None:
    config = get_preset("tiny")
    fast = fast_tokenizer()
    rng = np.random.default_rng(5)
    t = np.linspace(0, 1, 8)[:, None]
    for _ in range(200):  # a chunk whose BPE ids are all distinct, so the chain is a function
        target = np.clip(rng.uniform(-0.8, 0.8, 6) * np.sin(2 * t + rng.uniform(0, 3, 6)), -1, 1).astype(
            np.float32
        )
        bpe = fast.encode(target)
        if len(set(bpe)) == len(bpe):
            break
    llm = [config.action_token_start_id + b for b in bpe]
    chain = [
        config.action_output_token_id,
        config.action_start_token_id,
        *llm,
        config.action_end_token_id,
        config.eos_token_id,
    ]
    policy = Policy(chained_model(config, chain), config, tokenizer, norm, mode="discrete", fast=fast)
    chunk = policy.act(observation(3))
    assert chunk.info["decode_ok"] is True and chunk.timings["decode"] > 0 and chunk.timings["flow"] == 0
    decoded, ok = fast.decode(bpe, 8, 6)
    np.testing.assert_allclose(chunk.actions, norm.unnormalize_action(decoded[:6]), atol=1e-4)
    # An untrained model emits no action span: zeros (un-normalized) and the flag.
    broken = Policy(random_model(config), config, tokenizer, norm, mode="discrete", fast=fast).act(
        observation(3)
    )
    assert broken.info["decode_ok"] is False
    np.testing.assert_allclose(broken.actions, norm.unnormalize_action(np.zeros((6, 6), np.float32)))
    with pytest.raises(TokenizerError, match="OpenFAST"):
        Policy(random_model(config), config, tokenizer, norm, mode="discrete")


def test_from_checkpoint_matches_in_memory(tokenizer, norm, tmp_path) -> None:
    config = get_preset("tiny")
    model = random_model(config, seed=2)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizer.save(tok_dir / "tokenizer.json")
    fast_tokenizer().save(tmp_path / ACTION_TOKENIZER_DIR)
    ckpt = save_checkpoint(
        model,
        config,
        tmp_path / "ckpt",
        norm_stats=norm,
        extra_files=[tok_dir / "tokenizer.json", tmp_path / ACTION_TOKENIZER_DIR],
    )
    loaded = Policy.from_checkpoint(ckpt)
    assert loaded.fast is not None and loaded.mode == "continuous"
    obs = observation(4)
    np.testing.assert_allclose(
        loaded.act(obs, seed=9).actions,
        Policy(model, config, tokenizer, norm).act(obs, seed=9).actions,
        atol=1e-5,
    )


def test_stage_methods_and_depth_gate(tokenizer, norm) -> None:
    """The stages export reuses, run one by one; with the depth gate only depth-token slots are scaled."""
    config = get_preset("tiny").with_changes(
        enable_depth_reasoning=True, action_expert_depth_gate=True, action_expert_depth_gate_per_layer=True
    )
    policy = Policy(random_model(config, seed=3), config, tokenizer, norm, camera_order=["front"], bucket=256)
    obs = observation(6, cameras=("front",))
    features = policy.encode_images(policy.camera_crops(obs, ["front"]))
    assert features.shape == (1, config.tokens_per_image, config.text_config.hidden_size)
    prompt = policy.build_prompt(obs, 1)
    assert (
        len(prompt.input_ids) == 256
        and prompt.input_ids[prompt.num_valid - 1] == config.action_output_token_id
    )
    state, _, _ = policy.prefill(prompt, features)
    assert policy.decode_depth(state, obs.images["front"], "front") == 100
    assert state.ids[prompt.num_valid] == config.depth_start_token_id
    gated_k, gated_v = policy.expert_context(state)
    raw_k, raw_v = policy.model.model.action_expert.project_context(state.k_cache, state.v_cache)
    depth = torch.from_numpy(
        (state.ids >= config.depth_output_token_id) & (state.ids < config.depth_token_start_id + 128)
    )
    torch.testing.assert_close(gated_k[:, :, ~depth], raw_k[:, :, ~depth])
    ratio = gated_v[:, 0, depth].norm(dim=-1) / raw_v[:, 0, depth].norm(dim=-1)
    assert bool(((ratio > 0) & (ratio < 1)).all())  # sigmoid gate strictly inside (0, 1)
    actions = policy.postprocess(policy.sample_flow(state, None, None, prompt, seed=0, noise=None))
    assert actions.shape == (6, 6) and np.isfinite(actions).all()
