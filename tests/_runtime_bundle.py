"""A tiny random checkpoint and its exported fp32 bundle, built once and cached across test sessions.

Export takes minutes on the shared 2-core machine, so the bundle is kept under
``.cache/molmo-edge/test-<source hash>/``, keyed by a hash of every source file that
shapes a bundle (export, model, tokenizers, manifest, session): any change there
builds a fresh one. The layout is the demo's cache (``bundles/<checkpoint sha16>-fp32``),
so ``molmo-edge demo --cache <root>`` reuses it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "molmoact2_edge"
SOURCES = (
    "export",
    "model",
    "tokenizers",
    "config.py",
    "checkpoint.py",
    "normalization.py",
    "preprocess.py",
    "runtimes/bundle.py",
    "runtimes/session.py",
    "depth_cache.py",
    "runtimes/depth_decode.py",
    "contract.py",
)
CORPUS = [
    "The task is to pick up the red cube. The setup is so101 arm. The current state of the robot is"
] * 20


def source_hash() -> str:
    digest = hashlib.sha256()
    for entry in SOURCES:
        path = PKG / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(PKG).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def make_checkpoint(path: Path, think: bool = False) -> Path:
    """A seeded random checkpoint of the tiny preset (think: MolmoAct2-Think, decodes depth codes first)."""
    import dataclasses

    import torch

    from molmoact2_edge.checkpoint import save_checkpoint
    from molmoact2_edge.config import get_preset
    from molmoact2_edge.contract import CONTRACT_FILE
    from molmoact2_edge.model.molmoact2 import MolmoAct2
    from molmoact2_edge.normalization import NormStats
    from molmoact2_edge.tokenizers.text import train_small_tokenizer

    config = get_preset("tiny")
    if think:
        config = dataclasses.replace(config, enable_depth_reasoning=True)
    model = MolmoAct2.from_config(config, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # perturb so the adaLN-Zero expert does not output exactly zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    tok_dir = path.parent / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    train_small_tokenizer(CORPUS).save(tok_dir / "tokenizer.json")
    rng = np.random.default_rng(0)
    norm = NormStats.compute(
        "so101",
        rng.normal(size=(200, 6)) * 20,
        rng.normal(size=(200, 6)) * 20,
        setup_type="so101 arm",
        control_mode="absolute joint pose",
        action_horizon=8,
        n_action_steps=6,
    )
    save_checkpoint(model, config, path, norm_stats=norm, extra_files=[tok_dir / "tokenizer.json"])
    contract_of("so101", ("front", "wrist"), 6).save(path / CONTRACT_FILE)  # as training writes it
    return path


def contract_of(tag: str, cameras: tuple[str, ...], executed_steps: int, frame: str = "lerobot", hz: float = 10.0):
    """A recorded SO-101 robot contract (what `molmo-edge train` writes beside the weights)."""
    from molmoact2_edge.contract import SO101_JOINTS, SO101_UNITS, SO_FRAME_KINDS, CameraSpec, RobotContract

    cams = tuple(CameraSpec(c, "wrist" if c == "wrist" else "scene") for c in cameras)
    return RobotContract(
        tag, SO_FRAME_KINDS, SO101_JOINTS, SO101_UNITS, frame, hz, executed_steps, cams,
        "absolute joint pose", "absolute joint pose",
    )  # fmt: skip


def tiny_bundle() -> tuple[Path, Path, Path]:
    """(cache root, checkpoint, fp32 bundle) for the tiny preset, cameras front + wrist (the sim's)."""
    import torch

    from molmoact2_edge.checkpoint import checkpoint_sha256
    from molmoact2_edge.export.pipeline import ExportOptions, export_bundle

    root = REPO / ".cache" / "molmo-edge" / f"test-{source_hash()}"
    ckpt = root / "ckpt"
    if not (ckpt / "config.json").is_file():
        for stale in root.parent.glob("test-*"):  # bundles of older sources are never used again
            shutil.rmtree(stale, ignore_errors=True)
        make_checkpoint(ckpt)
    bundle = root / "bundles" / f"{checkpoint_sha256(ckpt)[:16]}-fp32"
    if not (bundle / "manifest.json").is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the shared 2-core machine: one thread is faster than two fighting
        try:
            staging = bundle.with_name(bundle.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            export_bundle(ckpt, staging, ExportOptions(cameras=("front", "wrist")))
            staging.rename(bundle)
        finally:
            torch.set_num_threads(threads)
    return root, ckpt, bundle
