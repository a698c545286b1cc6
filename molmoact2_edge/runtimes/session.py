"""``PolicySession``: a bundle on a backend, as ``act(observation) -> ActionChunk``. Torch-free (numpy + backends).

The full order, in one place (``act``):

  1. observation checked against the bundle's camera order and state dim;
  2. cameras resized to the bundle's image size (torch bilinear semantics, ``preprocess``);
  3. prompt: normalized state -> bins -> the released template, right-padded to the
     bucket (too long -> ``PromptTooLongError``, never truncated);
  4. ``vision`` graph -> pooled image features;
  5. ``prefill`` graph -> last-token logits, expert context K/V, decoder cache;
  6. Think bundles: depth codes with the adaptive per-camera cache (unchanged cells
     replayed, changed cells re-predicted), verified speculatively in ``decode_block``
     calls with the cached codes as drafts (``depth_decode``; exact, few calls). Which cells
     changed (the frame resized to 320 px, cosine per cell) is worked out on a second thread
     while 4-5 run, since it needs only the image;
  7. ``flow`` graph (all Euler steps inside; real-time chunking when ``act`` gets the committed
     prefix and the bundle's graph takes one) -> normalized chunk, or for discrete
     bundles greedy ``decode_step`` decoding + OpenFAST;
  8. slice to the returned steps and un-normalize with the bundle's norm stats.

Each stage is timed into ``chunk.timings`` (``vision``, ``prefill``, ``depth``,
``decode``, ``flow``, ``total``). This is the code export's parity gate runs, so
what passed at export is what runs on the robot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from molmoact2_edge.depth_cache import DepthCache
from molmoact2_edge.errors import BundleError, ObservationError
from molmoact2_edge.normalization import NormStats
from molmoact2_edge.preprocess import resize_cameras
from molmoact2_edge.rtc import CommittedPrefix, prefix_inputs, session_mode
from molmoact2_edge.runtimes import bundle as B
from molmoact2_edge.runtimes.backends.base import BackendSession, Feed, Resident, load_backend
from molmoact2_edge.runtimes.depth_decode import DepthTokens, decode_depth, depth_token_mask
from molmoact2_edge.tokenizers.openfast import OpenFASTTokenizer, action_span, llm_to_fast_ids
from molmoact2_edge.tokenizers.prompt import (
    ImageLayout,
    Prompt,
    PromptBuilder,
    PromptSpec,
    cross_attention_valid,
    prefill_allowed,
    state_bins,
)
from molmoact2_edge.tokenizers.text import TextTokenizer
from molmoact2_edge.types import STAGES, ActionChunk, Observation, flow_noise

log = logging.getLogger(__name__)

# The decoder cache stays in the backend between graphs (``BackendSession.run_keeping``), never copied per token.
CACHE_OUTPUTS = ("cache_k", "cache_v")  # prefill's
CACHE_OUTPUTS_UPDATED = ("cache_k_out", "cache_v_out")  # decode_step's and decode_block's

FeedRecorder = Callable[[str, Mapping[str, np.ndarray]], None]


def bias_from_allowed(allowed: np.ndarray) -> np.ndarray:
    """Bool mask -> float32 additive bias with the bundle's fp16-safe mask value."""
    return np.where(allowed, np.float32(0.0), np.float32(B.MASK_VALUE)).astype(np.float32)


