"""Speculative depth decoding (``runtimes.depth_decode``) is exactly sequential greedy decoding, in few calls.

Two levels: a fake decoder (a Markov "language model" over hashed contexts, so drafts taken from a
previous decode agree in places and disagree in others) checked with hypothesis on adversarial
change masks and drafts; and the real ``decode_block`` graph of a tiny random Think model, against
K single ``decode_step`` calls in PyTorch and through an exported bundle on onnxruntime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molmoact2_edge.runtimes.depth_decode import (
    MIN_BLOCKS_JUDGED,
    STEPS_PER_BLOCK,
    DepthTokens,
    decode_depth,
    decode_sequential,
    decode_speculative,
    depth_block_length,
)

VOCAB = 64
NUM_CODES = 128  # the tiny preset's depth rows
CELLS = 16  # the exported Think bundle's depth grid (4 x 4)
TAIL = 8  # greedy tokens allowed after the codes: max(8, chunk length 8); a random model rarely emits <depth_end>
IDS = DepthTokens(start=40, end=41, first_code=48, num_codes=16)  # depth rows 48..63


class MarkovDecoder:
    """Greedy targets depend on (position, last token) only: a changed code changes what follows it, but a
    later replayed code re-synchronizes, as in a real model whose drafts partly agree. ``tail`` tokens
    before <depth_end> exercise the greedy tail."""

    def __init__(self, seed: int, num_cells: int, tail: Sequence[int] = (), block_length: int | None = None):
        self.seed, self.n, self.tail = seed, num_cells, list(tail)
        self.fed: list[int] = []
        self.block_length = depth_block_length(num_cells) if block_length is None else block_length
        self.max_block = 0

    def _logits(self) -> np.ndarray:
        pos, last = len(self.fed), self.fed[-1]
        if pos > self.n:  # after the last code: the scripted tail tokens, then <depth_end>
            index = pos - self.n - 1
            target = self.tail[index] if index < len(self.tail) else IDS.end
            logits = np.zeros(VOCAB)
            logits[target] = 1.0
            return logits
        digest = hashlib.sha256(f"{self.seed}:{pos}:{last % 3}".encode()).digest()
        return np.frombuffer(digest * 2, dtype=np.uint8)[:VOCAB].astype(np.float64)

    def step(self, token: int) -> np.ndarray:
        self.fed.append(token)
        return self._logits()

    def block(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        assert 0 < len(tokens) <= self.block_length
        self.max_block = max(self.max_block, len(tokens))
        depth, full = [], []
        for token in tokens:
            logits = self.step(token)
            depth.append(int(np.argmax(logits[IDS.first_code : IDS.first_code + IDS.num_codes])))
            full.append(int(np.argmax(logits)))
        full[: max(0, len(full) - 2)] = [-1] * max(0, len(full) - 2)  # as the graph: only after the last two
        return np.array(depth), np.array(full)

    def drop(self, count: int) -> None:
        assert 0 < count <= len(self.fed)
        del self.fed[-count:]


def _sequential(seed, n, previous, changed, tail=()):
    dec = MarkovDecoder(seed, n, tail)
    return decode_sequential(dec, IDS, previous, changed, tail_budget=8), dec.fed


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 30),
    data=st.data(),
)
def test_speculative_equals_sequential_on_adversarial_masks_and_drafts(seed: int, n: int, data) -> None:
    changed = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    # drafts: last frame's codes (a sequential decode of the same model), some perturbed
    truth, _ = _sequential(seed, n, None, np.ones(n, dtype=bool))
    flips = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    previous = np.where(flips, (truth.codes + 1) % IDS.num_codes, truth.codes)
    tail = data.draw(st.lists(st.integers(0, 39), max_size=10))

    expected, fed_seq = _sequential(seed, n, previous, changed, tail)
    dec = MarkovDecoder(seed, n, tail)
    redraft = data.draw(st.booleans())
    got = decode_speculative(dec, IDS, previous, changed, tail_budget=8, redraft=redraft)

    assert got.tokens == expected.tokens and np.array_equal(got.codes, expected.codes)
    assert dec.fed == fed_seq  # the decoder ends in the same state (same cache), nothing stale kept
    assert got.stats.cells_repredicted == int(changed.sum())
    tail_fed = min(len(tail), 8) + (
        1 if len(tail) < 8 else 0
    )  # the tail tokens, then <depth_end> within budget
    stepped = got.stats.stepped_from
    if stepped is not None:  # poor drafts: after a few block calls that advanced little, the rest was stepped
        assert got.stats.block_calls >= MIN_BLOCKS_JUDGED and stepped < STEPS_PER_BLOCK * got.stats.block_calls
        assert got.stats.step_calls == n + 1 - stepped + (tail_fed if tail else 1)  # <depth_end> is stepped too
        return
    cells_changed_code = int(np.sum(changed & (got.codes != previous)))
    if not redraft:  # cached drafts: every changed cell whose code changed is one rejection
        assert got.stats.drafts_rejected == cells_changed_code + (1 if tail else 0)  # <depth_end> rejected once
    assert got.stats.block_calls <= 1 + got.stats.drafts_rejected
    assert got.stats.step_calls == (tail_fed if tail else 0)


def test_all_drafts_right_is_one_block_call() -> None:
    n = 100
    truth, _ = _sequential(3, n, None, np.ones(n, dtype=bool))
    dec = MarkovDecoder(3, n)
    got = decode_speculative(dec, IDS, truth.codes, np.ones(n, dtype=bool), tail_budget=8)
    assert np.array_equal(got.codes, truth.codes)
    assert (got.stats.block_calls, got.stats.drafts_rejected, got.stats.graph_calls) == (1, 0, 1)
    assert dec.max_block == depth_block_length(n)


def test_poor_drafts_hand_the_frame_to_steps() -> None:
    """Every cell changed and every draft wrong (a first frame drafted from another scene): after
    MIN_BLOCKS_JUDGED block calls that advanced little, the rest is stepped; the tokens are still exact and the
    frame costs those block calls plus at most the sequential steps."""
    n = 60
    truth, fed = _sequential(4, n, None, np.ones(n, dtype=bool))
    wrong = (truth.codes + 1) % IDS.num_codes
    dec = MarkovDecoder(4, n)
    got = decode_speculative(dec, IDS, wrong, np.ones(n, dtype=bool), tail_budget=8, redraft=False)
    assert got.tokens == truth.tokens and dec.fed == fed
    assert got.stats.block_calls == MIN_BLOCKS_JUDGED and got.stats.stepped_from is not None
    assert got.stats.step_calls == len(truth.tokens) - got.stats.stepped_from  # every token from there, once
    assert got.stats.graph_calls <= MIN_BLOCKS_JUDGED + truth.stats.graph_calls


def test_first_frame_decodes_sequentially() -> None:
    n = 9
    first = decode_depth(MarkovDecoder(1, n), IDS, None, np.ones(n, dtype=bool), tail_budget=8)
    assert first.stats.block_calls == 0 and first.stats.step_calls == 1 + n + 1


def test_blockless_bundles_decode_sequentially() -> None:
    n = 9
    changed = np.ones(n, dtype=bool)
    first = decode_depth(MarkovDecoder(1, n, block_length=0), IDS, None, changed, tail_budget=8)
    assert first.stats.block_calls == 0 and first.stats.step_calls == 1 + n + 1
    old = MarkovDecoder(1, n, block_length=0)  # a bundle exported before decode_block existed
    again = decode_depth(old, IDS, first.codes, changed, tail_budget=8)
    assert again.stats.block_calls == 0 and np.array_equal(again.codes, first.codes)


def test_small_blocks_still_exact() -> None:
    """A block shorter than the frame (k < N + 2) takes more calls but gives the same tokens."""
    n = 20
    truth, _ = _sequential(5, n, None, np.ones(n, dtype=bool))
    previous = truth.codes.copy()
    previous[[3, 11]] += 1
    changed = np.zeros(n, dtype=bool)
    changed[[2, 3, 11, 15]] = True
    expected, _ = _sequential(5, n, previous % IDS.num_codes, changed)
    got = decode_speculative(MarkovDecoder(5, n, block_length=6), IDS, previous % IDS.num_codes, changed, 8)
    assert got.tokens == expected.tokens


# --- the real graph ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_decode_block_graph_matches_single_steps() -> None:
    """decode_block over k tokens (3 real + padding) = 3 decode_step calls: argmaxes, last logits, cache, context;
    padding gets no full-vocabulary argmax."""
    from molmoact2_edge.config import get_preset
    from molmoact2_edge.export.graphs import DecodeBlockGraph, DecodeStepGraph
    from molmoact2_edge.model.molmoact2 import MolmoAct2
    from molmoact2_edge.runtimes.bundle import MASK_VALUE

    config = get_preset("tiny").with_changes(enable_depth_reasoning=True, num_depth_codes=4)
    model = MolmoAct2.from_config(config, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tc = config.text_config
    k, tm, prompt = 6, 24, 5
    gen = torch.Generator().manual_seed(0)
    shape = (tc.num_hidden_layers, 1, tc.num_key_value_heads, tm, tc.head_dim)
    cache_k, cache_v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    cache_k[:, :, :, prompt:] = 0
    cache_v[:, :, :, prompt:] = 0
    first = config.depth_token_start_id
    tokens = [config.depth_start_token_id, first + 3, first + 7]
    step, block = DecodeStepGraph(model), DecodeBlockGraph(model)

    def bias(allowed: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(allowed, 0.0, MASK_VALUE).astype(np.float32))

    with torch.no_grad():
        ks, vs, steps = cache_k, cache_v, []
        for i, token in enumerate(tokens):
            allowed = np.zeros(tm, dtype=bool)
            allowed[: prompt + i + 1] = True
            out = step(
                torch.tensor([[token]]), torch.tensor([prompt + i]), ks, vs, bias(allowed)[None, None, None]
            )
            ks, vs = out[1], out[2]
            steps.append(out)
        allowed = np.zeros((k, tm), dtype=bool)
        allowed[:, :prompt] = True
        allowed[:, prompt : prompt + k] |= np.tril(np.ones((k, k), dtype=bool))
        ids = torch.tensor([tokens + [0] * (k - len(tokens))])
        depth_am, token_am, last, bk, bv, ctx_k, ctx_v = block(
            ids,
            torch.arange(prompt, prompt + k)[None],
            cache_k,
            cache_v,
            bias(allowed)[None, None],
            torch.tensor([2]),
        )
    n = len(tokens)
    assert (token_am[0, n:] == -1).all()
    for i, out in enumerate(steps):
        logits = out[0][0]
        assert int(depth_am[0, i]) == int(torch.argmax(logits[first : first + config.num_depth_tokens]))
        # the whole vocabulary only after the last two real tokens (last_index 2 -> 1 and 2)
        assert int(token_am[0, i]) == (int(torch.argmax(logits)) if i >= n - 2 else -1)
        torch.testing.assert_close(ctx_k[:, :, i], out[3][:, :, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ctx_v[:, :, i], out[4][:, :, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last[0], steps[-1][0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bk[:, :, :, : prompt + n], ks[:, :, :, : prompt + n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bv[:, :, :, : prompt + n], vs[:, :, :, : prompt + n], rtol=1e-4, atol=1e-5)


# --- through an exported Think bundle -----------------------------------------------------------


@pytest.fixture(scope="module")
def think_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Think checkpoint with a 4 x 4 depth grid and the expert's per-layer depth gate, exported
    (fp32, the parity gate included)."""
    from molmoact2_edge.export.pipeline import ExportOptions, export_bundle
    from tests.test_export import CAMERAS, write_checkpoint

    root = tmp_path_factory.mktemp("think")
    ckpt = write_checkpoint(root / "ckpt", flow_matching_num_steps=1, enable_depth_reasoning=True, num_depth_codes=CELLS,
        action_expert_depth_gate=True, action_expert_depth_gate_per_layer=True,
    )  # fmt: skip
    torch.set_num_threads(1)
    manifest = export_bundle(ckpt, root / "bundle", ExportOptions(cameras=CAMERAS, parity_observations=1))
    return ckpt, root / "bundle", manifest


