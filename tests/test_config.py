"""Config: released config.json round trip, cross-field checks, token layout, presets."""

from __future__ import annotations

import json

import pytest

from molmoact2_edge.config import (
    QWEN3_BASE_VOCAB,
    MolmoAct2Config,
    get_preset,
    preset_names,
    register_preset,
    token_layout,
)
from molmoact2_edge.errors import ConfigError


@pytest.mark.parametrize("name", preset_names())
def test_preset_round_trips_through_json(name, tmp_path):
    cfg = get_preset(name)
    cfg.to_json(tmp_path / "config.json")
    assert MolmoAct2Config.from_json(tmp_path / "config.json") == cfg


def test_unknown_keys_survive_round_trip():
    data = get_preset("tiny").to_dict()
    data["auto_map"] = {"AutoConfig": "configuration_molmoact2.MolmoAct2Config"}
    data["text_config"]["some_future_flag"] = [1, 2]
    data["action_expert_config"]["max_action_dim"] = 8  # stripped by the release on save
    out = MolmoAct2Config.from_dict(data).to_dict()
    assert out["auto_map"] == data["auto_map"]
    assert out["text_config"]["some_future_flag"] == [1, 2]
    assert "max_action_dim" not in out["action_expert_config"]
    assert json.loads(json.dumps(out)) == out


def test_release_token_ids_follow_the_assignment_rule():
    ids = token_layout(QWEN3_BASE_VOCAB)
    assert ids["vocab_size"] == 154624
    assert (ids["action_start_token_id"], ids["action_end_token_id"], ids["action_token_start_id"]) == (151932, 151933, 151934)
    assert (ids["state_start_token_id"], ids["state_token_start_id"]) == (151673, 151675)
    assert (ids["depth_token_start_id"], ids["image_start_token_id"], ids["image_patch_id"]) == (153985, 154624, 154626)
    assert ids["frame_end_token_id"] == 154632
    cfg = get_preset("molmoact2-4b")
    assert cfg.marker_ids()["setup_start_token_id"] == 151669
    assert "setup_start_token_id" not in cfg.to_dict()  # not a released field


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"action_mode": "fast"}, "action_mode"),
        ({"n_obs_steps": 0}, "n_obs_steps"),
        ({"action_token_start_id": 5000}, "<action_i>"),
        ({"image_patch_id": 10}, "image_patch_id"),
    ],
    ids=["bad-mode", "obs-steps", "action-ids-overflow", "image-id-below-vocab"],
)
def test_cross_field_checks_raise_config_error(patch, message):
    data = {**get_preset("tiny").to_dict(), **patch}
    with pytest.raises(ConfigError, match=message):
        MolmoAct2Config.from_dict(data)


def test_nested_checks_name_the_field():
    data = get_preset("tiny").to_dict()
    data["action_expert_config"]["num_layers"] = 3
    with pytest.raises(ConfigError, match="num_layers 3 != text_config.num_hidden_layers 2"):
        MolmoAct2Config.from_dict(data)
    data = get_preset("tiny").to_dict()
    data["vit_config"]["image_num_pos"] = 100
    with pytest.raises(ConfigError, match="image_num_pos 100"):
        MolmoAct2Config.from_dict(data)


def test_missing_n_obs_steps_is_refused():
    data = get_preset("tiny").to_dict()
    del data["n_obs_steps"]
    with pytest.raises(ConfigError, match="n_obs_steps"):
        MolmoAct2Config.from_dict(data)


def test_from_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        MolmoAct2Config.from_json(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MolmoAct2Config.from_json(bad)


def test_preset_registry_suggests_and_rejects_duplicates():
    with pytest.raises(ConfigError, match="Did you mean 'small'"):
        get_preset("smal")
    with pytest.raises(ConfigError, match="registered twice"):
        register_preset("tiny")(lambda: get_preset("tiny"))


def test_release_shapes_and_derived_values():
    cfg = get_preset("molmoact2-4b")
    assert cfg.resolved_vit_layers == (24, 18)
    assert cfg.num_vit_blocks == 25
    assert cfg.tokens_per_image == 196
    assert cfg.action_expert_config is not None and cfg.action_expert_config.mlp_hidden == 3072
    assert cfg.action_expert_config.head_dim == 96
