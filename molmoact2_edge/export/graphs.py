"""The bundle's four graphs as ``nn.Module`` wrappers with static shapes, built from a MolmoAct2 model.

Each wrapper's ``forward`` takes exactly the inputs named in ``runtimes/bundle.py``
(``VISION``, ``PREFILL``, ``DECODE_STEP``, ``FLOW``) in that order and returns its
outputs in order, so ``torch.onnx.export`` and the ``torch`` backend run the same
module. Shapes are fixed by ``GraphShapes`` (cameras, bucket, cache and context
lengths, chunk length); nothing is data-dependent, so no If/Loop nodes appear.

- ``vision``: uint8 crops (b, n, h, w, 3) -> pooled features (b, n*q, d).
- ``prefill``: ids padded to the bucket + image features added at their positions
  (a gather, not a scatter: TensorRT-friendly) + additive bias -> last-token logits,
  the expert's projected context K/V (the three-stage seam) and the decoder cache
  padded to its static length.
- ``decode_step``: one token against the static cache (written with ``index_copy``
  and returned, never mutated) -> logits, new cache, this token's projected context.
- ``decode_block`` (Think bundles): k tokens at once the same way -> per-token argmaxes
  (depth rows, whole vocabulary), one token's logits, new cache, the k projected contexts.
- ``expert_context`` (Think bundles with the expert's depth gate): the cache -> the whole
  expert context with the gate applied (it needs the depth tokens, so it runs after them).
- ``flow``: every Euler step unrolled, the accumulator in fp32 even when the expert
  runs in fp16 (``FlowGraph(dtype=torch.float16)``, ``model/flow.py``), with real-time
  chunking inside the loop (``model/rtc_flow.py``): a committed prefix and its weights
  come in as two more fixed-shape inputs; zero weights give the plain flow's chunk.

Shape legend: b batch, n cameras, h w pixels, q pooled tokens per camera, t bucket,
tm cache length, tc context length, k block length, l layers, kh KV heads, hd head dim, d LLM width,
e expert width, v vocabulary, ah chunk length, ad max action dim.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.errors import ExportError
from molmoact2_edge.model.action_expert import ActionExpert
from molmoact2_edge.model.connector import VisionBackbone
from molmoact2_edge.model.flow import euler_sample
from molmoact2_edge.model.llm import LLM
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.model.rtc_flow import EXPORTABLE_VJP, rtc_sample
from molmoact2_edge.runtimes import bundle as B

BATCH = 1  # bundles are batch 1: one robot, one observation per call


@dataclass(frozen=True)
class GraphShapes:
    """Every static dimension of a bundle, derived once at export and recorded in the manifest."""

    num_cameras: int
    image_size: tuple[int, int]
    bucket: int  # t: prompt tokens, right-padded
    cache_length: int  # tm: bucket + decode budget (= bucket when nothing is decoded)
    context_length: int  # tc: positions the expert attends to (bucket, or tm for Think bundles)
    chunk_length: int  # ah
    pooled_per_camera: int  # q
    block_length: int = 0  # k: tokens per decode_block call (Think bundles; 0 = no decode_block graph)

    def example_inputs(self, config: MolmoAct2Config) -> dict[str, tuple[torch.Tensor, ...]]:
        """Zero-valued example inputs of every graph (export traces shapes and dtypes only)."""
        tc, l_ = config.text_config, config.text_config.num_hidden_layers
        assert config.action_expert_config is not None
        e = config.action_expert_config.hidden_size
        h, w = self.image_size
        rows = self.num_cameras * self.pooled_per_camera
        cache = torch.zeros(l_, BATCH, tc.num_key_value_heads, self.cache_length, tc.head_dim)
        ctx = torch.zeros(l_, BATCH, self.context_length, e)
        return {
            B.VISION.name: (torch.zeros(BATCH, self.num_cameras, h, w, 3, dtype=torch.uint8),),
            B.PREFILL.name: (
                torch.zeros(BATCH, self.bucket, dtype=torch.int64),
                torch.zeros(BATCH, rows, tc.hidden_size),
                torch.full((BATCH, self.bucket), rows, dtype=torch.int64),
                torch.zeros(BATCH, 1, self.bucket, self.bucket),
                torch.zeros(BATCH, dtype=torch.int64),
            ),
            B.DECODE_STEP.name: (
                torch.zeros(BATCH, 1, dtype=torch.int64),
                torch.zeros(BATCH, dtype=torch.int64),
                cache,
                cache.clone(),
                torch.zeros(BATCH, 1, 1, self.cache_length),
            ),
            B.DECODE_BLOCK.name: (
                torch.zeros(BATCH, self.block_length, dtype=torch.int64),
                torch.arange(self.block_length)[None],
                cache,
                cache.clone(),
                torch.zeros(BATCH, 1, self.block_length, self.cache_length),
                torch.zeros(BATCH, dtype=torch.int64),
            ),
            B.EXPERT_CONTEXT.name: (
                cache,
                cache.clone(),
                torch.ones(BATCH, self.context_length, dtype=torch.bool),
                torch.zeros(BATCH, self.context_length, dtype=torch.bool),
            ),
            B.FLOW.name: (
                torch.zeros(BATCH, self.chunk_length, config.max_action_dim),
                ctx,
                ctx.clone(),
                torch.zeros(BATCH, 1, 1, self.context_length),
                torch.ones(BATCH, 1, config.max_action_dim),
                torch.zeros(BATCH, self.chunk_length, config.max_action_dim),
                torch.zeros(BATCH, self.chunk_length),
            ),
        }


class VisionGraph(nn.Module):
    """``vision``: the vision backbone (ViT, 2x2 attention pooling, projector) on uint8 crops."""

    def __init__(self, backbone: VisionBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (b, n*q, d)


class PrefillGraph(nn.Module):
    """``prefill``: embeddings + image features -> LLM over the bucket -> logits, expert context, static cache.

    decoding False (a continuous bundle): only the expert context; nothing reads the logits or the cache.
    """

    def __init__(
        self, llm: LLM, lm_head: nn.Linear, expert: ActionExpert, cache_length: int, decoding: bool = True
    ) -> None:
        super().__init__()
        self.llm, self.lm_head, self.expert = llm, lm_head, expert
        self.cache_length, self.decoding = cache_length, decoding

    def forward(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        image_feature_index: torch.Tensor,
        attention_bias: torch.Tensor,
        last_index: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        b, t = input_ids.shape
        d = image_features.shape[-1]
        embeds = self.llm.wte(input_ids)  # (b, t, d)
        # Row n*q of the padded table is zeros: positions without an image feature add nothing.
        table = torch.cat([image_features, image_features.new_zeros(b, 1, d)], dim=1)  # (b, n*q+1, d)
        embeds = embeds + torch.gather(table, 1, image_feature_index[..., None].expand(b, t, d))
        positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        hidden, keys, values = self.llm(embeds, positions, attention_bias)  # keys (l, b, kh, t, hd)
        context_k, context_v = self.expert.project_context(keys, values)  # (l, b, t, e)
        if not self.decoding:
            return context_k, context_v
        last = torch.gather(hidden, 1, last_index[:, None, None].expand(b, 1, d))[:, 0]  # (b, d)
        logits = self.lm_head(last)  # (b, v)
        pad = (0, 0, 0, self.cache_length - t)  # grow the time axis to the static cache length
        return logits, context_k, context_v, F.pad(keys, pad), F.pad(values, pad)


class DecodeStepGraph(nn.Module):
    """``decode_step``: one token against the static cache (batch 1: ``position`` is also the cache slot)."""

    def __init__(self, model: MolmoAct2) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_id: torch.Tensor,
        position: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        cache_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        logits, keys, values = self.model.decode_step(input_id, position[:, None], position, cache_k, cache_v, cache_bias)
        new_k = keys.index_select(3, position)  # (l, b, kh, 1, hd): this token's K, post-norm and RoPE
        new_v = values.index_select(3, position)
        expert: ActionExpert = self.model.model.action_expert
        context_k, context_v = expert.project_context(new_k, new_v)  # (l, b, 1, e)
        return logits[:, -1], keys, values, context_k, context_v


class DecodeBlockGraph(nn.Module):
    """``decode_block``: k tokens against the static cache in one call (batch 1), for the Think depth codes.

    The caller's bias says which slots each token sees (causal inside the block); padding tokens are
    written too and simply never marked valid. Argmaxes are taken in the graph so a call returns
    O(k) integers instead of k x v logits (``runtimes.depth_decode`` verifies drafts with them).
    Only the depth-code rows of the LM head run for every token; the whole vocabulary only after the
    last two real tokens (the last code and the ``<depth_end>`` draft: the only places the verifier
    reads it), -1 elsewhere. The full head over all k tokens was ~40 % of a call on so101-touch-think.
    """

    def __init__(self, model: MolmoAct2) -> None:
        super().__init__()
        self.model = model
        first, count = model.config.require_token_ids("depth_token_start_id", "num_depth_tokens")
        self.depth_rows = (first, first + count)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        block_bias: torch.Tensor,
        last_index: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        slots = positions[0]  # (k,): batch 1, positions are the cache slots
        embeds = self.model.embed_tokens(input_ids)
        hidden, keys, values = self.model.model.transformer(embeds, positions, block_bias, cache_k, cache_v, slots)
        b, k, e = hidden.shape
        lo, hi = self.depth_rows
        head = self.model.lm_head.weight  # (v, e), no bias
        depth_argmax = F.linear(hidden, head[lo:hi]).argmax(-1)  # (b, k) code index
        tail = torch.stack([(last_index - 1).clamp(min=0), last_index], dim=1)  # (b, 2)
        tail_logits = F.linear(torch.gather(hidden, 1, tail[..., None].expand(b, 2, e)), head)  # (b, 2, v)
        tail_argmax = tail_logits.argmax(-1)  # (b, 2)
        index = torch.arange(k, device=hidden.device)[None]  # (1, k)
        none = torch.full_like(depth_argmax, -1)
        token_argmax = torch.where(index == tail[:, 1:], tail_argmax[:, 1:], torch.where(index == tail[:, :1], tail_argmax[:, :1], none))
        expert: ActionExpert = self.model.model.action_expert
        context_k, context_v = expert.project_context(keys.index_select(3, slots), values.index_select(3, slots))
        return depth_argmax, token_argmax, tail_logits[:, 1], keys, values, context_k, context_v


class ExpertContextGraph(nn.Module):
    """``expert_context`` (Think bundles with ``action_expert_depth_gate``): the expert's context over the cache.

    The gate (per layer, or from the last layer, as released) pools V over every valid non-depth
    position and scales K and V at depth positions before the projection, so it can only be applied
    once the depth tokens are in the cache: this graph re-projects the first tc slots with it.
    """

    def __init__(self, model: MolmoAct2, context_length: int) -> None:
        super().__init__()
        self.model, self.context_length = model, context_length

    def forward(
        self, cache_k: torch.Tensor, cache_v: torch.Tensor, context_valid: torch.Tensor, depth_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tc = self.context_length
        return self.model.expert_context(cache_k[:, :, :, :tc], cache_v[:, :, :, :tc], context_valid, depth_mask)


class FlowGraph(nn.Module):
    """``flow``: N Euler steps of the expert, unrolled; the accumulator is fp32 whatever ``dtype`` is.

    dtype float16 runs a COPY of the expert in fp16 (the reference model stays fp32): the velocity
    is computed in fp16 and cast to fp32 before each Euler update (``model/flow.py``).
    rtc: how the committed prefix enters (``model/rtc_flow.py``): ``inference`` guides every step
    (``EXPORTABLE_VJP``, one extra expert pass per step), ``training`` pins it at flow time 1 (for
    checkpoints trained with ``rtc_max_delay``), ``off`` ignores it (the plain flow).
    """

    def __init__(
        self,
        expert: nn.Module,
        num_steps: int,
        mask_padding: bool,
        dtype: torch.dtype = torch.float32,
        rtc: str = "off",
    ) -> None:
        super().__init__()
        self.expert = expert if dtype == torch.float32 else copy.deepcopy(expert).to(dtype)
        self.num_steps, self.mask_padding, self.dtype, self.rtc = num_steps, mask_padding, dtype, rtc

    def forward(
        self,
        noise: torch.Tensor,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
        cross_bias: torch.Tensor,
        action_dim_mask: torch.Tensor,
        rtc_prefix: torch.Tensor | None = None,
        rtc_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """None for the RTC inputs: a bundle exported before RTC, run eagerly by the torch backend."""
        ctx_k, ctx_v = context_k.to(self.dtype), context_v.to(self.dtype)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.expert(x, t, ctx_k, ctx_v, cross_bias)

        mask = action_dim_mask if self.mask_padding else None
        if rtc_prefix is None or rtc_weights is None or self.rtc == "off":
            return euler_sample(velocity, noise, self.num_steps, mask)  # (b, ah, ad) fp32
        return rtc_sample(self.rtc, velocity, noise, self.num_steps, rtc_prefix, rtc_weights, mask, vjp=EXPORTABLE_VJP)


def rtc_mode(config: MolmoAct2Config, requested: str = "auto") -> str:
    """How the exported flow graph takes a committed prefix: ``training`` (conditioned) for a checkpoint trained
    with it; ``inference`` (guided, one extra expert pass per Euler step) only when ``requested``; else ``off``,
    the plain flow, its two prefix inputs present and unused (one graph signature for every bundle)."""
    if config.rtc_max_delay > 0:
        return "training"
    return "inference" if requested == "inference" else "off"


def build_graphs(
    model: MolmoAct2,
    shapes: GraphShapes,
    with_decode: bool,
    with_flow: bool = True,
    rtc: str | None = None,
    prefill_decoding: bool | None = None,
) -> dict[str, nn.Module]:
    """name -> wrapper module for every graph the bundle holds: ``decode_step`` only when tokens are decoded,
    ``flow`` only when actions come from the expert (not for discrete bundles); rtc: the flow graph's mode
    (None: ``rtc_mode(config)``); prefill_decoding: whether prefill returns logits and cache (None: with_decode;
    a bundle exported before continuous prefills dropped them has them without decoding)."""
    config = model.config
    if not config.add_action_expert:
        raise ExportError("the checkpoint has no action expert (add_action_expert=false); nothing to export")
    inner = model.model
    graphs: dict[str, nn.Module] = {
        B.VISION.name: VisionGraph(inner.vision_backbone),
        B.PREFILL.name: PrefillGraph(
            inner.transformer, model.lm_head, inner.action_expert, shapes.cache_length,
            decoding=with_decode if prefill_decoding is None else prefill_decoding,
        ),
    }
    if with_decode:
        graphs[B.DECODE_STEP.name] = DecodeStepGraph(model)
    if shapes.block_length:
        graphs[B.DECODE_BLOCK.name] = DecodeBlockGraph(model)
        if config.action_expert_depth_gate:  # without depth tokens (not Think) the gate scales nothing
            graphs[B.EXPERT_CONTEXT.name] = ExpertContextGraph(model, shapes.context_length)
    if with_flow:
        graphs[B.FLOW.name] = FlowGraph(
            inner.action_expert, config.flow_matching_num_steps, config.mask_action_dim_padding, rtc=rtc or rtc_mode(config)
        )
    return {k: g.eval() for k, g in graphs.items()}