class PolicySession:
    """Load a bundle once, then ``act`` per observation. Not thread-safe (one ``act`` at a time)."""

    def __init__(
        self,
        bundle: B.Bundle | str | Path,
        backend: str | BackendSession = "onnxruntime",
        *,
        verify: bool = True,
        record_feeds: FeedRecorder | None = None,
        rtc: str = "auto",
        **backend_options: Any,
    ) -> None:
        """bundle: an opened Bundle or its directory (verified: hashes, schema).
        backend: a backend name for ``load_backend`` ("onnxruntime", "tensorrt", "torch", "auto") or a loaded session.
        record_feeds: called with (graph, feeds) before every graph call (int8 calibration capture).
        rtc: real-time chunking (``rtc.MODES``): auto uses what the bundle's flow graph was exported with.
        """
        self.bundle = bundle if isinstance(bundle, B.Bundle) else B.Bundle.open(bundle, verify=verify)
        self.backend = backend if isinstance(backend, BackendSession) else load_backend(backend, self.bundle, **backend_options)
        self.record_feeds = record_feeds
        self._bias_memo: tuple[tuple[np.ndarray, np.ndarray], np.ndarray] | None = None  # masks -> prefill bias
        m, p = self.bundle.model, self.bundle.prompt
        self.camera_order = self.bundle.camera_order
        self.image_size = self.bundle.image_size
        self.chunk_length = int(m["chunk_length"])
        self.action_dim = int(m["action_dim"])
        self.max_action_dim = int(m["max_action_dim"])
        self.state_dim = int(m["state_dim"])
        self.n_obs_steps = int(m.get("n_obs_steps", 1))
        self.n_action_steps = int(m.get("n_action_steps", self.chunk_length))
        self.action_mode = str(m["action_mode"])  # config.action_mode: shapes the expert's cross mask
        self.discrete = m["mode"] == "discrete"  # how actions are produced: flow expert or OpenFAST tokens
        self.depth = bool(m.get("depth", False))
        self.token_ids: dict[str, int] = {k: int(v) for k, v in p["token_ids"].items()}
        self.norm = NormStats.load(self.bundle.file(p["norm_stats_file"]))
        self.tag: str = m["norm_tag"]
        self.has_state = self.norm.tag(self.tag).state_stats is not None
        tokenizer = TextTokenizer.from_file(self.bundle.file(p["tokenizer_file"]))
        layout = ImageLayout(**p["image_layout"])
        self.prompts = PromptBuilder(tokenizer, self.token_ids, layout, bucket=int(p["bucket"]))
        self.spec = PromptSpec(**p["spec"])
        self.fast = OpenFASTTokenizer.load(self.bundle.root / p["fast_tokenizer_dir"]) if self.discrete else None
        self.depth_cache = DepthCache(grid=int(round(int(m.get("num_depth_codes", 100)) ** 0.5)))
        # the depth cache's pixel work overlaps the vision and prefill graphs (numpy and onnxruntime both
        # release the GIL): one worker thread, made on the first Think frame
        self._planner: ThreadPoolExecutor | None = None
        self._cache_len = int(m.get("cache_length", p["bucket"]))
        self._context_len = int(m.get("context_length", p["bucket"]))
        self._block_len = int(m.get("block_length", 0)) if B.DECODE_BLOCK.name in self.bundle.graph_names else 0
        self.speculative_depth = True  # False: depth codes one decode_step per token (the baseline benchmarks compare)
        flow_inputs = [s["name"] for s in self.bundle.input_specs(B.FLOW.name)] if B.FLOW.name in self.bundle.graph_names else []
        exported_rtc = m.get("rtc", {}).get("mode") if "rtc_weights" in flow_inputs else None
        self.rtc = session_mode(rtc, exported_rtc)

    # --- public --------------------------------------------------------------------------

    def act(
        self,
        observation: Observation,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        prefix: CommittedPrefix | None = None,
    ) -> ActionChunk:
        """One action chunk (un-normalized, robot units) for ``observation``.

        seed: the flow noise seed (None: fresh); noise: an explicit (ah, ad) noise array instead.
        prefix: the actions the robot commits to while this chunk is computed (real-time chunking).
        """
        timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        info: dict[str, object] = {}
        start = time.perf_counter()
        observation.validate(self.camera_order, self.state_dim)
        images = [observation.images[name] for name in self.camera_order]
        depth_plan = self._plan_depth(observation) if self.depth else None
        with self._timed(timings, "vision"):
            crops = resize_cameras(images, self.image_size, self.camera_order)[None]  # (1, n, h, w, 3) uint8
            features = self._run(B.VISION.name, {"images": crops})["image_features"]
        prompt = self.build_prompt(observation)
        with self._timed(timings, "prefill"):
            pre, cache = self._run_keeping(B.PREFILL.name, self.prefill_feeds(prompt, features), CACHE_OUTPUTS)
        ctx = _Context.from_prefill(pre, cache, prompt, self._context_len)
        if depth_plan is not None:
            with self._timed(timings, "depth"):
                info.update(self._decode_depth(ctx, depth_plan))
            info.update(self.depth_cache.last_info())  # which cells, for telemetry and the rerun display
        if self.discrete:
            with self._timed(timings, "decode"):
                normalized, ok = self._decode_discrete(ctx)
            info["decode_ok"] = ok
        else:
            with self._timed(timings, "flow"):
                normalized = self._flow(ctx, seed, noise, prefix)
        actions = self._postprocess(normalized)
        timings["total"] = time.perf_counter() - start
        return ActionChunk(actions=actions, timestamp=observation.timestamp, timings=timings, info=info)

    def build_prompt(self, observation: Observation) -> Prompt:
        bins = None
        if self.has_state:
            bins = state_bins(self.norm.normalize_state(np.asarray(observation.state, dtype=np.float32), self.tag))
        return self.prompts.build(observation.task, bins, len(self.camera_order), self.spec)

    def check_task(self, task: str) -> None:
        """Raise PromptTooLongError now if ``task``'s prompt does not fit the bundle's bucket (the token count does
        not depend on the state's value), so a run refuses before the robot is touched, not at the first chunk."""
        self.build_prompt(Observation(images={}, state=np.zeros(self.state_dim, np.float32), task=task))

    def prefill_feeds(self, prompt: Prompt, features: np.ndarray) -> dict[str, np.ndarray]:
        """The prefill graph's inputs for a padded prompt and the vision graph's features."""
        t, rows = len(prompt.input_ids), features.shape[1]
        if len(prompt.image_positions) != rows:
            raise BundleError(
                f"prompt has {len(prompt.image_positions)} <im_patch> tokens but the vision graph made {rows} features"
            )
        index = np.full((1, t), rows, dtype=np.int64)  # row `rows` = "no image feature here"
        index[0, prompt.image_positions] = np.arange(rows, dtype=np.int64)
        return {
            "input_ids": prompt.input_ids[None].astype(np.int64),
            "image_features": features,
            "image_feature_index": index,
            "attention_bias": self._prefill_bias(prompt),
            "last_index": np.array([prompt.num_valid - 1], dtype=np.int64),
        }

    def _prefill_bias(self, prompt: Prompt) -> np.ndarray:
        """(1, 1, t, t) attention bias. The prompts of one task share read-only masks (``PromptBuilder``), so
        their bias is computed once; masks that could still change are never memoized."""
        masks = (prompt.attention_mask, prompt.token_type_ids)
        memo = self._bias_memo
        if memo is not None and all(a is b for a, b in zip(memo[0], masks, strict=True)):
            return memo[1]
        bias = bias_from_allowed(prefill_allowed(*masks))[None, None]
        if not any(m.flags.writeable for m in masks):
            self._bias_memo = (masks, bias)
        return bias

    def reset(self) -> None:
        """Forget per-episode state (the depth cache)."""
        self.depth_cache.reset()

    def close(self) -> None:
        if self._planner is not None:
            self._planner.shutdown(wait=True)
            self._planner = None
        self.backend.close()

    def __enter__(self) -> PolicySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stages --------------------------------------------------------------------------

    def _run(self, graph: str, feeds: Mapping[str, Feed]) -> dict[str, np.ndarray]:
        return self._run_keeping(graph, feeds, ())[0]

    def _run_keeping(
        self, graph: str, feeds: Mapping[str, Feed], keep: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, Resident]]:
        """Run ``graph``; those of ``keep`` it outputs stay in the backend (the decoder cache, fed back next call)."""
        if self.record_feeds is not None:
            self.record_feeds(graph, {k: v.numpy() if isinstance(v, Resident) else v for k, v in feeds.items()})
        if keep:  # a continuous bundle's prefill has no decoder cache to keep
            outputs = {spec.name for spec in self.backend.specs(graph)[1]}
            keep = [name for name in keep if name in outputs]
        return self.backend.run_keeping(graph, feeds, keep)

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        yield
        timings[stage] += time.perf_counter() - t0

    def _step(self, ctx: _Context, token: int) -> np.ndarray:
        """Feed one token through decode_step; append its K/V and expert context; return its logits."""
        pos = ctx.length
        if pos >= self._cache_len:
            raise BundleError(f"decode ran past the bundle's cache length {self._cache_len}; re-export with a larger budget")
        allowed = np.zeros(self._cache_len, dtype=bool)
        allowed[: pos + 1] = ctx.cache_valid[: pos + 1]
        allowed[pos] = True
        out, cache = self._run_keeping(
            B.DECODE_STEP.name,
            {
                "input_id": np.array([[token]], dtype=np.int64),
                "position": np.array([pos], dtype=np.int64),
                **ctx.cache_feeds(),
                "cache_bias": bias_from_allowed(allowed)[None, None, None],
            },
            CACHE_OUTPUTS_UPDATED,
        )
        ctx.append(token, out, cache)
        return out["logits"][0]

    @property
    def _depth_camera(self) -> str:
        return self.camera_order[0]  # the "main image" of the depth question

    def _plan_depth(self, observation: Observation) -> Future[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        """The depth cache's plan for this frame (cell vectors, previous codes, changed cells), started on the
        worker thread; the cache is only read there, and written after the result is taken."""
        if self._planner is None:
            self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="depth-cache")
        camera = self._depth_camera
        return self._planner.submit(self.depth_cache.plan, camera, observation.images[camera])

    def _decode_depth(
        self, ctx: _Context, plan: Future[tuple[np.ndarray, np.ndarray | None, np.ndarray]]
    ) -> dict[str, int]:
        """<depth_start>, one code per cell (re-predicted or replayed), then greedy until <depth_end>;
        speculative block calls with the cached codes as drafts (``depth_decode``). Returns the frame's stats."""
        cells, previous, changed = plan.result()
        result = decode_depth(
            _ContextDecoder(self, ctx),
            DepthTokens.from_ids(self.token_ids),
            previous,
            changed,
            tail_budget=max(8, self.chunk_length),
            speculative=self.speculative_depth,
        )
        self.depth_cache.update(self._depth_camera, cells, result.codes, changed)
        if B.EXPERT_CONTEXT.name in self.bundle.graph_names:  # the depth gate needs the depth tokens first
            self._gated_context(ctx)
        return result.stats.info()

    def _gated_context(self, ctx: _Context) -> None:
        """Replace the expert context with the ``expert_context`` graph's: the depth gate applied over all of it."""
        ids, valid = ctx.ids(), ctx.cache_valid[: self._context_len]
        out = self._run(
            B.EXPERT_CONTEXT.name,
            {
                **ctx.cache_feeds(),
                "context_valid": cross_attention_valid(ids, valid, self.token_ids, self.action_mode)[None],
                "depth_mask": (depth_token_mask(ids, self.token_ids) & valid)[None],
            },
        )
        ctx.context_k, ctx.context_v = out["context_k"], out["context_v"]

    def _decode_discrete(self, ctx: _Context) -> tuple[np.ndarray, bool]:
        """Greedy decoding to eos (at most 16 * ah tokens), then OpenFAST on the action span (§4.14)."""
        ids, fast = self.token_ids, self.fast
        assert fast is not None
        generated: list[int] = []
        logits = ctx.last_logits
        if logits is None:
            raise BundleError("this bundle's prefill graph returns no logits: it was exported without decoding")
        for _ in range(16 * self.chunk_length):
            token = int(np.argmax(logits))
            generated.append(token)
            if token == ids["eos_token_id"] or ctx.length >= self._cache_len:
                break
            logits = self._step(ctx, token)
        span = action_span(generated, ids["action_start_token_id"], ids["action_end_token_id"])
        bpe = llm_to_fast_ids(span, ids["action_token_start_id"], ids["num_action_tokens"])
        chunk, ok = fast.decode(bpe, time_horizon=self.chunk_length, action_dim=self.action_dim)
        padded = np.zeros((self.chunk_length, self.max_action_dim), dtype=np.float32)
        padded[:, : self.action_dim] = chunk
        return padded, ok

    def _flow(
        self, ctx: _Context, seed: int | None, noise: np.ndarray | None, prefix: CommittedPrefix | None
    ) -> np.ndarray:
        shape = (self.chunk_length, self.max_action_dim)
        noise = flow_noise(seed, shape) if noise is None else np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise ObservationError(f"noise: expected shape {shape}, got {noise.shape}")
        valid = cross_attention_valid(ctx.ids(), ctx.cache_valid[: self._context_len], self.token_ids, self.action_mode)
        dim_mask = (np.arange(self.max_action_dim) < self.action_dim).astype(np.float32)
        feeds = {
            "noise": noise[None],
            "context_k": ctx.context_k,
            "context_v": ctx.context_v,
            "cross_bias": bias_from_allowed(valid)[None, None, None],
            "action_dim_mask": dim_mask[None, None],
        }
        if self.rtc is not None:  # the graph takes a prefix (zeros when none is committed or RTC is off)
            values, weights = prefix_inputs(
                prefix, self.rtc, self.norm, self.tag, *shape, first=self.n_obs_steps - 1
            )
            feeds["rtc_prefix"], feeds["rtc_weights"] = values[None], weights[None]
        return self._run(B.FLOW.name, feeds)["actions"][0]

    def _postprocess(self, normalized: np.ndarray) -> np.ndarray:
        start = self.n_obs_steps - 1
        chunk = normalized[start : start + self.n_action_steps, : self.action_dim]
        return self.norm.unnormalize_action(chunk, self.tag).astype(np.float32)


