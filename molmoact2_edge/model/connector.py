"""Vision backbone = ViT + connector (``model.vision_backbone``), reference §3.3, §4.5, §11 A4-A5.

- Features: the outputs of two ViT blocks (``adapter_config.vit_layers``, release
  (24, 18)) concatenated along channels -> 2d per patch.
- 2x2 attention pooling: the patch grid is padded with -1 to even size
  (floor(pad/2) before, the rest after), cut into 2x2 windows in row-major order,
  entries (0,0),(0,1),(1,0),(1,1). Per window the query is the masked mean of its
  valid entries (sum / max(#valid, 1)), keys/values are the entries zeroed where
  invalid, and attention ignores invalid keys (``pooling_attention_mask``).
  The window table is a graph constant (no buffers): robot crops are always resized to one size.
- SwiGLU projector ``w2(silu(w1 y) * w3 y)`` into the LLM width.

Shape legend: b batch, n cameras, p patches, m pooled tokens per camera, d ViT width, e LLM width.
"""

from __future__ import annotations

import torch
from torch import nn

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.model.layers import attention, bool_to_bias, swiglu
from molmoact2_edge.model.vision import VisionTransformer, patchify, pixels_to_unit


def pooling_windows(grid_h: int, grid_w: int) -> torch.Tensor:
    """(m, 4) patch indices of each 2x2 window, -1 where the window hangs over the padded edge."""
    idx = torch.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    pad_h, pad_w = grid_h % 2, grid_w % 2
    padded = torch.full((grid_h + pad_h, grid_w + pad_w), -1, dtype=torch.long)
    top, left = pad_h // 2, pad_w // 2
    padded[top : top + grid_h, left : left + grid_w] = idx
    H, W = padded.shape
    windows = padded.reshape(H // 2, 2, W // 2, 2).permute(0, 2, 1, 3)  # (H/2, W/2, dy, dx)
    return windows.reshape(-1, 4)


class ImagePooling2D(nn.Module):
    """Multi-head attention of one query per window over its (up to) 4 patches."""

    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        cfg = config.adapter_config
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        d_in, inner = cfg.hidden_size * len(cfg.vit_layers), cfg.num_attention_heads * cfg.head_dim
        self.wq = nn.Linear(d_in, inner)
        self.wk = nn.Linear(d_in, inner)
        self.wv = nn.Linear(d_in, inner)
        self.wo = nn.Linear(inner, cfg.hidden_size)

    def forward(self, query: torch.Tensor, window: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """query (B, m, 2d), window (B, m, 4, 2d), bias (m, 4) additive or None -> (B, m, d)."""
        B, M, K, _ = window.shape
        q = self.wq(query).view(B * M, 1, self.n_head, self.head_dim).transpose(1, 2)  # (B*m, h, 1, hd)
        k = self.wk(window).view(B * M, K, self.n_head, self.head_dim).transpose(1, 2)  # (B*m, h, 4, hd)
        v = self.wv(window).view(B * M, K, self.n_head, self.head_dim).transpose(1, 2)
        if bias is not None:
            bias = bias.repeat(B, 1)[:, None, None, :]  # (B*m, 1, 1, 4)
        y = attention(q, k, v, bias).transpose(1, 2).reshape(B, M, -1)  # (B, m, h*hd)
        return self.wo(y)


class ImageProjector(nn.Module):
    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        cfg = config.adapter_config
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # value
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class VisionBackbone(nn.Module):
    """``vision_backbone``: camera crops -> pooled image features in the LLM width."""

    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        self.config = config
        self.image_vit = VisionTransformer(config)
        self.image_pooling_2d = ImagePooling2D(config)
        self.image_projector = ImageProjector(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, n, h, w, 3) uint8 (or float in [-1, 1]) -> features (b, n*m, e)."""
        b, n = images.shape[:2]
        patches = patchify(pixels_to_unit(images), self.config.vit_config.image_patch_size)  # (b*n, p, 3*patch^2)
        hidden = self.image_vit(patches)
        feats = torch.cat([hidden[i] for i in self.config.resolved_vit_layers], dim=-1)  # (b*n, p, 2d)
        windows = pooling_windows(*self.config.vit_config.patch_grid).to(feats.device)  # (m, 4), constant
        valid = windows >= 0
        weight = valid.to(feats.dtype)
        window = feats[:, windows.clamp(min=0)] * weight[None, :, :, None]  # (b*n, m, 4, 2d), invalid zeroed
        if self.config.adapter_config.pooling_attention_mask:
            query = window.sum(2) / weight.sum(-1).clamp(min=1.0)[None, :, None]  # masked mean (b*n, m, 2d)
            bias = bool_to_bias(valid)
        else:
            query, bias = window.mean(2), None
        pooled = self.image_pooling_2d(query, window, bias)  # (b*n, m, d)
        out = self.image_projector(pooled)  # (b*n, m, e)
        return out.reshape(b, n * out.shape[1], out.shape[2])
