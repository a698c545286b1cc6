"""norm_stats.json: the release's formulas (reference §5.3, §11 A17), file round trip, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmoact2_edge.errors import CheckpointError, ConfigError
from molmoact2_edge.normalization import FORMAT, FeatureStats, NormStats


def stats(mask=(True, True, False, True)) -> FeatureStats:
    return FeatureStats(
        values={
            "q01": np.array([0.0, -10.0, 0.0, 5.0], np.float32),
            "q99": np.array([10.0, 10.0, 1.0, 5.0], np.float32),
            "min": np.array([-1.0, -20.0, 0.0, 5.0], np.float32),
            "max": np.array([11.0, 20.0, 1.0, 5.0], np.float32),
            "mean": np.array([5.0, 0.0, 0.5, 5.0], np.float32),
            "std": np.array([2.0, 4.0, 0.0, 0.0], np.float32),
        },
        mask=np.array(mask),
    )


def test_q01_q99_golden_values():
    x = np.array([[2.5, 20.0, 0.7, 5.0], [-5.0, -5.0, 3.0, 6.0]], np.float32)
    n = stats().normalize(x, "q01_q99")
    # dim0: 2*(2.5/10)-1 = -0.5 and clipped -1; dim1: 20 -> clipped 1, -5 -> -0.5;
    # dim2 masked -> raw; dim3 min == max -> 0.
    np.testing.assert_allclose(n, [[-0.5, 1.0, 0.7, 0.0], [-1.0, -0.5, 3.0, 0.0]])
    back = stats().unnormalize(np.array([[-0.5, 1.5, 3.0, 0.2]], np.float32), "q01_q99")
    # 1.5 clips to 1 -> q99; masked dim returns the CLIPPED model value (1.0); dim3: lo == hi -> 5.
    np.testing.assert_allclose(back, [[2.5, 10.0, 1.0, 5.0]])
    assert n.dtype == np.float32 and back.dtype == np.float32


def test_other_modes():
    x = np.array([7.0, 4.0, 0.2, 5.0], np.float32)
    np.testing.assert_allclose(stats().normalize(x, "mean_std"), [1.0, 1.0, 0.2, 0.0])
    np.testing.assert_allclose(stats().normalize(x, "min_max")[:2], [2 * 8 / 12 - 1, 2 * 24 / 40 - 1], rtol=1e-6)
    np.testing.assert_array_equal(stats().normalize(x, "none"), x)
    np.testing.assert_allclose(stats().unnormalize(np.array([1.0, 1.0, 0.2, 0.0], np.float32), "mean_std")[:2], [7.0, 4.0])
    with pytest.raises(ConfigError, match=r"needs statistics \['q10', 'q90'\]"):
        stats().normalize(x, "q10_q90")
    with pytest.raises(ConfigError, match="expected last dimension 4"):
        stats().normalize(np.zeros(3), "q01_q99")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-0.999, 0.999), min_size=4, max_size=4))
def test_unnormalize_inverts_normalize_inside_the_range(values):
    s = stats(mask=(True, True, True, True))
    n = np.array(values, np.float32)
    n[3] = 0.0  # constant dim always normalizes to 0
    back = s.normalize(s.unnormalize(n, "q01_q99"), "q01_q99")
    np.testing.assert_allclose(back, n, atol=1e-5)


def test_file_round_trip_and_both_state_key_spellings(tmp_path):
    rng = np.random.default_rng(0)
    ns = NormStats.compute(
        "yam_dual_molmoact2",
        rng.normal(size=(500, 14)),
        rng.normal(size=(500, 14)),
        action_mask=[True] * 6 + [False] + [True] * 6 + [False],
        setup_type="bimanual yam robotic arms in molmoact2",
        control_mode="absolute joint pose",
        action_horizon=30,
        n_action_steps=30,
        state_key="observation.state",
        normalize_gripper=False,
    )
    ns.save(tmp_path / "norm_stats.json")
    data = json.loads((tmp_path / "norm_stats.json").read_text())
    assert data["format"] == FORMAT and data["norm_mode"] == "q01_q99"
    loaded = NormStats.load(tmp_path / "norm_stats.json")
    assert loaded.to_dict() == ns.to_dict()
    meta = loaded.tag("yam_dual_molmoact2")
    assert (meta.action_dim, meta.state_dim, meta.state_keys) == (14, 14, ["observation.state"])
    assert meta.extra["normalize_gripper"] is False
    x = rng.normal(size=(3, 14)).astype(np.float32)
    np.testing.assert_array_equal(loaded.normalize_action(x)[:, 6], x[:, 6])  # masked gripper passes through
    data["metadata_by_tag"]["yam_dual_molmoact2"]["state_keys"] = ["a", "b"]
    assert NormStats.from_dict(data).tag().state_keys == ["a", "b"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such norm-stats file"):
        NormStats.load(tmp_path / "norm_stats.json")
    with pytest.raises(CheckpointError, match="format 'v0'"):
        NormStats.from_dict({"format": "v0", "metadata_by_tag": {}})
    good = NormStats.compute("so100_so101_molmoact2", np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="Did you mean 'so100_so101_molmoact2'"):
        good.tag("so100_so101")
    bad = good.to_dict()
    bad["metadata_by_tag"]["so100_so101_molmoact2"]["action_stats"]["q99"] = [1.0]
    with pytest.raises(CheckpointError, match=r"action_stats.q99: shape \(1,\)"):
        NormStats.from_dict(bad)
    missing_mode = {k: v for k, v in good.to_dict().items() if k != "norm_mode"}
    assert NormStats.from_dict(missing_mode).norm_mode == "min_max"
