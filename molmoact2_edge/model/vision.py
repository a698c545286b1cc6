"""SigLIP2-style vision transformer (``model.vision_backbone.image_vit``), reference §3.2, §4.1, §4.4.

- Input: uint8 crops already resized to ``image_default_input_size`` (resizing is
  host-side: torch bilinear, antialias off, §4.1). ``patchify`` turns them into
  (p, 3*patch^2) rows ordered (row, col, channel), row-major over the patch grid.
- Pixels map to [-1, 1] on the uint8 grid (``u/255*2-1``); float inputs in [-1, 1]
  are first re-quantized to that grid, as the release model does (§4.1 step 5).
- Patch embedding is a Linear over the flattened patch (not a Conv), plus a learned
  positional table with one row per patch (no CLS, no interpolation).
- Pre-norm blocks with LayerNorm (bias), 16-head MHA with fp32 softmax, GELU-tanh MLP.
- Only ``max(vit_layers)+1`` blocks exist; ``forward`` returns every block's output
  so the connector can pick its layers. No final LayerNorm.

Shape legend: b batch, n cameras, h w c pixels, p patches, d ViT width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molmoact2_edge.config import MolmoAct2Config, VitConfig
from molmoact2_edge.model.layers import attention


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(b, n, h, w, c) -> (b*n, p, patch*patch*c) with p = (h/patch)*(w/patch), row-major patches."""
    b, n, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b * n, gh, patch, gw, patch, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (b*n, gh, gw, patch, patch, c)
    return x.reshape(b * n, gh * gw, patch * patch * c)


def pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] -> float32 on the uint8 grid mapped to [-1, 1]."""
    if images.dtype == torch.uint8:
        u = images.float()
    else:
        u = torch.round((images.float() + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0)
    return u / 255.0 * 2.0 - 1.0


class VitAttention(nn.Module):
    def __init__(self, cfg: VitConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        d, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.wq = nn.Linear(d, inner)
        self.wk = nn.Linear(d, inner)
        self.wv = nn.Linear(d, inner)
        self.wo = nn.Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, _ = x.shape
        q = self.wq(x).view(B, P, self.n_head, self.head_dim).transpose(1, 2)  # (b, h, p, hd)
        k = self.wk(x).view(B, P, self.n_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, P, self.n_head, self.head_dim).transpose(1, 2)
        y = attention(q, k, v).transpose(1, 2).reshape(B, P, -1)  # (b, p, h*hd)
        return self.wo(y)


class VitMLP(nn.Module):
    def __init__(self, cfg: VitConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class VitBlock(nn.Module):
    def __init__(self, cfg: VitConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = VitAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = VitMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class VitTransformer(nn.Module):
    def __init__(self, cfg: VitConfig, num_blocks: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([VitBlock(cfg) for _ in range(num_blocks)])


class VisionTransformer(nn.Module):
    """``image_vit``: patches -> the output of every built block."""

    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        cfg = config.vit_config
        self.cfg = cfg
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.image_num_pos, cfg.hidden_size))
        self.transformer = VitTransformer(cfg, config.num_vit_blocks)

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """patches (b*n, p, 3*patch^2) in [-1, 1] -> per block (b*n, p, d)."""
        _, P, _ = patches.shape
        assert self.cfg.image_num_pos == P, f"got {P} patches, the positional table has {self.cfg.image_num_pos}"
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype)) + self.positional_embedding
        hidden = []
        for block in self.transformer.resblocks:
            x = block(x)
            hidden.append(x)
        return hidden