def _sessions(bundle):
    from molmoact2_edge.runtimes.session import PolicySession

    spec = PolicySession(bundle, "onnxruntime", providers=("CPUExecutionProvider",))
    seq = PolicySession(bundle, "onnxruntime", providers=("CPUExecutionProvider",))
    seq.speculative_depth = False
    return spec, seq


def test_think_export_has_the_block_graph_and_a_depth_parity_gate(think_bundle) -> None:
    from molmoact2_edge.export import opset_check

    _, bundle, manifest = think_bundle
    for graph in ("decode_block", "expert_context"):  # TensorRT 10.3 parser allow-list, as export ran it
        assert opset_check.check_file(str(bundle / f"{graph}.onnx"))
    model, parity = manifest["model"], manifest["parity"]
    assert model["block_length"] == CELLS + 2 and {"decode_block", "expert_context"} <= set(
        manifest["artifacts"]
    )
    assert model["cache_length"] == model["context_length"] + model["block_length"]  # k scratch slots
    assert parity["passed"] and parity["graphs"]["decode_block"]["passed"], parity
    assert parity["graphs"]["expert_context"]["passed"], parity  # the depth gate, per layer
    depth = parity["depth_codes"]
    assert depth["passed"] and depth["mismatched_cells"] == 0
    first, speculative = depth["graph_calls"]
    assert 1 + CELLS + 1 <= first <= 1 + CELLS + TAIL  # the first frame: sequential decode_step calls
    # drafts 0 and 10 wrong (stride 10), then the greedy tail; redrafting after a rejection can cost calls on a
    # random model (its next code hinges on the previous token), never more than one per token
    assert 1 + 2 <= speculative <= 1 + CELLS + 1 + TAIL


