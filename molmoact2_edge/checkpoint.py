"""Load and save checkpoints in the released MolmoAct2 Hugging Face layout (reference §1, §9).

A checkpoint directory holds ``config.json``, the weights as ``model.safetensors`` or
as shards ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``,
``norm_stats.json`` (optional here), ``generation_config.json`` and tokenizer files,
which are copied through as files.

Safetensors only: pickled weights (``*.bin``, ``*.pt``, ...) are refused, never
unpickled. Loading builds the model on the meta device, checks every tensor's
presence, shape and dtype against it (naming the file and tensor on any mismatch),
then assigns the tensors, so no memory is spent on a random init. Weights stored
in fp16/bf16 (the bundled demo checkpoint) are upcast to the model dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.errors import CheckpointError, ConfigError
from molmoact2_edge.normalization import NormStats

if TYPE_CHECKING:
    import torch

    from molmoact2_edge.model.molmoact2 import MolmoAct2

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
NORM_STATS_FILE = "norm_stats.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Keys a release may carry that the model recomputes instead (RoPE inv_freq, §3.1 / A7).
IGNORED_KEYS = ("model.transformer.rotary_emb.inv_freq",)
DEFAULT_SHARD_SIZE = 5 * 1024**3  # bytes, as save_pretrained(max_shard_size="5GB")


def weight_files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> shard file from the index ({} for a single ``model.safetensors``); refuses pickles."""
    index, single = ckpt / INDEX_FILE, ckpt / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {err}") from err
        files = {name: ckpt / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"{index} names shard {shard.name}, which does not exist")
        return files
    if single.exists():
        return {}  # filled from the file's own header
    pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{ckpt}: weights only in pickle format ({', '.join(pickles)}); pickles can run arbitrary code and are "
            "refused. Convert them to safetensors (e.g. safetensors.torch.save_file) in a trusted environment."
        )
    raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (or a single ``.safetensors`` file), as stored."""
    from safetensors import SafetensorError, safe_open

    ckpt = Path(ckpt)
    if ckpt.is_file():
        if ckpt.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{ckpt}: pickle weights are refused; convert to safetensors")
        files, shards = {}, [ckpt]
    else:
        files = weight_files(ckpt)
        shards = sorted(set(files.values())) or [ckpt / SINGLE_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if files and files.get(name) != shard:
                        where = files.get(name)
                        raise CheckpointError(
                            f"{shard.name}: tensor {name} is not mapped to this file in {INDEX_FILE}"
                            + (f" (the index says {where.name})" if where else " (the index does not list it)")
                        )
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{shard}: corrupt or truncated safetensors file ({err})") from err
    for name, shard in files.items():
        if name not in tensors:
            raise CheckpointError(f"{shard.name}: tensor {name} listed in {INDEX_FILE} is not in the file")
    return tensors


def _check_against_model(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ckpt: Path) -> None:
    unexpected = sorted(set(tensors) - set(expected) - set(IGNORED_KEYS))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
        raise CheckpointError(f"{ckpt}: weights do not match config.json: " + "; ".join(parts))
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{ckpt}: tensor {name} has shape {tuple(got.shape)}, config.json implies {tuple(ref.shape)}")
        if not got.is_floating_point():
            raise CheckpointError(f"{ckpt}: tensor {name} has dtype {got.dtype}, expected a float dtype")


def load_config(ckpt: str | Path) -> MolmoAct2Config:
    path = Path(ckpt) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no {CONFIG_FILE} (is this a MolmoAct2 checkpoint directory?)")
    try:
        return MolmoAct2Config.from_json(path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def load_norm_stats(ckpt: str | Path, config: MolmoAct2Config | None = None) -> NormStats | None:
    """``norm_stats.json`` (name from the config) or None when the checkpoint has none."""
    name = config.norm_stats_filename if config is not None else NORM_STATS_FILE
    path = Path(ckpt) / name
    return NormStats.load(path) if path.exists() else None


def load_checkpoint(
    ckpt: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[MolmoAct2, MolmoAct2Config, NormStats | None]:
    """(model in eval mode, config, norm stats or None) from a checkpoint directory.

    dtype: parameter dtype (default float32); stored fp16/bf16/fp32 weights are cast to it.
    Raises CheckpointError naming the file/tensor for anything missing, corrupt or mismatched.
    """
    import torch

    from molmoact2_edge.model.molmoact2 import MolmoAct2

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    config = load_config(ckpt)
    norm_stats = load_norm_stats(ckpt, config)
    tensors = read_tensors(ckpt)
    with torch.device("meta"):
        model = MolmoAct2(config)
    expected = model.state_dict()
    _check_against_model(tensors, expected, ckpt)
    target = dtype or torch.float32
    state = {name: tensors[name].to(device=device, dtype=target) for name in expected}
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded %s: %d tensors, %s", ckpt, len(state), target)
    return model.eval(), config, norm_stats


def _shards(state: dict[str, torch.Tensor], shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state-dict order into groups of at most ``shard_size`` bytes (a bigger tensor is alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_checkpoint(
    model: MolmoAct2,
    config: MolmoAct2Config,
    path: str | Path,
    norm_stats: NormStats | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Write the released layout to ``path`` (created; existing weight files replaced).

    dtype: storage dtype (default: as in the model; releases store float32, the bundled demo
    checkpoint float16). extra_files: tokenizer files or folders copied in unchanged.
    One ``model.safetensors`` if everything fits ``shard_size`` bytes, else shards + index.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config.to_json(path / CONFIG_FILE)
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (path / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    shards = _shards(state, shard_size)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            for key, tensor in shard.items():
                weight_map[key] = name
                total += tensor.numel() * tensor.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if norm_stats is not None:
        norm_stats.save(path / config.norm_stats_filename)
    for item in map(Path, extra_files):
        if item.is_dir():
            shutil.copytree(item, path / item.name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, path / item.name)
        else:
            raise CheckpointError(f"extra file {item} does not exist")
    log.info("saved %s: %d tensors in %d file(s)", path, len(state), len(shards))
    return path


# Notes kept beside the weights (a README, evaluation results) say something about a checkpoint
# but are not part of it: editing them must not change its identity (nor invalidate cached bundles).
NOT_CHECKPOINT_FILES = ("*.md", "eval_*.json")


def checkpoint_sha256(path: str | Path) -> str:
    """One sha256 over the files of a checkpoint directory (relative path and content, sorted by path).

    Notes (``NOT_CHECKPOINT_FILES``) are left out; everything else, weights to tokenizers, counts.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    digest = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.is_file() and not any(p.match(g) for g in NOT_CHECKPOINT_FILES))
    for file in sorted(files):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
