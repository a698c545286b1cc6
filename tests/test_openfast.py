"""OpenFAST action tokenizer: DCT goldens, round-trip bound, shape rule, released file round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmoact2_edge.errors import TokenizerError
from molmoact2_edge.tokenizers.openfast import (
    OpenFASTTokenizer,
    action_span,
    dct_matrix,
    dequantize,
    fast_to_llm_ids,
    llm_to_fast_ids,
    quantize,
    roundtrip_error_bound,
)


def smooth_chunks(n: int, horizon: int = 30, dim: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Sums of three random sinusoids per dimension, clipped to [-1, 1] (normalized action space)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, horizon)[:, None, None]
    amp = rng.uniform(-0.5, 0.5, (n, 1, 3, dim))
    freq = rng.uniform(0.3, 2.0, (n, 1, 3, dim))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, 3, dim))
    x = (amp * np.sin(2 * np.pi * freq * t[None] + phase)).sum(axis=2)  # (n, ah, ad)
    return list(np.clip(x, -1.0, 1.0).astype(np.float32))


@pytest.fixture(scope="module")
def tok() -> OpenFASTTokenizer:
    return OpenFASTTokenizer.train(smooth_chunks(2000), vocab_size=2048, scale=10.0)


def test_dct_matches_scipy_ortho_golden() -> None:
    # scipy.fft.dct([1, 2, 3, 4], norm="ortho") = [5, -2.2304425, 0, -0.15851267]
    np.testing.assert_allclose(
        dct_matrix(4) @ np.array([1.0, 2, 3, 4]), [5.0, -2.2304425, 0.0, -0.15851267], atol=1e-7
    )
    c = dct_matrix(30)
    np.testing.assert_allclose(c @ c.T, np.eye(30), atol=1e-12)


def test_error_bound_golden() -> None:
    """Reference §7.1: (0.5/scale) * max column L1 norm of the DCT matrix = 0.2492 for T=30, scale 10."""
    assert roundtrip_error_bound(30, 10.0) == pytest.approx(0.2492, abs=1e-4)


def test_training_fills_vocab_and_is_deterministic(tok: OpenFASTTokenizer) -> None:
    """Reference §7.1: 2000 chunks of 30x6 at scale 10 fill a 2048 vocabulary."""
    assert tok.vocab_size == 2048
    again = OpenFASTTokenizer.train(smooth_chunks(2000), vocab_size=2048, scale=10.0)
    assert again.bpe.to_str() == tok.bpe.to_str() and again.min_token == tok.min_token
    assert (tok.time_horizon, tok.action_dim) == (30, 6)


def test_encode_is_frequency_major_with_min_token_shift(tok: OpenFASTTokenizer) -> None:
    chunk = smooth_chunks(1, seed=5)[0]
    text = tok.chunk_to_text(chunk)
    q = quantize(chunk, 10.0)
    assert [ord(ch) + tok.min_token for ch in text] == q.reshape(
        -1
    ).tolist()  # t0d0, t0d1, ... of the DCT rows
    assert tok.bpe.decode(tok.encode(chunk)) == text


def test_roundtrip_within_quantization_bound(tok: OpenFASTTokenizer) -> None:
    """Per element |decode(encode(x)) - x| <= (0.5/scale) * max_n ||C[:, n]||_1 (0.2492 here) when nothing is
    clamped; per dimension the L2 error is <= sqrt(T) / (2 scale)."""
    bound = roundtrip_error_bound(30, 10.0)
    for chunk in smooth_chunks(100, seed=1):
        out, ok = tok.decode(tok.encode(chunk))
        assert ok and out.shape == (30, 6) and out.dtype == np.float32
        assert np.abs(out - chunk).max() <= bound + 1e-6
        assert np.linalg.norm(out - chunk, axis=0).max() <= np.sqrt(30) / 20 + 1e-6
        np.testing.assert_allclose(out, dequantize(quantize(chunk, 10.0), 10.0), atol=1e-6)


def test_compression(tok: OpenFASTTokenizer) -> None:
    lengths = [len(tok.encode(c)) for c in smooth_chunks(50, seed=2)]
    assert np.mean(lengths) < 30 * 6 / 4  # BPE merges runs of coefficients: well under one id per 4 values


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    horizon=st.integers(2, 30),
    dim=st.integers(1, 8),
    scale=st.sampled_from([5.0, 10.0, 20.0]),
)
def test_property_roundtrip_any_smooth_chunk(
    tok: OpenFASTTokenizer, seed: int, horizon: int, dim: int, scale: float
) -> None:
    """Any (T, D) smooth chunk round-trips within (0.5/scale) * max column L1 of the T-point DCT, even with
    a tokenizer trained on other shapes (the byte alphabet keeps every coefficient encodable)."""
    chunk = smooth_chunks(1, horizon, dim, seed)[0]
    fast = OpenFASTTokenizer(bpe=tok.bpe, scale=scale, min_token=int(quantize(chunk, scale).min()))
    out, ok = fast.decode(fast.encode(chunk), horizon, dim)
    assert ok
    assert np.abs(out - chunk).max() <= roundtrip_error_bound(horizon, scale) + 1e-6


def test_shape_rule_failure_gives_zeros_and_flag(tok: OpenFASTTokenizer) -> None:
    ids = tok.encode(smooth_chunks(1, seed=3)[0])
    for bad in (ids[:-1], ids + ids, [], [tok.vocab_size + 5] + ids, [-1] + ids):
        out, ok = tok.decode(bad, 30, 6)
        assert not ok and out.shape == (30, 6) and not out.any()
    # The element count cannot tell (30, 6) from (20, 9), so decode never guesses (T, D) (reference §7.1).
    with pytest.raises(TokenizerError, match="time_horizon and action_dim"):
        OpenFASTTokenizer(bpe=tok.bpe).decode(ids)


def test_processor_files_roundtrip(tok: OpenFASTTokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["vocab_size"] == 2048 and cfg["scale"] == 10.0 and cfg["min_token"] == tok.min_token
    assert "AutoProcessor" in cfg["auto_map"]
    loaded = OpenFASTTokenizer.load(tmp_path)
    chunk = smooth_chunks(1, seed=4)[0]
    assert loaded.encode(chunk) == tok.encode(chunk)
    np.testing.assert_array_equal(loaded.decode(tok.encode(chunk))[0], tok.decode(tok.encode(chunk))[0])
    cfg["vocab_size"] = 1024
    (tmp_path / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="vocab_size 1024"):
        OpenFASTTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="missing"):
        OpenFASTTokenizer.load(tmp_path / "nowhere")


def test_llm_id_mapping_and_action_span() -> None:
    start, n = 151934, 2048  # <action_0> in the release (reference §6)
    assert fast_to_llm_ids([0, 5, 2047], start) == [151934, 151939, 153981]
    assert llm_to_fast_ids([151933, 151934, 151939, 153981, 153982, 12], start, n) == [0, 5, 2047]
    gen = [7, 151932, 151934, 151940, 151933, 151645]
    assert action_span(gen, 151932, 151933) == [151934, 151940]
    assert action_span([151934, 151933], 151932, 151933) == [151934]  # missing start: from the beginning
    assert action_span([151932, 151934], 151932, 151933) == [151934]  # missing end: to the end