def test_think_bundle_matches_the_reference_and_replays_an_unchanged_frame(think_bundle) -> None:
    """(Was test_export's Think test.) The device chunk matches the PyTorch policy; an unchanged frame replays
    every code in one block call and gives the same chunk."""
    from molmoact2_edge.export.calibration import synthetic_observations
    from molmoact2_edge.model.policy import Policy
    from tests.test_export import CAMERAS

    ckpt, bundle, manifest = think_bundle
    policy = Policy.from_checkpoint(ckpt, camera_order=list(CAMERAS), bucket=manifest["prompt"]["bucket"])
    obs = synthetic_observations(CAMERAS, policy.meta, 1, seed=2)[0]
    spec, _ = _sessions(bundle)
    with spec:
        first = spec.act(obs, seed=0)
        assert first.info["depth_cells_repredicted"] == CELLS and first.timings["depth"] > 0
        np.testing.assert_allclose(first.actions, policy.act(obs, seed=0).actions, atol=1e-3)
        assert np.array_equal(spec.depth_cache.codes(CAMERAS[0]), policy.depth_cache.codes(CAMERAS[0]))
        again = spec.act(obs, seed=0)
        # every code replayed: one block call (plus the greedy tail step by step, if <depth_end> does not follow)
        assert again.info["depth_cells_repredicted"] == 0 and again.info["depth_block_calls"] == 1
        assert again.info["depth_drafts_rejected"] <= 1 and again.info["depth_graph_calls"] <= 1 + TAIL
        np.testing.assert_allclose(again.actions, first.actions, atol=1e-4)


