"""Training examples -> model batches: prompts, target tokens, flow noise and times, drawn per (seed, step).

One ``Frames`` array set holds a whole (small) dataset in memory, images already
resized to the model's input size, so a step costs only the forward/backward pass.
``BatchMaker.__call__(step, shard)`` draws the *global* batch of a step from a
generator seeded by (seed, step) -- sample indices, flow noise, flow times -- and
keeps this rank's slice, so the same run gives the same updates on any number of
ranks and resumes exactly from a step number.

Stage-1 target after the prompt (teacher-forced, cross-entropy on every token):
``[<depth_start> <depth_c0> .. <depth_c99> <depth_end>] <action_start> <action_b0> .. <action_end> <|im_end|>``
(depth part only for MolmoAct2-Think), the sequence the reference policy decodes (§4.13, §4.14).
Stage 2 conditions the expert on the prompt (plus the depth tokens for Think).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.model import masks
from molmoact2_edge.tokenizers.openfast import OpenFASTTokenizer
from molmoact2_edge.tokenizers.prompt import PromptBuilder, PromptSpec, config_token_ids

IGNORE = -100  # label of positions without a loss (prompt, padding)


@dataclass
class Frames:
    """A dataset in memory. m frames, n cameras; chunks are normalized and zero-padded past an episode's end.

    images (m, n, h, w, 3) uint8 at the model input size; state_bins (m, s) int64 prompt state bins;
    chunks (m, ah, ad) float32 normalized actions; chunk_valid (m, ah) bool (False past the episode end);
    task_index (m,) int64 into ``tasks``; depth_codes (m, 100) int64 or None (Think only).
    """

    images: np.ndarray
    state_bins: np.ndarray
    chunks: np.ndarray
    chunk_valid: np.ndarray
    task_index: np.ndarray
    tasks: list[str]
    depth_codes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True)
class BatchSpec:
    seed: int = 0
    batch_size: int = 16  # global
    flow_samples: int = 4  # (noise, t) draws per chunk in stage 2; the backbone pass is shared
    think: bool = False


class BatchMaker:
    """Tokenizes every frame once, then serves deterministic (seed, step) batches."""

    def __init__(
        self,
        frames: Frames,
        config: MolmoAct2Config,
        prompts: PromptBuilder,
        spec: PromptSpec,
        fast: OpenFASTTokenizer,
        batch: BatchSpec,
    ) -> None:
        self.frames, self.config, self.batch = frames, config, batch
        ids = config_token_ids(config)
        self.token_ids = ids
        self.pad_id = int(ids["pad_token_id"])
        n_cams = frames.images.shape[1]
        action_ids = [self._action_tokens(fast.encode(c), ids) for c in frames.chunks]
        depth_ids = (
            [self._depth_tokens(c, ids) for c in frames.depth_codes]
            if batch.think and frames.depth_codes is not None
            else [[] for _ in range(len(frames))]
        )
        self.prompts: list[np.ndarray] = []
        self.targets: list[list[int]] = []
        self.context_len: list[int] = []  # tokens the expert may see: prompt (+ depth for Think)
        for i in range(len(frames)):
            prompt = prompts.build(
                frames.tasks[frames.task_index[i]], frames.state_bins[i].tolist(), n_cams, spec
            )
            self.prompts.append(prompt.input_ids[: prompt.num_valid])
            self.targets.append(depth_ids[i] + action_ids[i])
            self.context_len.append(prompt.num_valid + len(depth_ids[i]))

    @staticmethod
    def _action_tokens(fast_ids: Sequence[int], ids: dict[str, int]) -> list[int]:
        start = int(ids["action_token_start_id"])
        return [int(ids["action_start_token_id"]), *(start + b for b in fast_ids), int(ids["action_end_token_id"]),
                int(ids["eos_token_id"])]  # fmt: skip

    @staticmethod
    def _depth_tokens(codes: np.ndarray, ids: dict[str, int]) -> list[int]:
        start = int(ids["depth_token_start_id"])
        return [
            int(ids["depth_start_token_id"]),
            *(start + int(c) for c in codes),
            int(ids["depth_end_token_id"]),
        ]

    def draw(self, step: int) -> dict[str, np.ndarray]:
        """The global batch's random draws for ``step``: frame indices, flow noise and flow times."""
        cfg, b, k = self.config, self.batch.batch_size, self.batch.flow_samples
        rng = np.random.default_rng([self.batch.seed, step])
        index = rng.integers(len(self.frames), size=b)
        ah = self.frames.chunks.shape[
            1
        ]  # the expert runs on the tag's horizon, not max_action_horizon (§4.10)
        noise = rng.standard_normal((b, k, ah, cfg.max_action_dim)).astype(np.float32)
        beta = rng.beta(cfg.flow_matching_beta_alpha, cfg.flow_matching_beta_beta, size=(b, k))
        span = min(cfg.flow_matching_cutoff - cfg.flow_matching_time_offset, cfg.flow_matching_time_scale)
        t = (cfg.flow_matching_time_offset + span * beta).astype(np.float32)
        draws: dict[str, np.ndarray] = {"index": index, "noise": noise, "t": t}
        if cfg.rtc_max_delay > 0:  # training-time RTC: a committed prefix of 0..max delay steps per draw
            draws["delay"] = rng.integers(0, min(cfg.rtc_max_delay, ah - 1) + 1, size=(b, k))
        return draws

    def __call__(self, step: int, shard: slice) -> dict[str, torch.Tensor]:
        draws = self.draw(step)
        delay = draws["delay"][shard] if "delay" in draws else None
        return self.collate(draws["index"][shard], draws["noise"][shard], draws["t"][shard], delay)

    def collate(
        self, index: np.ndarray, noise: np.ndarray, t: np.ndarray, delay: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded sequences (prompt + target) with labels, masks and the flow targets of ``index``.

        delay (b, k): training-time RTC's committed prefix length per flow draw (``rtc_delay`` in the batch).
        """
        cfg, f = self.config, self.frames
        seqs = [np.concatenate([self.prompts[i], np.asarray(self.targets[i], dtype=np.int64)]) for i in index]
        length = max(len(s) for s in seqs)
        b = len(index)
        input_ids = np.full((b, length), self.pad_id, dtype=np.int64)
        labels = np.full((b, length), IGNORE, dtype=np.int64)
        valid = np.zeros((b, length), dtype=bool)
        context = np.zeros((b, length), dtype=bool)
        for row, (i, seq) in enumerate(zip(index, seqs, strict=True)):
            n, p = len(seq), len(self.prompts[i])
            input_ids[row, :n] = seq
            valid[row, :n] = True
            labels[row, p - 1 : n - 1] = seq[p:]  # position j predicts token j+1
            context[row, : self.context_len[i]] = True
        types = masks.token_type_ids(input_ids, cfg) * valid
        context = masks.cross_attention_valid(input_ids, context, cfg)
        ah, ad = f.chunks.shape[1:]
        actions = np.zeros((b, ah, cfg.max_action_dim), dtype=np.float32)  # action dims zero-padded
        actions[:, :, :ad] = f.chunks[index]
        action_mask = np.zeros_like(actions, dtype=bool)  # horizon mask x action-dim padding mask
        action_mask[:, :, :ad] = f.chunk_valid[index][:, :, None]
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(valid),
            "attention_bias": torch.from_numpy(masks.prefill_attention_bias(valid, types)),
            "image_positions": torch.from_numpy(masks.image_token_positions(input_ids, cfg)),
            "cross_bias": torch.from_numpy(masks.cross_attention_bias(context)),
            "images": torch.from_numpy(f.images[index]),
            "actions": torch.from_numpy(actions),
            "action_mask": torch.from_numpy(action_mask),
            "action_dim": torch.tensor(ad),
            "noise": torch.from_numpy(noise),
            "t": torch.from_numpy(t),
        }
        if delay is not None:
            batch["rtc_delay"] = torch.from_numpy(delay.astype(np.int64))
        return batch
