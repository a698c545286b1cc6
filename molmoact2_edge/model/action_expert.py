"""Flow-matching action expert (``model.action_expert``): a DiT with adaLN-Zero, reference §3.4, §4.9-§4.10, §11 A10-A14.

- Conditioning on the LLM: per layer l, the LLM's K (post-norm, post-RoPE) and V
  are flattened head-major to (t, kh*hd) and projected by the SHARED
  ``context_k_proj`` / ``context_v_proj`` into the expert width, then normalized by
  a weightless RMSNorm over the width (``context_layer_norm``); K also gets a
  weightless per-head RMSNorm (``qk_norm``). Block l cross-attends only to layer l.
  ``project_context`` does this once per prompt (it belongs to the prefill graph).
- Time: sinusoid of the raw flow time t in [0, 1) ([sin, cos], freq_j =
  exp(-ln(1e4) j/(half-1))), then Linear-SiLU-Linear -> c.
- Block: 9-way adaLN from ``modulation.linear(silu(c))`` in the order shift/scale/gate
  for self-attention, cross-attention, MLP; ``modulate(z) = z*(1+scale)+shift``.
  Self-attention: fused ``qkv`` [Q|K|V], weightless per-head QK RMSNorm, RoPE
  (theta 1e4) over chunk positions, non-causal. Cross-attention: ``q_proj``,
  weightless q norm, no RoPE, additive key bias. SwiGLU MLP with biases.
- All expert norms are weightless (eps 1e-6, fp32 inside): the release stores no norm weights.
- Final layer: 2-way adaLN then ``linear`` -> velocity in the padded action width.

Shape legend: b batch, ah chunk length, ad action dim (max_action_dim), l layers,
t prompt tokens, kh KV heads, hd head dim, d expert width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.model.layers import (
    apply_rope,
    attention,
    bool_to_bias,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)

NORM_EPS = 1e-6  # block and context norms (the release hard-codes it)
ROPE_THETA = 10000.0  # expert self-attention RoPE base (not a config field in the release)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SinusoidalTimeEmbedding(nn.Module):
    """t (b,) or per action step (b, ah) -> (..., dim) = [sin(t*freq), cos(t*freq)]; no parameters (index 0 of ``time_embed``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        j = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * j / (half - 1))  # (half,)
        args = t.float()[..., None] * freqs  # (b, half) or (b, ah, half)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class Modulation(nn.Module):
    def __init__(self, width: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(width, chunks * width)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c (b, d) -> ``chunks`` tensors (b, 1, d); per-step c (b, ah, d) -> (b, ah, d) each."""
        c = c[:, None] if c.dim() == 2 else c
        return self.linear(F.silu(c)).chunk(self.chunks, dim=-1)


class ExpertSelfAttention(nn.Module):
    def __init__(self, width: int, n_head: int, qk_norm: bool, eps: float, causal: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.qk_norm, self.eps, self.causal = n_head, width // n_head, qk_norm, eps, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        B, A, D = x.shape
        qkv = self.qkv(x).view(B, A, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, b, h, ah, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.qk_norm:
            q, k = rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        bias = None
        if self.causal:
            bias = bool_to_bias(torch.ones(A, A, dtype=torch.bool, device=x.device).tril())
        y = attention(q, k, v, bias).transpose(1, 2).reshape(B, A, D)  # (b, ah, d)
        return self.out_proj(y)


class ExpertCrossAttention(nn.Module):
    def __init__(self, width: int, n_head: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.qk_norm, self.eps = n_head, width // n_head, qk_norm, eps
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (b, ah, d); ctx_k/ctx_v (b, t, d) already normalized; bias (b, 1, 1, t)."""
        B, A, D = x.shape
        T = ctx_k.shape[1]
        q = self.q_proj(x).view(B, A, self.n_head, self.head_dim).transpose(1, 2)  # (b, h, ah, hd)
        if self.qk_norm:
            q = rms_norm(q, None, self.eps)
        k = ctx_k.view(B, T, self.n_head, self.head_dim).transpose(1, 2).to(q.dtype)  # (b, h, t, hd)
        v = ctx_v.view(B, T, self.n_head, self.head_dim).transpose(1, 2).to(q.dtype)
        y = attention(q, k, v, bias).transpose(1, 2).reshape(B, A, D)
        return self.out_proj(y)


class ExpertMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertBlock(nn.Module):
    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        cfg = config.action_expert_config
        assert cfg is not None
        E = cfg.hidden_size
        self.self_attn = ExpertSelfAttention(E, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_eps, cfg.causal_attn)
        self.cross_attn = ExpertCrossAttention(E, cfg.num_heads, cfg.qk_norm, cfg.qk_norm_eps)
        self.mlp = ExpertMLP(E, cfg.mlp_hidden)
        self.modulation = Modulation(E, 9)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        cross_bias: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (b, ah, d), c (b, d), ctx (b, t, d), cross_bias (b, 1, 1, t) -> (b, ah, d)."""
        sh_sa, sc_sa, g_sa, sh_ca, sc_ca, g_ca, sh_mlp, sc_mlp, g_mlp = self.modulation(c)
        x = x + g_sa * self.self_attn(modulate(rms_norm(x, None, NORM_EPS), sh_sa, sc_sa), cos, sin)
        x = x + g_ca * self.cross_attn(modulate(rms_norm(x, None, NORM_EPS), sh_ca, sc_ca), ctx_k, ctx_v, cross_bias)
        return x + g_mlp * self.mlp(modulate(rms_norm(x, None, NORM_EPS), sh_mlp, sc_mlp))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.modulation = Modulation(width, 2)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)
        return self.linear(modulate(rms_norm(x, None, NORM_EPS), shift, scale))


class ActionExpert(nn.Module):
    """``action_expert``: (x_t, t, projected per-layer context) -> velocity."""

    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        cfg = config.action_expert_config
        assert cfg is not None, "ActionExpert needs action_expert_config"
        self.cfg = cfg
        E, KV = cfg.hidden_size, config.text_config.kv_dim
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(cfg.timestep_embed_dim),
            nn.Linear(cfg.timestep_embed_dim, E),
            nn.SiLU(),
            nn.Linear(E, E),
        )
        self.action_embed = nn.Linear(config.max_action_dim, E)
        self.context_k_proj = nn.Linear(KV, E, bias=False)
        self.context_v_proj = nn.Linear(KV, E, bias=False)
        self.blocks = nn.ModuleList([ExpertBlock(config) for _ in range(cfg.num_layers)])
        self.final_layer = FinalLayer(E, config.max_action_dim)

    def project_context(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM K/V (l, b, kh, t, hd) -> expert context K/V (l, b, t, d), normalized (§11 A10)."""
        L, B, KH, T, HD = keys.shape
        k = keys.permute(0, 1, 3, 2, 4).reshape(L, B, T, KH * HD)  # head-major flatten (l, b, t, kh*hd)
        v = values.permute(0, 1, 3, 2, 4).reshape(L, B, T, KH * HD)
        w = self.context_k_proj.weight
        k, v = self.context_k_proj(k.to(w.dtype)), self.context_v_proj(v.to(w.dtype))  # (l, b, t, d)
        if self.cfg.context_layer_norm:
            k, v = rms_norm(k, None, NORM_EPS), rms_norm(v, None, NORM_EPS)
        if self.cfg.qk_norm:
            H = self.cfg.num_heads
            k = rms_norm(k.view(L, B, T, H, -1), None, self.cfg.qk_norm_eps).reshape(L, B, T, -1)
        return k, v

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        cross_bias: torch.Tensor,
    ) -> torch.Tensor:
        """x_t (b, ah, ad); t (b,) flow time in [0, 1], or (b, ah) per action step (training-time RTC
        feeds the committed prefix clean, at t = 1); ctx_k/ctx_v (l, b, t, d); cross_bias (b, 1, 1, t).

        Returns the velocity (b, ah, ad) (padded dims are not masked here; see flow.py).
        """
        B, A, _ = x_t.shape
        assert ctx_k.shape[0] == len(self.blocks), f"context has {ctx_k.shape[0]} layers, expert {len(self.blocks)}"
        dtype = self.action_embed.weight.dtype
        sinusoid = self.time_embed[0](t).to(dtype)  # fp32 sin/cos of the raw t, then the weights' dtype
        c = self.time_embed[3](self.time_embed[2](self.time_embed[1](sinusoid)))  # (b, d) or (b, ah, d)
        x = self.action_embed(x_t.to(dtype))  # (b, ah, d)
        cos = sin = None
        if self.cfg.rope:
            positions = torch.arange(A, device=x.device)[None].expand(B, A)
            cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.head_dim, ROPE_THETA).to(x.device))
        for i, block in enumerate(self.blocks):
            x = block(x, c, ctx_k[i], ctx_v[i], cross_bias, cos, sin)
        return self.final_layer(x, c)
