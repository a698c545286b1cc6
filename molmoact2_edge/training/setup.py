"""Everything a training run needs before its first step: data in memory, tokenizers, model, save/load.

``build_run(cfg, info)`` reads the dataset once, fits the OpenFAST tokenizer (and the
depth codebook for Think) on it, trains the small text tokenizer on the run's prompts,
builds the preset model and returns a ``Run`` whose ``save(dir)`` writes the released
layout. All fitting is deterministic, so every rank (and a resumed run) rebuilds the
same tokenizers from the same data; a resumed run's weights come from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from molmoact2_edge.config import SMALL_BASE_VOCAB, MolmoAct2Config, get_preset
from molmoact2_edge.contract import CONTRACT_FILE, RobotContract, dataset_contract
from molmoact2_edge.data.reader import LeRobotDataset
from molmoact2_edge.data.stats import dataset_norm_stats
from molmoact2_edge.errors import DatasetError
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.normalization import NormStats
from molmoact2_edge.preprocess import resize_bilinear
from molmoact2_edge.tokenizers.openfast import OpenFASTTokenizer
from molmoact2_edge.tokenizers.prompt import PromptBuilder, PromptSpec, prompt_corpus, state_bins
from molmoact2_edge.tokenizers.text import TextTokenizer, train_small_tokenizer
from molmoact2_edge.training.batches import BatchMaker, BatchSpec, Frames
from molmoact2_edge.training.depth_vq import DepthVQ, save_depth_vq, train_depth_vq
from molmoact2_edge.training.distributed import DistInfo
from molmoact2_edge.training.objectives import FlowObjective, NextTokenObjective
from molmoact2_edge.training.trainer import TrainConfig

log = logging.getLogger(__name__)

ACTION_TOKENIZER_DIR = "action_tokenizer"  # OpenFAST processor_config.json + tokenizer.json
DEPTH_PREFIX = "observation.depth."  # + camera name: per-frame depth maps (metres) for Think


@dataclass
class Run:
    config: MolmoAct2Config
    model: MolmoAct2
    text_tokenizer: TextTokenizer
    fast: OpenFASTTokenizer
    norm_stats: NormStats
    batches: BatchMaker
    depth_vq: DepthVQ | None
    finetune_backbone: bool
    contract: RobotContract

    def objective(self, stage: int) -> torch.nn.Module:
        if stage == 1:
            return NextTokenObjective(self.model)
        # Think: the runtime decodes the depth codes with this backbone, so fine-tuning it on the flow loss alone
        # would let them drift (the depth tokens in stage 2's context are teacher-forced, never predicted).
        token_weight = 1.0 if self.config.enable_depth_reasoning else 0.0
        return FlowObjective(self.model, finetune_backbone=self.finetune_backbone, token_weight=token_weight)

    def save(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        """The released layout: config.json, safetensors, norm_stats.json, tokenizer files (+ depth codebook),
        and the robot contract the data implies (``robot_contract.json``).

        dtype: storage dtype of the weights (None: as trained, float32; the loader upcasts fp16/bf16).
        """
        from molmoact2_edge.checkpoint import save_checkpoint

        directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, self.config, directory, norm_stats=self.norm_stats, dtype=dtype)
        self.text_tokenizer.save(directory / "tokenizer.json")
        self.fast.save(directory / ACTION_TOKENIZER_DIR)
        self.contract.save(directory / CONTRACT_FILE)
        if self.depth_vq is not None:
            save_depth_vq(self.depth_vq, directory)

    def load_model(self, directory: Path) -> None:
        """Weights of a checkpoint written by ``save`` into this run's model (strict)."""
        from molmoact2_edge.checkpoint import read_tensors

        state = self.model.state_dict()
        tensors = read_tensors(directory)
        self.model.load_state_dict({k: tensors[k].to(v.dtype) for k, v in state.items()}, strict=True)


