"""Checkpoint I/O in the released layout: bit-exact round trips and every corruption case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from molmoact2_edge.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    checkpoint_sha256,
    load_checkpoint,
    read_tensors,
    save_checkpoint,
)
from molmoact2_edge.cli.main import cli
from molmoact2_edge.config import get_preset
from molmoact2_edge.errors import CheckpointError
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.normalization import NormStats

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def model() -> MolmoAct2:
    m = MolmoAct2.from_config(CFG, seed=1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def norm_stats() -> NormStats:
    rng = np.random.default_rng(0)
    return NormStats.compute(
        "so100_so101_molmoact2",
        rng.normal(size=(200, 6)),
        rng.normal(size=(200, 6)),
        setup_type="single so100/so101 robotic arm in molmoact2",
        control_mode="absolute joint pose",
        action_horizon=8,
        n_action_steps=8,
        action_key="action",
        state_keys=["observation.state"],
    )


@pytest.fixture
def sharded(model, tmp_path):
    return save_checkpoint(model, CFG, tmp_path / "ckpt", norm_stats=norm_stats(), shard_size=400_000)


def assert_same_weights(a: MolmoAct2, b: MolmoAct2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_sharded_round_trip_is_bit_exact(model, sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())
    loaded, cfg, stats = load_checkpoint(sharded)
    assert cfg == CFG
    assert stats is not None and stats.tag().setup_type.startswith("single so100")
    assert_same_weights(model, loaded)
    assert not loaded.training


def test_single_file_and_half_precision_storage(model, tmp_path):
    path = save_checkpoint(model, CFG, tmp_path / "half", dtype=torch.float16)
    assert (path / SINGLE_FILE).exists() and not (path / INDEX_FILE).exists()
    assert next(iter(load_file(str(path / SINGLE_FILE)).values())).dtype == torch.float16
    loaded, _, stats = load_checkpoint(path)
    assert stats is None
    for name, ref in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32
        assert torch.equal(got, ref.half().float()), name
    bf16, _, _ = load_checkpoint(path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_release_inv_freq_key_is_accepted_and_strangers_are_not(model, tmp_path):
    path = save_checkpoint(model, CFG, tmp_path / "c")
    tensors = load_file(str(path / SINGLE_FILE))
    tensors["model.transformer.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(path / SINGLE_FILE))
    load_checkpoint(path)
    tensors["model.action_expert.state_encoder.weight"] = torch.ones(2, 2)
    save_file(tensors, str(path / SINGLE_FILE))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.action_expert.state_encoder.weight'\]"):
        load_checkpoint(path)


def test_sha256_is_stable_and_sees_changes(sharded):
    digest = checkpoint_sha256(sharded)
    assert digest == checkpoint_sha256(sharded) and len(digest) == 64
    (sharded / "tokenizer.json").write_text("{}")
    assert checkpoint_sha256(sharded) != digest


def test_sha256_ignores_notes_beside_the_weights(sharded):
    digest = checkpoint_sha256(sharded)
    (sharded / "README.md").write_text("# trained on touch\n")
    (sharded / "eval_continuous.json").write_text('{"successes": 13}')
    assert checkpoint_sha256(sharded) == digest


def test_extra_files_are_copied(model, tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"version": "1.0"}')
    path = save_checkpoint(model, CFG, tmp_path / "c", extra_files=[tok])
    assert (path / "tokenizer.json").read_text() == tok.read_text()
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(model, CFG, tmp_path / "d", extra_files=[tmp_path / "missing.json"])


def _rewrite_first_shard(ckpt, edit):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    shard = ckpt / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))
    return shard


def _drop_one(tensors):
    tensors.pop(sorted(tensors)[0])


def _reshape_one(tensors):
    name = "model.transformer.wte.embedding"
    tensors[name] = torch.zeros(3, 3)


def _int_one(tensors):
    name = "model.transformer.wte.embedding"
    tensors[name] = tensors[name].to(torch.int32)


def _add_one(tensors):
    tensors["model.transformer.blocks.9.attn_norm.weight"] = torch.ones(4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_one, "listed in model.safetensors.index.json is not in the file"),
        (_reshape_one, r"model.transformer.wte.embedding has shape \(3, 3\)"),
        (_int_one, "model.transformer.wte.embedding has dtype torch.int32"),
        (_add_one, "tensor model.transformer.blocks.9.attn_norm.weight is not mapped to this file"),
    ],
    ids=["missing-in-shard", "wrong-shape", "wrong-dtype", "unexpected"],
)
def test_tensor_level_corruption_names_the_tensor(sharded, edit, message):
    if edit is _reshape_one or edit is _int_one:
        index = json.loads((sharded / INDEX_FILE).read_text())
        shard = sharded / index["weight_map"]["model.transformer.wte.embedding"]
        tensors = load_file(str(shard))
        edit(tensors)
        save_file(tensors, str(shard))
    else:
        _rewrite_first_shard(sharded, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(sharded)


def test_missing_tensor_from_index_is_reported(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    name = "lm_head.weight"
    shard = sharded / index["weight_map"].pop(name)
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    tensors = load_file(str(shard))
    tensors.pop(name)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"missing tensors \['lm_head.weight'\]"):
        load_checkpoint(sharded)


def test_truncated_shard_names_the_file(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt or truncated"):
        load_checkpoint(sharded)


def test_missing_shard_and_missing_files(sharded, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}, which does not exist"):
        load_checkpoint(sharded)
    (sharded / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(sharded)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CFG.to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "empty")


def test_bad_index_and_bad_config(sharded):
    (sharded / INDEX_FILE).write_text("[]")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load_checkpoint(sharded)
    (sharded / "config.json").write_text(json.dumps({**CFG.to_dict(), "action_mode": "fast"}))
    with pytest.raises(CheckpointError, match="config.json: action_mode 'fast'"):
        load_checkpoint(sharded)


def test_pickle_weights_are_refused(tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CFG.to_dict()))
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pickle format \(pytorch_model.bin\).*refused"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="pickle weights are refused"):
        read_tensors(ckpt / "pytorch_model.bin")


def test_info_command_on_a_tiny_checkpoint(sharded):
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(sharded)])
    assert result.exit_code == 0, result.output
    assert "so100_so101_molmoact2" in result.output and "action_expert" in result.output
    result = runner.invoke(cli, ["info", str(sharded), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["parameters"]["total"] == MolmoAct2.from_config(CFG).parameter_counts()["total"]
    assert data["weights"]["dtypes"] == {"F32": len(MolmoAct2.from_config(CFG).state_dict())}
    assert data["norm_stats"]["tags"]["so100_so101_molmoact2"]["action_dim"] == 6


def test_info_command_errors_cleanly(tmp_path):
    result = CliRunner().invoke(cli, ["info", str(tmp_path)])
    assert result.exit_code != 0
    assert "error:" in result.output and "no config.json" in result.output
