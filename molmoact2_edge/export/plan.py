"""``molmo-edge plan``: a roofline lower bound per stage and the memory a model needs, on named devices.

A bound, not a measurement. Each stage costs at least ``max(FLOPs / peak compute,
bytes / peak bandwidth)`` on a device; the larger term says whether the stage is
``compute``- or ``memory``-bound. FLOPs and bytes come from the model config
(``MolmoAct2Config``), counted per GEMM the graphs run:

- ``vision``: patch embedding, the ViT blocks the adapter reads, 2x2 attention pooling
  and the projector, per camera; weights read once.
- ``prefill``: every LLM block over the prompt (full attention; causal masking is not
  credited) and the expert's context K/V projections. The full-vocabulary ``lm_head`` is
  counted only where something reads the logits (discrete bundles); a continuous chunk
  never does.
- ``flow``: per Euler step the expert blocks over the chunk (self-attention over the
  chunk, cross-attention over the context), weights and the context K/V read once per
  step. The adaLN modulation depends only on the flow time, which is fixed per unrolled
  step, so it is folded (no weight reads at run time).
- ``depth_step``: one decode token through the LLM (weights, the full ``lm_head`` and the
  KV cache read). ``depth_full`` = ``num_depth_codes + 3`` sequential steps: the depth stage
  without the cache, every code predicted in the reference order.
- ``depth_block``: one ``decode_block`` call, the frame's whole depth span (``num_depth_codes + 2``
  tokens) in one pass: weights read once, the depth-code rows of the head for every token and
  the full vocabulary for the last two, the block's expert context. ``depth_cached`` = ``1 +
  depth_rejections`` block calls: what the runtime's exact speculative decoding costs with the
  cache (``runtimes/depth_decode.py``), where a rejection is a changed cell whose code differs
  from its draft. ``think_vs_continuous`` is the Think path's bound over the continuous one, and
  ``max_rejections_for_1_3x`` how many rejections per frame keep it within 1.3x.

Precisions: weights take 2 (bf16/fp16), 1 (fp8/int8) or 0.5 (int4, plus one fp16 scale
per block of 32) bytes; activations 2 bytes (1 for fp8). Compute runs at the device's
dense peak for the precision: int4 weights are counted at the int8 peak (W4A8), fp8 where
the device has it. Device peaks are dense (NVIDIA quotes Orin's INT8 TOPS with 2:4
sparsity; dense is half), with their sources in ``DEVICES``; the derivation and its
check against an independent estimate is in ``../shared/reference/deployment-2026-12.md`` §4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molmoact2_edge.config import MolmoAct2Config, get_preset, preset_names
from molmoact2_edge.errors import ConfigError

PRECISIONS = ("bf16", "fp16", "fp8", "int8", "int4")
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 2 / 32}
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 2, "int4": 2}
COMPUTE_CLASS = {"bf16": "fp16", "fp16": "fp16", "fp8": "fp8", "int8": "int8", "int4": "int8"}
DEPTH_MARKERS = 3  # <depth_start>, <depth_end> and the token after the codes
# drafts rejected per frame: so101-touch-think on sim episodes at 10 Hz (benchmarks/think_depth.py, 6.8 block calls
# per frame); a plan's default until the release is measured on real frames
DEPTH_REJECTIONS = 5.8
THINK_RATIO_GOAL = 1.3  # issue 12: Think act() at most 1.3x the continuous act()
DEFAULT_TEXT_TOKENS = 84  # task + state + template tokens of a typical robot prompt (reference §4)


@dataclass(frozen=True)
class Device:
    """Public dense peaks of one device. ``tops`` maps a compute class (fp16, fp8, int8) to dense T(FL)OPS."""

    name: str
    label: str
    tops: dict[str, float]
    bandwidth_gbs: float
    memory_gb: float
    reserved_gb: float  # what the OS and runtime keep (Jetsons share memory with the CPU)
    source: str

    def peak(self, precision: str) -> tuple[float, str]:
        """(dense peak in FLOP/s, the compute class used) for ``precision``; fp8 falls back to fp16 where absent."""
        wanted = COMPUTE_CLASS[precision]
        used = wanted if wanted in self.tops else "fp16"
        return self.tops[used] * 1e12, used


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            "orin-nano-8gb", "Jetson Orin Nano 8 GB (Super, MAXN_SUPER)", {"int8": 33.5, "fp16": 16.75}, 102.0, 8.0, 1.5,
            "NVIDIA Jetson Orin Nano Super developer kit: 67 sparse INT8 TOPS, 102 GB/s LPDDR5",
        ),
        Device(
            "orin-nx-16gb", "Jetson Orin NX 16 GB (MAXN)", {"int8": 50.0, "fp16": 25.0}, 102.4, 16.0, 2.0,
            "NVIDIA Jetson Orin NX 16GB module data sheet: 100 sparse INT8 TOPS (157 Super), 102.4 GB/s",
        ),
        Device(
            "agx-orin-64gb", "Jetson AGX Orin 64 GB (MAXN)", {"int8": 85.0, "fp16": 42.5}, 204.8, 64.0, 3.0,
            "NVIDIA Jetson AGX Orin series data sheet: 275 sparse INT8 TOPS incl. DLA; GPU 170 sparse, 204.8 GB/s",
        ),
        Device(
            "thor", "Jetson AGX Thor (T5000)", {"fp8": 517.0, "int8": 517.0, "fp16": 259.0}, 273.0, 128.0, 4.0,
            "NVIDIA Jetson Thor: 2070 sparse FP4 TFLOPS = 517 dense FP8, 273 GB/s LPDDR5X, 128 GB",
        ),
        Device(
            "rtx-4090", "GeForce RTX 4090", {"fp8": 330.3, "int8": 660.6, "fp16": 165.2}, 1008.0, 24.0, 1.0,
            "NVIDIA Ada Lovelace architecture whitepaper: 165.2 dense FP16 (FP32 acc.), 330 FP8, 1008 GB/s",
        ),
        Device(
            "h100", "H100 SXM5 80 GB", {"fp8": 1979.0, "int8": 1979.0, "fp16": 989.4}, 3350.0, 80.0, 1.0,
            "NVIDIA H100 Tensor Core GPU data sheet: 989 dense BF16, 1979 dense FP8/INT8, 3.35 TB/s HBM3",
        ),
        Device(
            "dev-cpu", "this dev machine: 2-vCPU Xeon (AVX-512 VNNI), 1 thread", {"int8": 0.55, "fp16": 0.16}, 5.0, 24.0, 4.0,
            "measured here (issue 11): fp32 GEMM 150-170 GFLOP/s, MatMulInteger 522-594 GOP/s, ~5 GB/s numpy copy (fp32 peak stands in for fp16)",
        ),
    )
}


@dataclass(frozen=True)
class Workload:
    """The static shapes a plan is made for (a bundle's, or defaults for a checkpoint or preset)."""

    cameras: int = 2
    prompt_tokens: int = 0  # 0: cameras * (pooled tokens + 2) + DEFAULT_TEXT_TOKENS
    chunk_length: int = 0  # 0: the config's max_action_horizon
    flow_steps: int = 0  # 0: the config's flow_matching_num_steps
    depth_rejections: float = DEPTH_REJECTIONS  # drafts rejected per frame: each costs one more block call
    logits: bool = False  # prefill computes full-vocabulary logits (discrete bundles read them)

    def resolve(self, config: MolmoAct2Config) -> Workload:
        tokens = self.prompt_tokens or self.cameras * (config.tokens_per_image + 2) + DEFAULT_TEXT_TOKENS
        return Workload(
            self.cameras,
            tokens,
            self.chunk_length or config.max_action_horizon,
            self.flow_steps or config.flow_matching_num_steps,
            self.depth_rejections,
            self.logits,
        )


@dataclass
class Cost:
    """FLOPs and bytes of one stage (``weights`` counted in parameters, priced per precision later)."""

    flops: float = 0.0
    weights: float = 0.0  # parameters read
    activations: float = 0.0  # activation values read or written from/to memory (caches, context)
    parts: dict[str, float] = field(default_factory=dict)

    def gemm(self, name: str, tokens: int, k: int, n: int, reads: int = 1) -> None:
        """A (tokens x k) @ (k x n) GEMM whose weight is read ``reads`` times."""
        self.flops += 2.0 * tokens * k * n
        self.weights += reads * k * n
        self.parts[name] = self.parts.get(name, 0.0) + k * n

    def attention(self, heads_dim: int, q_tokens: int, k_tokens: int) -> None:
        """Q.K^T and P.V of ``q_tokens`` queries over ``k_tokens`` keys, width ``heads_dim``."""
        self.flops += 4.0 * q_tokens * k_tokens * heads_dim


def vision_cost(config: MolmoAct2Config, cameras: int) -> Cost:
    v, a = config.vit_config, config.adapter_config
    p, m = v.image_num_pos, config.tokens_per_image
    cost = Cost()
    inner = v.num_attention_heads * v.head_dim
    tokens = cameras * p
    cost.gemm("patch_embedding", tokens, v.patch_dim, v.hidden_size)
    for _ in range(config.num_vit_blocks):
        cost.gemm("vit_qkv", tokens, v.hidden_size, 3 * inner)
        cost.gemm("vit_out", tokens, inner, v.hidden_size)
        cost.gemm("vit_mlp", tokens, v.hidden_size, 2 * v.intermediate_size)  # w1 and w2 have the same size
        for _ in range(cameras):
            cost.attention(inner, p, p)
    d_in, pool_inner = a.hidden_size * len(a.vit_layers), a.num_attention_heads * a.head_dim
    pooled = cameras * m
    cost.gemm("pool_q", pooled, d_in, pool_inner)
    cost.gemm("pool_kv", 4 * pooled, d_in, 2 * pool_inner)
    cost.gemm("pool_out", pooled, pool_inner, a.hidden_size)
    cost.gemm("projector_in", pooled, a.hidden_size, 2 * a.intermediate_size)
    cost.gemm("projector_out", pooled, a.intermediate_size, a.text_hidden_size)
    return cost


def _llm_blocks(cost: Cost, config: MolmoAct2Config, tokens: int, keys: int) -> None:
    t = config.text_config
    for _ in range(t.num_hidden_layers):
        cost.gemm("llm_qkv", tokens, t.hidden_size, t.q_dim + 2 * t.kv_dim)
        cost.gemm("llm_out", tokens, t.q_dim, t.hidden_size)
        cost.gemm("llm_mlp_in", tokens, t.hidden_size, 2 * t.intermediate_size)
        cost.gemm("llm_mlp_out", tokens, t.intermediate_size, t.hidden_size)
        cost.attention(t.q_dim, tokens, keys)


def _expert_width(config: MolmoAct2Config) -> int:
    if config.action_expert_config is None:
        raise ConfigError("plan: the config has no action expert (add_action_expert=false)")
    return config.action_expert_config.hidden_size


def prefill_cost(config: MolmoAct2Config, work: Workload) -> Cost:
    t, e = config.text_config, _expert_width(config)
    cost = Cost()
    _llm_blocks(cost, config, work.prompt_tokens, work.prompt_tokens)
    cost.gemm("context_kv_proj", t.num_hidden_layers * work.prompt_tokens, t.kv_dim, 2 * e)
    if work.logits:
        cost.gemm("lm_head", 1, t.hidden_size, t.vocab_size)
    # written: the decoder cache and the expert context
    cost.activations += t.num_hidden_layers * work.prompt_tokens * 2 * (t.kv_dim + e)
    return cost


def flow_cost(config: MolmoAct2Config, work: Workload) -> Cost:
    x = config.action_expert_config
    e = _expert_width(config)
    assert x is not None
    steps, ah = work.flow_steps, work.chunk_length
    cost = Cost()
    cost.gemm("action_embed", steps * ah, config.max_action_dim, e, reads=steps)
    for _ in range(x.num_layers):
        cost.gemm("self_qkv", steps * ah, e, 3 * e, reads=steps)
        cost.gemm("self_out", steps * ah, e, e, reads=steps)
        cost.gemm("cross_q_out", steps * ah, e, 2 * e, reads=steps)
        cost.gemm("mlp_in", steps * ah, e, 2 * x.mlp_hidden, reads=steps)
        cost.gemm("mlp_out", steps * ah, x.mlp_hidden, e, reads=steps)
        cost.flops += steps * (4.0 * ah * ah * e + 4.0 * ah * work.prompt_tokens * e)
        cost.activations += steps * 2 * work.prompt_tokens * e  # context K and V read per step
    cost.gemm("final_linear", steps * ah, e, config.max_action_dim, reads=steps)
    return cost


def depth_step_cost(config: MolmoAct2Config, work: Workload, tokens: int = 1) -> Cost:
    """``tokens`` decode tokens in one pass over a cache of the prompt plus the depth codes."""
    t = config.text_config
    keys = work.prompt_tokens + config.num_depth_codes + DEPTH_MARKERS
    cost = Cost()
    _llm_blocks(cost, config, tokens, keys)
    cost.gemm("lm_head", tokens, t.hidden_size, t.vocab_size)
    cost.activations += t.num_hidden_layers * keys * 2 * t.kv_dim  # the KV cache read
    return cost


def depth_block_cost(config: MolmoAct2Config, work: Workload) -> Cost:
    """One ``decode_block`` call: <depth_start>, a code per cell and <depth_end> in one pass over the cache."""
    t = config.text_config
    block = config.num_depth_codes + 2
    keys = work.prompt_tokens + config.num_depth_codes + DEPTH_MARKERS
    cost = Cost()
    _llm_blocks(cost, config, block, keys)
    cost.gemm("lm_head", 2, t.hidden_size, t.vocab_size)  # the full vocabulary after the last two tokens
    cost.flops += 2.0 * block * t.hidden_size * config.num_depth_tokens  # the depth rows (read with lm_head)
    cost.gemm("context_kv_proj", t.num_hidden_layers * block, t.kv_dim, 2 * _expert_width(config))
    cost.activations += t.num_hidden_layers * keys * 2 * t.kv_dim  # the KV cache read
    return cost


def weight_parameters(config: MolmoAct2Config) -> float:
    """Every stored parameter (what must sit in device memory), from the config."""
    t, v = config.text_config, config.vit_config
    x = config.action_expert_config
    total = vision_cost(config, 1).weights + v.image_num_pos * v.hidden_size
    per_block = t.hidden_size * (t.q_dim + 2 * t.kv_dim) + t.q_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    total += t.num_hidden_layers * per_block + (2 * t.vocab_size + t.additional_vocab_size) * t.hidden_size
    if x is not None:
        e = x.hidden_size
        block = 6 * e * e + 3 * e * x.mlp_hidden + 9 * e * e  # attention, SwiGLU, 9-way adaLN
        total += x.num_layers * block + 2 * t.kv_dim * e + (x.timestep_embed_dim + e) * e
        total += 2 * config.max_action_dim * e + 2 * e * e
    return float(total)


@dataclass(frozen=True)
class StageBound:
    flops: float
    bytes: float
    compute_ms: float
    memory_ms: float

    @property
    def lower_bound_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower_bound_ms": round(self.lower_bound_ms, 3),
            "bound": self.bound,
            "gflops": round(self.flops / 1e9, 3),
            "gbytes": round(self.bytes / 1e9, 4),
            "compute_ms": round(self.compute_ms, 3),
            "memory_ms": round(self.memory_ms, 3),
        }