class _ContextDecoder:
    """``depth_decode.Decoder`` over one ``act``'s context: ``decode_step`` and ``decode_block`` calls."""

    def __init__(self, session: PolicySession, ctx: _Context) -> None:
        self.session, self.ctx = session, ctx
        self.block_length = session._block_len

    def step(self, token: int) -> np.ndarray:
        return self.session._step(self.ctx, token)

    def block(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        ctx, k, n = self.ctx, self.block_length, len(tokens)
        start, cache_len = ctx.length, self.session._cache_len
        if not 0 < n <= k or start + k > cache_len:
            raise BundleError(f"decode_block: {n} token(s) at slot {start} do not fit k={k} / cache length {cache_len}")
        ids = np.zeros((1, k), dtype=np.int64)
        ids[0, :n] = tokens
        allowed = np.repeat(ctx.cache_valid[None, :cache_len], k, axis=0)  # (k, tm): every earlier valid slot
        allowed[:, start : start + k] |= np.tril(np.ones((k, k), dtype=bool))  # causal inside the block
        out, cache = self.session._run_keeping(
            B.DECODE_BLOCK.name,
            {
                "input_ids": ids,
                "positions": np.arange(start, start + k, dtype=np.int64)[None],
                **ctx.cache_feeds(),
                "block_bias": bias_from_allowed(allowed)[None, None],
                "last_index": np.array([n - 1], dtype=np.int64),
            },
            CACHE_OUTPUTS_UPDATED,
        )
        ctx.append_block(tokens, out, cache)
        return out["depth_argmax"][0, :n], out["token_argmax"][0, :n]

    def drop(self, count: int) -> None:
        self.ctx.drop(count)


class _Context:
    """The growing decoder state of one ``act``: cache, expert context, ids and their validity."""

    def __init__(
        self,
        cache_k: Feed | None,
        cache_v: Feed | None,
        context_k: np.ndarray,
        context_v: np.ndarray,
        ids: np.ndarray,
        valid: np.ndarray,
        length: int,
        last_logits: np.ndarray | None,
    ) -> None:
        self.cache_k, self.cache_v = cache_k, cache_v
        self.context_k, self.context_v = context_k, context_v
        self._ids, self.cache_valid, self.length, self.last_logits = ids, valid, length, last_logits

    @classmethod
    def from_prefill(
        cls, pre: Mapping[str, np.ndarray], cache: Mapping[str, Resident], prompt: Prompt, context_len: int
    ) -> _Context:
        """Prefill outputs -> buffers of the context length (bucket, or bucket + decode budget for Think).
        A continuous bundle's prefill has no logits or cache (nothing decodes): those stay None."""
        t = len(prompt.input_ids)
        tm = cache["cache_k"].shape[3] if "cache_k" in cache else t
        l_, b, _, e = pre["context_k"].shape
        context_k = np.zeros((l_, b, context_len, e), dtype=pre["context_k"].dtype)
        context_v = np.zeros_like(context_k)
        context_k[:, :, :t], context_v[:, :, :t] = pre["context_k"], pre["context_v"]
        ids = np.zeros(max(tm, context_len), dtype=np.int64)
        ids[:t] = prompt.input_ids
        valid = np.zeros(max(tm, context_len), dtype=bool)
        valid[:t] = prompt.attention_mask
        # Decoding continues right after the last real prompt token; pad slots are overwritten.
        logits = pre["logits"][0] if "logits" in pre else None
        return cls(cache.get("cache_k"), cache.get("cache_v"), context_k, context_v, ids, valid, prompt.num_valid, logits)

    def ids(self) -> np.ndarray:
        return self._ids[: self.context_k.shape[2]]

    def cache_feeds(self) -> dict[str, Feed]:
        """The decoder cache as graph inputs (only bundles that decode have one)."""
        if self.cache_k is None or self.cache_v is None:
            raise BundleError("this bundle's prefill graph returns no decoder cache: it was exported without decoding")
        return {"cache_k": self.cache_k, "cache_v": self.cache_v}

    def append(self, token: int, out: Mapping[str, np.ndarray], cache: Mapping[str, Resident]) -> None:
        pos = self.length
        self.cache_k, self.cache_v = cache["cache_k_out"], cache["cache_v_out"]
        if pos < self.context_k.shape[2]:
            self.context_k[:, :, pos] = out["context_k"][:, :, 0]
            self.context_v[:, :, pos] = out["context_v"][:, :, 0]
        self._ids[pos], self.cache_valid[pos] = token, True
        self.length = pos + 1
        self.last_logits = out["logits"][0]

    def append_block(
        self, tokens: Sequence[int], out: Mapping[str, np.ndarray], cache: Mapping[str, Resident]
    ) -> None:
        """A decode_block call's outputs: its real tokens become valid slots (the padding stays invalid)."""
        start, n = self.length, len(tokens)
        self.cache_k, self.cache_v = cache["cache_k_out"], cache["cache_v_out"]
        inside = max(0, min(n, self.context_k.shape[2] - start))  # slots past the context are scratch
        self.context_k[:, :, start : start + inside] = out["context_k"][:, :, :inside]
        self.context_v[:, :, start : start + inside] = out["context_v"][:, :, :inside]
        self._ids[start : start + n], self.cache_valid[start : start + n] = tokens, True
        self.length = start + n
        self.last_logits = out["logits"][0]

    def drop(self, count: int) -> None:
        """Forget the last ``count`` tokens (a rejected draft and what followed it); the slots are free again."""
        self.length -= count
        self.cache_valid[self.length : self.length + count] = False


def describe(bundle: B.Bundle) -> dict[str, Any]:
    """A summary of a bundle for ``molmo-edge inspect``: graphs, shapes, precisions, parity, engines."""
    m = bundle.manifest
    return {
        "path": str(bundle.root),
        "schema_version": m["schema_version"],
        "source": m["source"],
        "model": m["model"],
        "prompt_bucket": m["prompt"]["bucket"],
        "cameras": m["cameras"],
        "robot_contract": bundle.contract.to_dict(),
        "artifacts": m["artifacts"],
        "parity": m.get("parity"),
        "engines": m.get("engines", {}),
        "toolchain": m["toolchain"],
        "bytes": sum(int(f["bytes"]) for f in m["files"].values()),
    }