def read_dataset(
    cfg: TrainConfig, config: MolmoAct2Config, stats: NormStats | None = None
) -> tuple[Frames, NormStats, list[str]]:
    """The dataset in memory: images resized to the model input, normalized chunks, state bins, norm stats.

    stats: normalize with these (a fine-tuned checkpoint's own) instead of the dataset's.
    """
    dataset = LeRobotDataset(cfg.data)
    for key in ("action", "observation.state"):
        if key not in dataset.columns:
            raise DatasetError(f"{cfg.data}: no '{key}' column (features: {sorted(dataset.features)})")
    if not dataset.camera_keys:
        raise DatasetError(f"{cfg.data}: the dataset has no camera features")
    cameras = list(dataset.camera_keys)
    if cfg.cameras is not None:
        by_name = {camera_name(key): key for key in cameras}
        unknown = [c for c in cfg.cameras if c not in by_name]
        if unknown:
            raise DatasetError(f"{cfg.data} has no camera(s) {unknown}; it has {sorted(by_name)}")
        cameras = [by_name[c] for c in cfg.cameras]
    if stats is not None:
        return _frames(dataset, cfg, config, stats, cameras), stats, cameras
    stats = dataset_norm_stats(dataset, tag=cfg.tag, action_horizon=cfg.action_horizon)
    meta = stats.tag(cfg.tag)
    meta = dataclasses.replace(
        meta,
        n_action_steps=cfg.n_action_steps or cfg.action_horizon,
        extra={
            **meta.extra,
            "camera_keys": [camera_name(key) for key in cameras],
        },  # what observations call them
    )
    stats = stats.with_tag(cfg.tag, meta)
    return _frames(dataset, cfg, config, stats, cameras), stats, cameras


def _frames(
    dataset: LeRobotDataset, cfg: TrainConfig, config: MolmoAct2Config, stats: NormStats, cameras: list[str]
) -> Frames:
    size = config.vit_config.image_default_input_size
    m = len(dataset)
    images = np.zeros((m, len(cameras), *size, 3), dtype=np.uint8)
    chunks = np.zeros((m, cfg.action_horizon, dataset.columns["action"].shape[1]), dtype=np.float32)
    valid = np.zeros((m, cfg.action_horizon), dtype=bool)
    tasks: list[str] = []
    task_index = np.zeros(m, dtype=np.int64)
    for i in range(m):
        sample = dataset.sample(i, cfg.action_horizon, camera_keys=cameras)
        for c, key in enumerate(cameras):
            images[i, c] = resize_bilinear(sample.images[key], size)
        chunks[i] = stats.normalize_action(sample.actions, cfg.tag)
        valid[i] = True if cfg.hold_past_end else sample.action_mask
        if sample.task not in tasks:
            tasks.append(sample.task)
        task_index[i] = tasks.index(sample.task)
    bins = state_bins(stats.normalize_state(dataset.columns["observation.state"], cfg.tag))
    frames = Frames(images, bins, chunks, valid, task_index, tasks)
    log.info(
        "%s: %d frames, %d episodes, cameras %s, tasks %s", cfg.data, m, dataset.num_episodes, cameras, tasks
    )
    return frames


def camera_name(key: str) -> str:
    """Dataset feature ``observation.images.front`` -> the observation's camera name ``front``."""
    return key.rsplit(".", 1)[-1]


def main_camera_depth(dataset: LeRobotDataset, cameras: list[str]) -> np.ndarray:
    """(m, h, w) float32 metres of the first camera, from the ``observation.depth.<camera>`` column.

    MolmoAct2-Think predicts the depth of its main (first) camera; the column holds each
    frame's depth map flattened (feature shape [h, w]).
    """
    key = DEPTH_PREFIX + camera_name(cameras[0])
    if key not in dataset.columns:
        raise DatasetError(
            f"--think needs depth maps: {dataset.root} has no '{key}' column (features: {sorted(dataset.features)}); "
            "record the dataset with depth"
        )
    shape = dataset.features[key]["shape"]
    return dataset.columns[key].reshape(len(dataset), shape[-2], shape[-1])


def fit_depth_codes(depth: np.ndarray, seed: int) -> tuple[DepthVQ, np.ndarray]:
    """Train the 128-code depth codebook on the maps, then encode every frame -> (m, 100) codes."""
    vq, metrics = train_depth_vq(depth, seed=seed)
    codes = np.concatenate(
        [vq.encode(torch.from_numpy(depth[i : i + 256])).numpy() for i in range(0, len(depth), 256)]
    )
    log.info("depth codebook: %.3f m mean abs error, %d codes used", metrics["mae_m"], metrics["codes_used"])
    return vq, codes