def test_bundle_codes_equal_sequential_on_frames_and_adversarial_masks(think_bundle, monkeypatch) -> None:
    """A moving scene (the sim's camera under the scripted expert), then forced change masks with drafts that
    partly agree: the speculative session's codes and chunks equal the sequential session's every frame."""
    from molmoact2_edge.sim.env import SimEnv
    from molmoact2_edge.sim.scene import RenderConfig

    _, bundle, _ = think_bundle
    spec, seq = _sessions(bundle)
    camera = spec.camera_order[0]
    infos = []
    with spec, seq, SimEnv("lift", seed=0, render=RenderConfig(width=96, height=96)) as env:
        obs = env.reset(seed=0)
        for step in range(4):
            a, b = spec.act(obs, seed=step), seq.act(obs, seed=step)
            assert np.array_equal(spec.depth_cache.codes(camera), seq.depth_cache.codes(camera)), step
            # block vs step: the same tokens, K/V equal up to fp noise
            np.testing.assert_allclose(a.actions, b.actions, rtol=1e-5, atol=1e-4)
            assert a.info["depth_cells_repredicted"] == b.info["depth_cells_repredicted"]
            infos.append((a.info, b.info))
            for _ in range(3):
                obs, _, _ = env.step(env.expert_action())
        first_fast, first_slow = infos[0]  # no drafts yet: both sequential
        assert first_fast["depth_graph_calls"] == first_slow["depth_graph_calls"] >= 1 + CELLS + 1
        for fast, slow in infos[1:]:
            assert fast["depth_block_calls"] <= 1 + fast["depth_drafts_rejected"]
            steps = fast["depth_graph_calls"] - fast["depth_block_calls"]
            # steps: a greedy tail, and the rest of a frame whose drafts proved poor (after a few block calls)
            assert steps <= TAIL or fast["depth_block_calls"] >= MIN_BLOCKS_JUDGED
            assert fast["depth_graph_calls"] <= fast["depth_block_calls"] + slow["depth_graph_calls"]
            assert (
                fast["depth_drafts_rejected"] <= fast["depth_cells_repredicted"] + 1
            )  # + the <depth_end> draft
            assert slow["depth_graph_calls"] >= 1 + CELLS + 1
        # a new episode: every cell re-predicted, drafted from the last frame's codes, still exact
        spec.reset()
        seq.reset()
        a, b = spec.act(obs, seed=9), seq.act(obs, seed=9)
        assert np.array_equal(spec.depth_cache.codes(camera), seq.depth_cache.codes(camera))
        assert a.info["depth_cells_repredicted"] == CELLS and a.info["depth_block_calls"] >= 1
        np.testing.assert_allclose(a.actions, b.actions, rtol=1e-5, atol=1e-4)

        rng = np.random.default_rng(0)
        truth = spec.depth_cache.codes(camera)
        for trial in range(6):
            changed = rng.random(CELLS) < [0.0, 1.0, 0.5, 0.3, 0.5, 0.7][trial]
            drafts = np.where(rng.random(CELLS) < 0.3, (truth + 1 + trial) % NUM_CODES, truth)
            for session in (spec, seq):
                cells = session.depth_cache.plan(camera, obs.images[camera])[0]
                plan = (cells, drafts.copy(), changed.copy())
                monkeypatch.setattr(session.depth_cache, "plan", lambda *_, p=plan: p)
            a, b = spec.act(obs, seed=0), seq.act(obs, seed=0)
            assert np.array_equal(spec.depth_cache.codes(camera), seq.depth_cache.codes(camera)), trial
            # block vs step: the same tokens, K/V equal up to fp noise
            np.testing.assert_allclose(a.actions, b.actions, rtol=1e-5, atol=1e-4)
            # each predicted position is rejected at most once (then it holds the exact prediction); redrafting
            # may turn a wrong cached draft into the right one, so fewer can be rejected than codes changed
            assert a.info["depth_drafts_rejected"] <= int(changed.sum()) + 1
            assert a.info["depth_block_calls"] <= 1 + a.info["depth_drafts_rejected"]
            assert b.info["depth_graph_calls"] >= 1 + CELLS + 1