def _bound(cost: Cost, device: Device, precision: str, times: float = 1.0) -> StageBound:
    peak, _ = device.peak(precision)
    nbytes = cost.weights * WEIGHT_BYTES[precision] + cost.activations * ACTIVATION_BYTES[precision]
    return StageBound(
        cost.flops * times,
        nbytes * times,
        1e3 * times * cost.flops / peak,
        1e3 * times * nbytes / (device.bandwidth_gbs * 1e9),
    )


def _sum(*bounds: StageBound) -> StageBound:
    return StageBound(*(sum(getattr(b, f) for b in bounds) for f in ("flops", "bytes", "compute_ms", "memory_ms")))


def memory_gb(config: MolmoAct2Config, work: Workload, precision: str) -> dict[str, float]:
    """Weights, caches and the largest stage's live activations, in GB."""
    t = config.text_config
    act = ACTIVATION_BYTES[precision]
    cache_tokens = work.prompt_tokens + (config.num_depth_codes + DEPTH_MARKERS if config.enable_depth_reasoning else 0)
    e = _expert_width(config)
    caches = t.num_hidden_layers * cache_tokens * 2 * (t.kv_dim + e) * act
    # live activations: the widest prefill intermediate (gate and up of every prompt token) twice over
    activations = 2 * work.prompt_tokens * (2 * t.intermediate_size + t.hidden_size) * act
    v = config.vit_config
    activations = max(activations, 2 * work.cameras * v.image_num_pos * (v.intermediate_size + v.hidden_size) * act)
    weights = weight_parameters(config) * WEIGHT_BYTES[precision]
    return {"weights": weights / 1e9, "caches": caches / 1e9, "activations": activations / 1e9}