def build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    """Data, tokenizers and the fresh model for ``cfg`` (deterministic: every rank builds the same)."""

    if cfg.init_from is not None:
        return _fine_tune_run(cfg, info)
    config = get_preset(cfg.preset).with_changes(enable_depth_reasoning=cfg.think, rtc_max_delay=cfg.rtc_max_delay)
    if cfg.action_horizon > config.max_action_horizon:
        raise DatasetError(
            f"--action-horizon {cfg.action_horizon} exceeds the preset's max_action_horizon {config.max_action_horizon}"
        )
    contract = training_contract(cfg)  # before reading frames: a dataset that cannot say its frame fails fast
    frames, stats, cameras = read_dataset(cfg, config)
    if frames.chunks.shape[2] > config.max_action_dim:
        raise DatasetError(
            f"{cfg.data}: action dim {frames.chunks.shape[2]} exceeds max_action_dim {config.max_action_dim}"
        )
    meta = stats.tag(cfg.tag)
    spec = PromptSpec(setup_type=meta.setup_type, control_mode=meta.control_mode, depth=cfg.think)
    fast = OpenFASTTokenizer.train(list(frames.chunks), vocab_size=config.num_action_tokens)
    # The corpus twice: BPE merges need a pair frequency >= 2, and a few distinct prompts would
    # otherwise stay near byte level (a ~2x longer prompt for the LLM to read at every step).
    text = train_small_tokenizer(prompt_corpus(frames.tasks, [spec]) * 2, base_vocab_size=SMALL_BASE_VOCAB)
    depth_vq = None
    if cfg.think:
        depth_vq, frames.depth_codes = fit_depth_codes(
            main_camera_depth(LeRobotDataset(cfg.data), cameras), cfg.seed
        )
    prompts = PromptBuilder.from_config(text, config)
    batches = BatchMaker(
        frames, config, prompts, spec, fast, BatchSpec(cfg.seed, cfg.batch_size, cfg.flow_samples, cfg.think)
    )
    model = MolmoAct2.from_config(config, seed=cfg.seed).to(info.device)
    if info.is_main:
        log.info("model %s: %s parameters", cfg.preset, model.parameter_counts())
    return Run(config, model, text, fast, stats, batches, depth_vq, cfg.finetune_backbone, contract)


def training_contract(cfg: TrainConfig) -> RobotContract:
    """The robot contract of the checkpoint this run writes: the dataset's fps, robot type, joints and frame."""
    import json

    from molmoact2_edge.data import lerobot_format as fmt

    info = json.loads((Path(cfg.data) / fmt.INFO_PATH).read_text())
    visual = [camera_name(k) for k, f in info.get("features", {}).items() if fmt.is_visual(f) and not k.startswith(DEPTH_PREFIX)]
    cameras = tuple(cfg.cameras or visual)
    return dataset_contract(
        info,
        tag=cfg.tag,
        executed_steps=cfg.n_action_steps or cfg.action_horizon,
        cameras=cameras,
        action="absolute joint pose",
        joint_frame=cfg.joint_frame,
        where=str(cfg.data),
    )


def _fine_tune_run(cfg: TrainConfig, info: DistInfo) -> Run:
    """A run starting from the trained checkpoint ``cfg.init_from``: its weights, tokenizers and norm stats
    (the data is normalized with them), its config plus this run's ``rtc_max_delay``."""
    from molmoact2_edge.checkpoint import load_checkpoint

    source = Path(cfg.init_from)  # type: ignore[arg-type]
    contract = training_contract(cfg)  # the new data's rate and frame, checked before loading anything
    model, config, stats = load_checkpoint(source, device=info.device)
    if stats is None:
        raise DatasetError(f"--init-from {source}: no norm_stats.json beside the weights")
    if config.enable_depth_reasoning:
        raise DatasetError(f"--init-from {source}: fine-tuning a Think checkpoint is not supported")
    config = config.with_changes(rtc_max_delay=cfg.rtc_max_delay)
    model.config = config
    frames, stats, cameras = read_dataset(cfg, config, stats)
    meta = stats.tag(cfg.tag)
    spec = PromptSpec(setup_type=meta.setup_type, control_mode=meta.control_mode)
    fast = OpenFASTTokenizer.load(source / ACTION_TOKENIZER_DIR)
    text = TextTokenizer.from_file(source / "tokenizer.json")
    batches = BatchMaker(
        frames, config, PromptBuilder.from_config(text, config), spec, fast,
        BatchSpec(cfg.seed, cfg.batch_size, cfg.flow_samples),
    )  # fmt: skip
    log.info("fine-tuning %s (rtc_max_delay %d) on %s", source, cfg.rtc_max_delay, cfg.data)
    return Run(config, model.train(), text, fast, stats, batches, None, cfg.finetune_backbone, contract)
