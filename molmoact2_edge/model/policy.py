"""The PyTorch reference policy: ``Policy.act(observation) -> ActionChunk``, the numbers export and runtime must match.

Reference ``reference/molmoact2-checkpoint.md`` §4 (and §11). The full order, one
method per stage so export can reuse each step:

  1. ``camera_crops``: cameras in the policy's order, resized (numpy, ``preprocess``);
  2. ``build_prompt``: normalized state -> 256 bins -> the released template (``tokenizers.prompt``),
     optionally right-padded to a fixed bucket (too long -> ``PromptTooLongError``);
  3. ``encode_images`` (stage ``vision``) -> pooled image features;
  4. ``prefill`` (stage ``prefill``): embeddings with features added at ``<im_patch>``, the
     prefill bias, one forward -> logits, static KV cache, expert context;
  5. ``decode_depth`` (stage ``depth``, MolmoAct2-Think): ``<depth_start>``, one code per cell with
     argmax over the depth rows only; with the adaptive cache a cell whose pixels did not change
     replays its previous code, and consecutive replays are fed as one chunk; then greedy
     decoding until ``<depth_end>`` has been fed (at most max(8, ah) tokens);
  6. ``sample_flow`` (stage ``flow``, continuous): seeded noise (``types.flow_noise``, numpy
     PCG64: one draw on every backend, torch's generator differs across devices), N Euler steps
     (with a committed prefix: real-time chunking, ``model/rtc_flow.py``, mode ``rtc``);
     or ``decode_discrete`` (stage ``decode``): greedy to eos (at most 16 ah tokens), the
     ``<action_i>`` span -> OpenFAST -> (ah, ad), zeros and ``decode_ok=False`` if it fails the shape rule;
  7. ``postprocess``: the robot's action dims, steps [n_obs_steps - 1, + n_action_steps), un-normalized.

The stage methods run under ``torch.no_grad`` and can be called one by one (export does).
Generated tokens continue right after the last real prompt token: their cache slots
overwrite the bucket's pad slots, and slot index = position id (as ``runtimes.session``).

Shape legend: b batch (always 1 here), n cameras, h w pixels, t prompt tokens, L static
cache length, l layers, kh KV heads, hd head dim, d expert width, ah chunk length,
ad action dim (max_action_dim), V text vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.depth_cache import DepthCache
from molmoact2_edge.errors import CheckpointError, ConfigError, ObservationError, TokenizerError
from molmoact2_edge.model import masks
from molmoact2_edge.model.flow import action_dim_mask
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.model.rtc_flow import EXPORTABLE_VJP, rtc_sample
from molmoact2_edge.normalization import NormStats, TagMetadata
from molmoact2_edge.preprocess import resize_cameras
from molmoact2_edge.rtc import CommittedPrefix, prefix_inputs, resolve_mode
from molmoact2_edge.tokenizers.openfast import (
    ACTION_TOKENIZER_DIR,
    OpenFASTTokenizer,
    action_span,
    llm_to_fast_ids,
)
from molmoact2_edge.tokenizers.prompt import Prompt, PromptBuilder, PromptSpec, state_bins
from molmoact2_edge.tokenizers.text import TextTokenizer
from molmoact2_edge.types import STAGES, ActionChunk, Observation, flow_noise

log = logging.getLogger(__name__)

MODES = ("continuous", "discrete")


@dataclass
class DecodeState:
    """The growing generation state of one ``act``: static cache and what each slot holds.

    k_cache/v_cache (l, 1, kh, L, hd); ids (L,) int64, -1 in empty slots; valid (L,) bool;
    length: the next slot (= its position id); logits (V,) of the last fed token.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    ids: np.ndarray
    valid: np.ndarray
    length: int
    logits: torch.Tensor
    decoded: bool = False  # any token fed after the prompt (the expert context must then cover the cache)


