"""Primitives shared by every component: RMSNorm, attention, rotary embeddings, the mask value.

Written for ``torch.onnx.export(dynamo=True)`` at opset 18-20 (``reference/toolchain.md``
§1.3-§1.4): RMSNorm spelled out (``nn.RMSNorm`` becomes ``RMSNormalization`` at
opset 23), attention as explicit matmul + softmax with an additive float bias
(no ``is_causal``, no flash paths), RoPE in the real rotate-half form from a
cos/sin table computed from position ids. Softmax and norms run in fp32, as the
release does (``float32_attention``), and cast back to the activation dtype.

Shape legend: b batch, h heads, t query tokens, k key tokens, hd head dim, d width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Additive bias for a disallowed (query, key) pair: finfo(float32).min as the release (§11 A8).
# Built with torch.where (never summed twice), so a fully masked row softmaxes to uniform, not NaN.
MASK_VALUE = torch.finfo(torch.float32).min


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, then times ``weight`` (None = weightless)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else h * weight


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (``.weight``), the LLM's norm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, fp32 scores and softmax.

    q (b, h, t, hd); k, v (b, h, k, hd) (repeat KV heads first for GQA);
    bias: additive float, broadcastable to (b, h, t, k), 0 = allowed, MASK_VALUE = blocked.
    Returns (b, h, t, hd) in v's dtype.
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (b, h, t, k)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(v.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, kh, k, hd) -> (b, kh*n_rep, k, hd): each KV head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    b, kh, k, hd = x.shape
    return x[:, :, None].expand(b, kh, n_rep, k, hd).reshape(b, kh * n_rep, k, hd)


def bool_to_bias(allowed: torch.Tensor) -> torch.Tensor:
    """True = attend -> 0.0, False -> MASK_VALUE (float32)."""
    zero = torch.zeros((), dtype=torch.float32, device=allowed.device)
    blocked = torch.full((), MASK_VALUE, dtype=torch.float32, device=allowed.device)
    return torch.where(allowed, zero, blocked)


# --- rotary embeddings ----------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/hd), j < hd/2, computed in fp64 then cast to fp32 (§11 A7)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / theta**exponent).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin table for integer positions (b, t) -> two (b, t, hd) fp32 tensors.

    Angles are duplicated across the two halves (``cat(freqs, freqs)``), so the
    rotate-half form below rotates dimension j with j + hd/2.
    """
    freqs = positions.float()[..., None] * inv_freq  # (b, t, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (b, t, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension's halves."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, t, hd) rotated by cos/sin (b, t, hd): x*cos + rotate_half(x)*sin, in x's dtype."""
    cos = cos[:, None].to(x.dtype)  # (b, 1, t, hd)
    sin = sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