def test_bench_json_reports_the_depth_stage_with_and_without_the_cache(think_bundle) -> None:
    import json

    from click.testing import CliRunner

    from molmoact2_edge.cli import main as cli_main

    _, bundle, _ = think_bundle
    args = [
        "bench",
        str(bundle),
        "--backend",
        "onnxruntime",
        "--iterations",
        "1",
        "--loop-seconds",
        "0.5",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(cli_main.cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    depth = json.loads(result.stdout)["depth"]  # stdout only: logs go to stderr
    # without the cache every cell is predicted, one call per token
    assert depth["graph_calls_per_frame_uncached"] >= 1 + CELLS + 1
    assert 1 <= depth["block_calls_per_frame"] <= 1 + depth["drafts_rejected_mean"] + 1e-9
    assert depth["graph_calls_per_frame"] <= depth["block_calls_per_frame"] + TAIL  # + a greedy tail
    assert depth["graph_calls_per_frame"] < depth["graph_calls_per_frame_uncached"]
    assert 0 < depth["cells_repredicted_mean"] < CELLS  # the sliding block changes some cells, not all
    assert depth["stage_ms_p50"] > 0 and depth["stage_ms_p50_uncached"] > 0
    text = CliRunner().invoke(cli_main.cli, args)
    assert text.exit_code == 0 and "graph calls per frame" in text.output, text.output


def test_redrafting_turns_stale_drafts_into_one_extra_call() -> None:
    """A model whose next code does not depend on the previous one, every changed cell's cached code wrong:
    with the cache alone every changed cell is a rejection; redrafted from the first rejected call's own
    predictions, the frame takes two calls."""

    class Independent(MarkovDecoder):
        def _logits(self) -> np.ndarray:
            pos = len(self.fed)
            logits = np.zeros(VOCAB)
            logits[IDS.end if pos > self.n else IDS.first_code + (pos * 7 + 3) % IDS.num_codes] = 1.0
            return logits

    n = 40
    truth = np.array([(p * 7 + 3) % IDS.num_codes for p in range(1, n + 1)])
    changed = np.zeros(n, dtype=bool)
    changed[::4] = True
    previous = np.where(changed, (truth + 1) % IDS.num_codes, truth)  # the scene changed where the cache is stale
    stale = decode_speculative(Independent(0, n), IDS, previous, changed, tail_budget=8, redraft=False)
    fresh = decode_speculative(Independent(0, n), IDS, previous, changed, tail_budget=8)
    assert np.array_equal(stale.codes, truth) and np.array_equal(fresh.codes, truth)
    # stale: one block call per changed cell (each still advances 4 tokens, so stepping does not take over)
    assert stale.stats.block_calls == 1 + int(changed.sum()) and stale.stats.stepped_from is None
    assert fresh.stats.block_calls == 2 and fresh.stats.stepped_from is None
