"""Host-side prompt masks and positions, numpy only (the device runtime imports this without torch).

Reference §4.2 (token types), §4.8 (prefill bias), §4.9 and §11 A16 (expert cross
mask), §4.6 (image feature positions). These depend on the token ids, so they are
computed on the host and fed to the fixed-shape graphs as tensors.

Additive biases use ``MASK_VALUE`` = finfo(float32).min for blocked pairs (A8); a
runtime that needs fp16-safe values clamps them itself.

Shape legend: b batch, t prompt tokens, L cache length, m image tokens.
"""

from __future__ import annotations

import numpy as np

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.errors import ConfigError

MASK_VALUE = float(np.finfo(np.float32).min)

# Config fields of the tokens whose token_type_id is 1 (image-type, bidirectional at prefill).
IMAGE_TYPE_FIELDS = (
    "image_patch_id",
    "image_col_id",
    "image_start_token_id",
    "low_res_image_start_token_id",
    "frame_start_token_id",
    "image_end_token_id",
    "frame_end_token_id",
    "image_low_res_id",
)


def _bias(allowed: np.ndarray) -> np.ndarray:
    return np.where(allowed, np.float32(0.0), np.float32(MASK_VALUE)).astype(np.float32)


def token_type_ids(input_ids: np.ndarray, config: MolmoAct2Config) -> np.ndarray:
    """(b, t) int64: 1 at image-type special tokens, else 0."""
    ids = [getattr(config, f) for f in IMAGE_TYPE_FIELDS if getattr(config, f) is not None]
    return np.isin(input_ids, np.asarray(ids, dtype=np.int64)).astype(np.int64)


def prefill_attention_bias(attention_mask: np.ndarray, token_types: np.ndarray) -> np.ndarray:
    """(b, 1, t, t) float32: key valid AND (causal OR both query and key image-type) (§4.8)."""
    valid = attention_mask.astype(bool)  # (b, t)
    t = valid.shape[1]
    causal = np.tril(np.ones((t, t), dtype=bool))[None]  # (1, t, t)
    image = token_types.astype(bool)
    both_image = image[:, :, None] & image[:, None, :]  # (b, t, t)
    allowed = valid[:, None, :] & (causal | both_image)
    return _bias(allowed)[:, None]


def decode_attention_bias(cache_valid: np.ndarray) -> np.ndarray:
    """(b, L) bool of cache slots holding a real token (including the one being written) -> (b, 1, 1, L)."""
    return _bias(cache_valid.astype(bool))[:, None, None, :]


def cross_attention_valid(input_ids: np.ndarray, attention_mask: np.ndarray, config: MolmoAct2Config) -> np.ndarray:
    """(b, t) bool: prompt positions the action expert may attend to (§4.9, A16).

    In ``action_mode == "both"`` the eos positions (BOS and the turn's <|im_end|>) and
    every inclusive <action_start>..<action_end> span are dropped; an unmatched start
    masks to the end.
    """
    valid = attention_mask.astype(bool) & (input_ids >= 0)
    if config.action_mode != "both":
        return valid
    eos, start, end = config.require_token_ids("eos_token_id", "action_start_token_id", "action_end_token_id")
    valid = valid & (input_ids != eos)
    is_start = (input_ids == start).astype(np.int64)
    is_end = (input_ids == end).astype(np.int64)
    # inside a span: more starts than ends seen so far (counting this token's start), or this token is an end.
    opened = np.cumsum(is_start, axis=1) - np.cumsum(is_end, axis=1) + is_end
    return valid & ~(opened > 0)


def cross_attention_bias(valid: np.ndarray) -> np.ndarray:
    """(b, t) bool -> (b, 1, 1, t) float32 additive bias for the expert's cross-attention."""
    return _bias(valid.astype(bool))[:, None, None, :]


def image_token_positions(input_ids: np.ndarray, config: MolmoAct2Config, count: int | None = None) -> np.ndarray:
    """(b, m) int64 positions of <im_patch> tokens in sequence order (the order image features are added in).

    ``count`` (default: the number found) is checked: every row must hold exactly m patches.
    """
    (patch,) = config.require_token_ids("image_patch_id")
    rows = [np.flatnonzero(row == patch) for row in input_ids]
    m = len(rows[0]) if count is None else count
    for i, r in enumerate(rows):
        if len(r) != m:
            raise ConfigError(f"prompt row {i} has {len(r)} <im_patch> tokens ({patch}), expected {m}")
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, m), dtype=np.int64)


def depth_token_mask(input_ids: np.ndarray, config: MolmoAct2Config) -> np.ndarray:
    """(b, t) bool at <depth_output>, <depth_start>, <depth_end> and <depth_i> (gated when the depth gate is on)."""
    marks = [config.depth_output_token_id, config.depth_start_token_id, config.depth_end_token_id]
    out = np.isin(input_ids, np.asarray([m for m in marks if m is not None], dtype=np.int64))
    if config.depth_token_start_id is not None and config.num_depth_tokens:
        lo = config.depth_token_start_id
        out |= (input_ids >= lo) & (input_ids < lo + config.num_depth_tokens)
    return out