class Policy:
    """A MolmoAct2 model with its tokenizers, norm stats and prompt metadata. One ``act`` at a time."""

    def __init__(
        self,
        model: MolmoAct2,
        config: MolmoAct2Config,
        tokenizer: TextTokenizer,
        norm_stats: NormStats,
        *,
        tag: str | None = None,
        mode: str | None = None,
        fast: OpenFASTTokenizer | None = None,
        camera_order: Sequence[str] | None = None,
        bucket: int | None = None,
        depth: bool | None = None,
        num_steps: int | None = None,
        rtc: str = "auto",
        rtc_vjp: str = EXPORTABLE_VJP,
    ) -> None:
        """tag: norm-stats embodiment tag (None: the only one). mode: "continuous" (flow expert) or
        "discrete" (OpenFAST tokens; needs ``fast``); default continuous when the model has an expert.
        camera_order: camera names in prompt order (default: the tag's ``camera_keys``, else the first
            observation's sorted names, kept from then on).
        bucket: fixed prompt length (export's shapes); None = the prompt's own length.
        depth: MolmoAct2-Think depth reasoning (default ``config.enable_depth_reasoning``).
        rtc: real-time chunking when ``act`` gets a committed prefix (``rtc.MODES``; auto: training-time
            if the checkpoint was trained with it, else off); rtc_vjp: how inference-time RTC
            forms its vector-Jacobian product (``model/rtc_flow.py``; the bundle's graph uses the default).
        """
        self.model = model.eval()
        self.config = config
        self.norm = norm_stats
        self.tag = tag
        self.meta: TagMetadata = norm_stats.tag(tag)
        self.mode = mode or (
            "continuous" if config.add_action_expert and config.action_mode != "discrete" else "discrete"
        )
        if self.mode not in MODES:
            raise ConfigError(f"policy mode {self.mode!r} not in {MODES}")
        if self.mode == "continuous" and not config.add_action_expert:
            raise ConfigError(
                "continuous mode needs the action expert, but config.json has add_action_expert=false"
            )
        if self.mode == "discrete" and fast is None:
            raise TokenizerError(
                f"discrete mode needs the OpenFAST tokenizer (a checkpoint's {ACTION_TOKENIZER_DIR}/)"
            )
        self.fast = fast
        self.depth = config.enable_depth_reasoning if depth is None else depth
        self.num_steps = num_steps or config.flow_matching_num_steps
        self.rtc = resolve_mode(rtc, config.rtc_max_delay)
        self.rtc_vjp = rtc_vjp
        self.horizon = int(self.meta.action_horizon or config.max_action_horizon)  # ah generated
        if self.horizon > config.max_action_horizon:
            raise ConfigError(f"tag horizon {self.horizon} > max_action_horizon {config.max_action_horizon}")
        self.action_dim = self.meta.action_dim
        self.n_action_steps = int(self.meta.n_action_steps or self.horizon)
        keys = list(self.meta.extra.get("camera_keys") or [])
        self.camera_order: list[str] | None = list(camera_order) if camera_order else (keys or None)
        self.prompts = PromptBuilder.from_config(tokenizer, config, bucket)
        self.spec = PromptSpec(
            setup_type=self.meta.setup_type,
            control_mode=self.meta.control_mode,
            add_setup_tokens=config.add_setup_tokens,
            add_control_tokens=config.add_control_tokens,
            depth=self.depth,
        )
        grid = int(round(config.num_depth_codes**0.5))
        if self.depth and grid * grid != config.num_depth_codes:
            raise ConfigError(f"num_depth_codes {config.num_depth_codes} is not a square grid")
        self.depth_cache = DepthCache(grid=grid)
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **options: object,
    ) -> Policy:
        """Load config, weights, ``norm_stats.json``, ``tokenizer.json`` and (if present) ``action_tokenizer/``."""
        from molmoact2_edge.checkpoint import load_checkpoint

        path = Path(path)
        model, config, norm_stats = load_checkpoint(path, device=device, dtype=dtype)
        if norm_stats is None:
            raise CheckpointError(
                f"{path}: no {config.norm_stats_filename}; a policy needs the normalization stats"
            )
        fast_dir = path / ACTION_TOKENIZER_DIR
        fast = OpenFASTTokenizer.load(fast_dir) if fast_dir.is_dir() else None
        return cls(model, config, TextTokenizer.from_file(path), norm_stats, fast=fast, **options)  # type: ignore[arg-type]

    # --- public --------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: exact RTC guidance (rtc_vjp="autograd") differentiates the expert
    def act(
        self,
        observation: Observation,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        prefix: CommittedPrefix | None = None,
    ) -> ActionChunk:
        """One chunk (n_action_steps, action_dim) float32 in robot units.

        seed: flow-noise seed (None: fresh entropy); noise: an explicit (ah, ad) array instead.
        prefix: the actions the robot commits to while this chunk is computed (real-time chunking).
        """
        timings = dict.fromkeys(STAGES, 0.0)
        info: dict[str, object] = {}
        start = time.perf_counter()
        order = self.cameras_for(observation)
        observation.validate(order, self.meta.state_dim)
        with self._timed(timings, "vision"):
            features = self.encode_images(self.camera_crops(observation, order))
        prompt = self.build_prompt(observation, len(order))
        info["prompt_tokens"] = prompt.num_valid
        with self._timed(timings, "prefill"):
            state, pre_k, pre_v = self.prefill(prompt, features)
        if self.depth:
            with self._timed(timings, "depth"):
                info["depth_cells_repredicted"] = self.decode_depth(
                    state, observation.images[order[0]], order[0]
                )
        if self.mode == "discrete":
            with self._timed(timings, "decode"):
                normalized, ok = self.decode_discrete(state)
            info["decode_ok"] = ok
        else:
            with self._timed(timings, "flow"):
                normalized = self.sample_flow(state, pre_k, pre_v, prompt, seed, noise, prefix)
        actions = self.postprocess(normalized)
        timings["total"] = time.perf_counter() - start
        return ActionChunk(actions=actions, timestamp=observation.timestamp, timings=timings, info=info)

    def reset(self) -> None:
        """Forget per-episode state (the depth cache)."""
        self.depth_cache.reset()

    # --- stages --------------------------------------------------------------------------

    def cameras_for(self, observation: Observation) -> list[str]:
        """The camera order; without one configured, the first observation's sorted names become it."""
        if self.camera_order is None:
            self.camera_order = sorted(observation.images)
            log.info("camera order taken from the first observation: %s", self.camera_order)
        return self.camera_order

    def camera_crops(self, observation: Observation, order: Sequence[str]) -> np.ndarray:
        """(1, n, h, w, 3) uint8 at the ViT input size, in camera order."""
        size = self.config.vit_config.image_default_input_size
        return resize_cameras([observation.images[name] for name in order], size, list(order))[None]

    def build_prompt(self, observation: Observation, num_cameras: int) -> Prompt:
        bins = None
        if self.meta.state_stats is not None:
            bins = state_bins(
                self.norm.normalize_state(np.asarray(observation.state, dtype=np.float32), self.tag)
            )
        return self.prompts.build(observation.task, bins, num_cameras, self.spec)

    @torch.no_grad()
    def encode_images(self, crops: np.ndarray) -> torch.Tensor:
        """(1, n, h, w, 3) uint8 -> (1, n*m, e) image features."""
        return self.model.encode_images(torch.from_numpy(crops).to(self.device))

    def cache_length(self, prompt: Prompt) -> int:
        """Static cache slots: the prompt (bucket) plus the decode budget of the depth and discrete paths."""
        budget = 0
        if self.depth:
            budget += 1 + self.config.num_depth_codes + max(8, self.horizon)
        if self.mode == "discrete":
            budget += 16 * self.horizon
        return max(len(prompt.input_ids), prompt.num_valid + budget)

    @torch.no_grad()
    def prefill(
        self, prompt: Prompt, features: torch.Tensor
    ) -> tuple[DecodeState, torch.Tensor | None, torch.Tensor | None]:
        """Embed + prefill -> (decode state, expert context K, V (l, 1, t, d) over the prompt)."""
        ids = torch.from_numpy(prompt.input_ids[None]).to(self.device)  # (1, t)
        positions = torch.tensor(
            prompt.image_positions[None], device=self.device
        )  # (1, n*m); a task's prompts share it read-only
        embeds = self.model.embed(ids, features, positions)
        bias = masks.prefill_attention_bias(prompt.attention_mask[None], prompt.token_type_ids[None])
        gate_inputs = self._gate_inputs(prompt.input_ids, prompt.attention_mask)
        cache_len = self.cache_length(prompt)
        out = self.model.prefill(
            embeds, torch.from_numpy(bias).to(self.device), cache_len=cache_len, **gate_inputs
        )
        slots_ids = np.full(cache_len, -1, dtype=np.int64)
        slots_ids[: prompt.num_valid] = prompt.input_ids[: prompt.num_valid]
        valid = np.zeros(cache_len, dtype=bool)
        valid[: prompt.num_valid] = True
        state = DecodeState(
            out.k_cache, out.v_cache, slots_ids, valid, prompt.num_valid, out.logits[0, prompt.num_valid - 1]
        )
        return state, out.expert_k, out.expert_v

    @torch.no_grad()
    def feed(self, state: DecodeState, tokens: Sequence[int]) -> torch.Tensor:
        """Feed s known tokens in one forward at slots [length, length + s); returns their logits (s, V)."""
        s, start = len(tokens), state.length
        cache_len = len(state.ids)
        if start + s > cache_len:
            raise ConfigError(f"decoding ran past the static cache ({cache_len} slots)")
        slots = np.arange(start, start + s)
        allowed = np.repeat(state.valid[None], s, axis=0)  # (s, L): every earlier valid slot
        allowed[:, start : start + s] |= np.tril(np.ones((s, s), dtype=bool))  # causal inside the chunk
        bias = np.where(allowed, np.float32(0.0), np.float32(masks.MASK_VALUE))[None, None]  # (1, 1, s, L)
        slot_t = torch.from_numpy(slots).to(self.device)
        logits, state.k_cache, state.v_cache = self.model.decode_step(
            torch.tensor([list(tokens)], dtype=torch.long, device=self.device),
            slot_t[None],
            slot_t,
            state.k_cache,
            state.v_cache,
            torch.from_numpy(bias.astype(np.float32)).to(self.device),
        )
        state.ids[start : start + s] = tokens
        state.valid[start : start + s] = True
        state.length = start + s
        state.logits = logits[0, -1]
        state.decoded = True
        return logits[0]

    @torch.no_grad()
    def decode_depth(self, state: DecodeState, image: np.ndarray, camera: str) -> int:
        """Depth codes of the main camera with the adaptive cache; returns how many cells were re-predicted."""
        cfg = self.config
        first, count = cfg.require_token_ids("depth_token_start_id", "num_depth_tokens")
        (depth_start, depth_end) = cfg.require_token_ids("depth_start_token_id", "depth_end_token_id")
        cells, previous, changed = self.depth_cache.plan(camera, image)
        codes = np.zeros(self.depth_cache.num_cells, dtype=np.int64)
        pending = [depth_start]  # known tokens not yet fed: replays accumulate into one chunk
        for cell in range(self.depth_cache.num_cells):
            if previous is None or changed[cell]:
                logits = self.feed(state, pending)[-1]
                pending = []
                codes[cell] = int(torch.argmax(logits[first : first + count]))
            else:
                codes[cell] = int(previous[cell])
            pending.append(first + int(codes[cell]))
        self.feed(state, pending)
        for _ in range(max(8, self.horizon)):  # greedy until <depth_end> has been fed
            token = int(torch.argmax(state.logits))
            self.feed(state, [token])
            if token == depth_end:
                break
        self.depth_cache.update(camera, cells, codes, changed)
        return int(changed.sum())

    @torch.no_grad()
    def decode_discrete(self, state: DecodeState) -> tuple[np.ndarray, bool]:
        """Greedy decoding to eos (at most 16 ah tokens), then OpenFAST on the <action_i> span -> (ah, ad)."""
        assert self.fast is not None
        eos, start_id, end_id, first = self.config.require_token_ids(
            "eos_token_id", "action_start_token_id", "action_end_token_id", "action_token_start_id"
        )
        generated: list[int] = []
        for _ in range(16 * self.horizon):
            token = int(torch.argmax(state.logits))
            generated.append(token)
            if token == eos or state.length >= len(state.ids):
                break
            self.feed(state, [token])
        bpe = llm_to_fast_ids(action_span(generated, start_id, end_id), first, self.config.num_action_tokens)
        chunk, ok = self.fast.decode(bpe, time_horizon=self.horizon, action_dim=self.action_dim)
        if not ok:
            log.warning("discrete chunk of %d action tokens failed to decode; returning zeros", len(bpe))
        padded = np.zeros((self.horizon, self.config.max_action_dim), dtype=np.float32)
        padded[:, : self.action_dim] = chunk
        return padded, ok

    @torch.no_grad()
    def sample_flow(
        self,
        state: DecodeState,
        prefill_k: torch.Tensor | None,
        prefill_v: torch.Tensor | None,
        prompt: Prompt,
        seed: int | None,
        noise: np.ndarray | None,
        prefix: CommittedPrefix | None = None,
    ) -> np.ndarray:
        """N Euler steps of the expert from seeded noise -> (ah, ad) normalized actions (RTC with a prefix)."""
        shape = (self.horizon, self.config.max_action_dim)
        x0 = flow_noise(seed, shape) if noise is None else np.asarray(noise, dtype=np.float32)
        if x0.shape != shape:
            raise ObservationError(f"noise: expected shape {shape}, got {x0.shape}")
        context: tuple[torch.Tensor | None, torch.Tensor | None]
        if state.decoded:  # depth tokens joined the cache: the expert reads all of it
            ids, valid = state.ids, state.valid
            context = self.expert_context(state)
        else:
            ids, valid = prompt.input_ids, prompt.attention_mask
            context = (prefill_k, prefill_v)
        expert_k, expert_v = context
        assert expert_k is not None and expert_v is not None, "no expert context: add_action_expert is false"
        cross = masks.cross_attention_bias(masks.cross_attention_valid(ids[None], valid[None], self.config))
        dtype = self.model.model.action_expert.action_embed.weight.dtype
        noise_t = torch.from_numpy(x0[None]).to(self.device, dtype)
        cross_t = torch.from_numpy(cross).to(self.device)
        dim_mask = action_dim_mask(self.action_dim, self.config.max_action_dim, self.device)
        if prefix is None or self.rtc == "off":
            out = self.model.sample_actions(
                noise_t, expert_k, expert_v, cross_t, dim_mask=dim_mask, num_steps=self.num_steps
            )
            return out[0].float().cpu().numpy()
        values, weights = prefix_inputs(
            prefix, self.rtc, self.norm, self.tag, *shape, first=self.config.n_obs_steps - 1
        )

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.expert_velocity(x.to(dtype), t, expert_k, expert_v, cross_t)

        out = rtc_sample(
            self.rtc,
            velocity,
            noise_t,
            self.num_steps,
            torch.from_numpy(values[None]).to(self.device),
            torch.from_numpy(weights[None]).to(self.device),
            dim_mask if self.config.mask_action_dim_padding else None,
            vjp=self.rtc_vjp,
        )
        return out[0].float().cpu().numpy()

    @torch.no_grad()
    def expert_context(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected expert context (l, 1, L, d) over every cache slot (prompt + generated tokens)."""
        gate = self._gate_inputs(state.ids, state.valid)
        return self.model.expert_context(
            state.k_cache, state.v_cache, gate.get("context_valid"), gate.get("depth_mask")
        )

    def postprocess(self, normalized: np.ndarray) -> np.ndarray:
        """(ah, ad) normalized -> (n_action_steps, action_dim) float32 robot units."""
        first = self.config.n_obs_steps - 1
        chunk = normalized[first : first + self.n_action_steps, : self.action_dim]
        return self.norm.unnormalize_action(chunk, self.tag).astype(np.float32)

    # --- helpers -------------------------------------------------------------------------

    def _gate_inputs(self, ids: np.ndarray, valid: np.ndarray) -> dict[str, torch.Tensor]:
        """context_valid / depth_mask for the depth gate (empty when the gate is off)."""
        if not self.config.action_expert_depth_gate:
            return {}
        ctx = masks.cross_attention_valid(ids[None], valid[None], self.config)
        depth = masks.depth_token_mask(ids[None], self.config)
        return {
            "context_valid": torch.from_numpy(ctx).to(self.device),
            "depth_mask": torch.from_numpy(depth).to(self.device),
        }

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        timings[stage] += time.perf_counter() - t0
