"""Qwen3-style decoder (``model.transformer``), reference §3.1, §4.6-§4.8, §11 A6-A9.

- Embedding: ``wte.embedding`` (base + added text tokens) and ``wte.new_embedding``
  (image/video specials at ids >= vocab_size), looked up as two gathers instead of
  one concatenated table (a 4B-sized concat per call would copy 1.5 GB).
- Pre-norm blocks: ``h = x + attn_out(attn(attn_norm(x)))``, ``y = h + ff_out(silu(gate)*up)``
  with ``[up, gate] = ff_proj(ff_norm(h))`` split in that (released) order.
- Attention: fused ``att_proj`` rows [Q | K | V], head-major; QK-norm before RoPE
  ("qwen3": per-head RMSNorm with weight [hd]; "olmo": over the whole projection);
  NeoX rotate-half RoPE with inv_freq recomputed in fp64 from rope_theta (a stored
  ``rotary_emb.inv_freq`` is ignored, A7); GQA; fp32 softmax; no biases.
- Two call shapes, both export-friendly and without data-dependent control flow:
  full sequence (prefill: K/V are the new tokens, bias (b, 1, t, t)), or against a
  STATIC cache (b, kh, L, hd) per layer, written functionally with ``index_copy`` at
  ``cache_position`` and returned (never mutated), bias (b, 1, t, L).
- K is returned post-QK-norm and post-RoPE, V raw (the cache the expert reads, A9).

Shape legend: b batch, t tokens, l layers, kh KV heads, hd head dim, L cache length, e width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molmoact2_edge.config import TextConfig
from molmoact2_edge.model.layers import (
    RMSNorm,
    apply_rope,
    attention,
    repeat_kv,
    rope_cos_sin,
    rope_inv_freq,
    swiglu,
)


class Embedding(nn.Module):
    """``wte``: ids < vocab_size read ``embedding``, ids >= vocab_size read ``new_embedding``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.embedding = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.new_embedding = nn.Parameter(torch.zeros(cfg.additional_vocab_size, cfg.hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, t) int64, -1 allowed (treated as 0) -> (b, t, e)."""
        ids = ids.clamp(min=0)
        base = F.embedding(ids.clamp(max=self.vocab_size - 1), self.embedding)
        extra_ids = (ids - self.vocab_size).clamp(min=0, max=self.new_embedding.shape[0] - 1)
        extra = F.embedding(extra_ids, self.new_embedding)
        return torch.where((ids < self.vocab_size)[..., None], base, extra)


class LLMAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.att_proj = nn.Linear(cfg.hidden_size, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        if cfg.use_qk_norm:
            per_head = cfg.qk_norm_type == "qwen3"
            self.q_norm = RMSNorm(cfg.head_dim if per_head else cfg.q_dim, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim if per_head else cfg.kv_dim, cfg.layer_norm_eps)
        self.attn_out = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, t, e) -> (y (b, t, e), keys (b, kh, t or L, hd), values (b, kh, t or L, hd))."""
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.att_proj(x).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=-1)
        if cfg.use_qk_norm and cfg.qk_norm_type == "olmo":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if cfg.use_qk_norm and cfg.qk_norm_type == "qwen3":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (b, nh, t, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (b, kh, t, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (b, kh, t, hd)
        if k_cache is not None and v_cache is not None and cache_position is not None:
            k = k_cache.index_copy(2, cache_position, k.to(k_cache.dtype))  # (b, kh, L, hd), new tensor
            v = v_cache.index_copy(2, cache_position, v.to(v_cache.dtype))
        rep = self.n_head // self.n_kv_head
        y = attention(q, repeat_kv(k, rep).to(q.dtype), repeat_kv(v, rep).to(q.dtype), bias)  # (b, nh, t, hd)
        y = y.transpose(1, 2).reshape(B, T, cfg.q_dim)
        return self.attn_out(y), k, v


class LLMMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.ff_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # rows [up | gate]
        self.ff_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.ff_proj(x).split(self.intermediate, dim=-1)
        return self.ff_out(swiglu(gate, up))


class LLMBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = LLMAttention(cfg)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = LLMMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, k, v = self.self_attn(self.attn_norm(x), cos, sin, bias, k_cache, v_cache, cache_position)
        x = x + h
        return x + self.mlp(self.ff_norm(x)), k, v


class LLM(nn.Module):
    """``transformer``: embeddings -> hidden states after ``ln_f`` and every layer's K/V."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = Embedding(cfg)
        self.blocks = nn.ModuleList([LLMBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        bias: torch.Tensor,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run all layers.

        embeds (b, t, e); position_ids (b, t) int64; bias (b, 1, t, t) without a cache,
        (b, 1, t, L) with one; k_cache/v_cache (l, b, kh, L, hd) and cache_position (t,) int64
        together or not at all. Returns hidden (b, t, e) after ln_f and keys/values
        (l, b, kh, t or L, hd): the new tokens' K/V, or the updated caches.
        """
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).to(embeds.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq)  # (b, t, hd) fp32
        x = embeds
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            kc = k_cache[i] if k_cache is not None else None
            vc = v_cache[i] if v_cache is not None else None
            x, k, v = block(x, cos, sin, bias, kc, vc, cache_position)
            keys.append(k)
            values.append(v)
        return self.ln_f(x), torch.stack(keys), torch.stack(values)