def plan(config: MolmoAct2Config, device: Device, precision: str, work: Workload) -> dict[str, Any]:
    """The plan as a JSON-able dict: per stage ``lower_bound_ms`` and ``bound``, totals, memory and fit."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {list(PRECISIONS)}")
    work = work.resolve(config)
    step = depth_step_cost(config, work)
    block = _bound(depth_block_cost(config, work), device, precision)
    stages = {
        "vision": _bound(vision_cost(config, work.cameras), device, precision),
        "prefill": _bound(prefill_cost(config, work), device, precision),
        "flow": _bound(flow_cost(config, work), device, precision),
        "depth_step": _bound(step, device, precision),
        "depth_full": _bound(step, device, precision, times=config.num_depth_codes + DEPTH_MARKERS),
        "depth_block": block,
        "depth_cached": _bound(depth_block_cost(config, work), device, precision, times=1 + work.depth_rejections),
    }
    continuous = sum(stages[s].lower_bound_ms for s in ("vision", "prefill", "flow"))
    path = ["vision", "prefill"] + (["depth_cached"] if config.enable_depth_reasoning else []) + ["flow"]
    memory = memory_gb(config, work, precision)
    total_memory = sum(memory.values())
    usable = device.memory_gb - device.reserved_gb
    _, compute_class = device.peak(precision)
    return {
        "device": device.name,
        "device_label": device.label,
        "precision": precision,
        "compute_peak": f"{device.tops[compute_class]} dense T{'OPS' if compute_class == 'int8' else 'FLOPS'} {compute_class}",
        "bandwidth_gbs": device.bandwidth_gbs,
        "source": device.source,
        "workload": {
            "cameras": work.cameras,
            "prompt_tokens": work.prompt_tokens,
            "chunk_length": work.chunk_length,
            "flow_steps": work.flow_steps,
            "depth_rejections": work.depth_rejections,
            "prefill_logits": work.logits,
        },
        "stages": {name: b.to_dict() for name, b in stages.items()},
        "path": path,
        "total_lower_bound_ms": round(sum(stages[s].lower_bound_ms for s in path), 3),
        # Think (1 + rejections block calls) over continuous, whether or not this config has Think
        "think_vs_continuous": round((continuous + stages["depth_cached"].lower_bound_ms) / continuous, 3),
        "max_rejections_for_1_3x": round((THINK_RATIO_GOAL - 1) * continuous / block.lower_bound_ms - 1, 2),
        "memory_gb": round(total_memory, 3),
        "memory_parts_gb": {k: round(v, 4) for k, v in memory.items()},
        "usable_memory_gb": usable,
        "fits": total_memory <= usable,
        "note": "roofline lower bound from public peak figures, not a measurement",
    }


def load_target(target: str) -> tuple[MolmoAct2Config, Workload]:
    """CKPT dir, BUNDLE dir or PRESET name -> (config, workload defaults; a bundle's own shapes)."""
    path = Path(target)
    manifest = path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        config = MolmoAct2Config.from_json(path / "config.json")
        model = m["model"]
        work = Workload(
            cameras=len(m["cameras"]["order"]),
            prompt_tokens=int(m["prompt"]["bucket"]),
            chunk_length=int(model["chunk_length"]),
            flow_steps=int(model.get("flow_steps", 0)),
            logits=model["mode"] == "discrete",
        )
        return config, work
    if (path / "config.json").is_file():
        return MolmoAct2Config.from_json(path / "config.json"), Workload()
    if target in preset_names():
        return get_preset(target), Workload()
    raise ConfigError(
        f"plan: {target!r} is neither a bundle (manifest.json), a checkpoint (config.json) nor a preset "
        f"({', '.join(preset_names())})"
    )


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['device_label']}, {report['precision']} ({report['compute_peak']}, {report['bandwidth_gbs']} GB/s) "
        "- roofline LOWER BOUND, not a measurement",
        f"  {'stage':14s}{'bound ms':>10s}{'bound':>9s}{'GFLOP':>11s}{'GB':>9s}",
    ]
    for name, s in report["stages"].items():
        lines.append(
            f"  {name:14s}{s['lower_bound_ms']:>10.2f}{s['bound']:>9s}{s['gflops']:>11.1f}{s['gbytes']:>9.3f}"
        )
    lines.append(f"  total ({' + '.join(report['path'])}): {report['total_lower_bound_ms']:.1f} ms")
    room = report["max_rejections_for_1_3x"]
    within = f"up to {room:.1f} of them" if room >= 0 else "not even with none (one block call alone exceeds it)"
    lines.append(
        f"  Think / continuous: {report['think_vs_continuous']:.2f}x at {report['workload']['depth_rejections']:g} "
        f"rejected drafts per frame; within {THINK_RATIO_GOAL}x: {within}"
    )
    parts = ", ".join(f"{k} {v:.2f}" for k, v in report["memory_parts_gb"].items())
    fits = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"  memory {report['memory_gb']:.2f} GB ({parts}); {fits} in {report['usable_memory_gb']:.1f} GB usable")
    lines.append(f"  peaks: {report['source']}")
    return "\n".join(lines)
