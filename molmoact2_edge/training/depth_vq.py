"""The depth codebook of MolmoAct2-Think: a small VQ-VAE that turns a depth map into 10x10 codes.

MolmoAct2-Think predicts, before its action, one ``<depth_i>`` token per cell of a
10x10 grid over the main camera (checkpoint reference §4.13); i indexes a 128-entry
codebook. The released codebook is not public, so we train our own from the
simulator's ground-truth depth maps:

- depth (metres) is clipped to [near, far] and scaled to [-1, 1], resized to a
  square of ``grid * cell`` pixels, so each code sees one ``cell x cell`` patch;
- a strided conv encoder maps the image to a (grid, grid, code_dim) map, each cell
  snaps to its nearest codebook vector (straight-through gradient), and a mirrored
  decoder reconstructs the depth;
- loss = reconstruction MSE + codebook + 0.25 * commitment (van den Oord et al. 2017);
  codes unused for a while are re-seeded from random encoder outputs, so all 128 stay alive.

Shapes: b batch, g grid (10), k codes (128), e code_dim.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from molmoact2_edge.errors import CheckpointError, DatasetError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "depth_vq.safetensors"
CONFIG_FILE = "depth_vq.json"


@dataclass(frozen=True)
class DepthVQConfig:
    num_codes: int = 128  # MolmoAct2 ships 128 <depth_i> tokens
    grid: int = 10  # 10x10 codes per image, as the released Think model
    cell: int = 4  # pixels per code side at the encoder input (40x40 depth)
    code_dim: int = 32
    hidden: int = 48
    near: float = 0.0  # metres mapped to -1
    far: float = 1.5  # metres mapped to +1 (the SO-101 table scene fits in 1.5 m)

    def __post_init__(self) -> None:
        if self.cell not in (1, 2, 4, 8):
            raise ValueError(f"DepthVQConfig.cell must be a power of two <= 8, got {self.cell}")
        if not self.far > self.near:
            raise ValueError(f"DepthVQConfig: far ({self.far}) must exceed near ({self.near})")

    @property
    def size(self) -> int:
        return self.grid * self.cell


def _down_layers(cfg: DepthVQConfig) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(1, cfg.hidden, 3, padding=1), nn.SiLU()]
    for _ in range(int(np.log2(cfg.cell))):  # each stride-2 conv halves the side
        layers += [nn.Conv2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1), nn.SiLU()]
    return [*layers, nn.Conv2d(cfg.hidden, cfg.code_dim, 1)]


def _up_layers(cfg: DepthVQConfig) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1), nn.SiLU()]
    for _ in range(int(np.log2(cfg.cell))):
        layers += [nn.ConvTranspose2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1), nn.SiLU()]
    return [*layers, nn.Conv2d(cfg.hidden, 1, 3, padding=1)]


class DepthVQ(nn.Module):
    """Depth map <-> 10x10 grid of codebook indices."""

    def __init__(self, cfg: DepthVQConfig = DepthVQConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Sequential(*_down_layers(cfg))
        self.decoder = nn.Sequential(*_up_layers(cfg))
        self.codebook = nn.Embedding(cfg.num_codes, cfg.code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg.num_codes, 1.0 / cfg.num_codes)

    def preprocess(self, depth: torch.Tensor) -> torch.Tensor:
        """(b, h, w) metres -> (b, 1, size, size) in [-1, 1]; NaN/inf (no hit) count as far."""
        cfg = self.cfg
        depth = torch.nan_to_num(depth.float(), nan=cfg.far, posinf=cfg.far, neginf=cfg.near)
        x = (depth.clamp(cfg.near, cfg.far) - cfg.near) / (cfg.far - cfg.near) * 2 - 1
        return F.interpolate(x[:, None], size=(cfg.size, cfg.size), mode="area")

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (b, e, g, g) -> nearest codes (b, g*g) and their vectors (b, e, g, g)."""
        b, e, g, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e)  # (b*g*g, e)
        dist = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.codebook.weight.T
            + self.codebook.weight.pow(2).sum(1)
        )
        codes = dist.argmin(1)
        zq = self.codebook(codes).view(b, g, g, e).permute(0, 3, 1, 2)
        return codes.view(b, g * g), zq

    @torch.no_grad()
    def encode(self, depth: torch.Tensor) -> torch.Tensor:
        """(b, h, w) metres -> (b, g*g) int64 codes in row-major grid order."""
        return self._quantize(self.encoder(self.preprocess(depth)))[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, g*g) codes -> (b, size, size) metres."""
        g = self.cfg.grid
        zq = self.codebook(codes).view(-1, g, g, self.cfg.code_dim).permute(0, 3, 1, 2)
        x = self.decoder(zq)[:, 0].clamp(-1, 1)
        return (x + 1) / 2 * (self.cfg.far - self.cfg.near) + self.cfg.near

    def forward(self, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, codes (b, g*g), encoder outputs (b*g*g, e)) for one training step."""
        x = self.preprocess(depth)
        z = self.encoder(x)
        codes, zq = self._quantize(z)
        recon = self.decoder(z + (zq - z).detach())  # straight-through estimator
        loss = F.mse_loss(recon, x) + F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        return loss, codes, z.permute(0, 2, 3, 1).reshape(-1, self.cfg.code_dim).detach()


def train_depth_vq(
    depths: np.ndarray,
    cfg: DepthVQConfig = DepthVQConfig(),
    steps: int = 400,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[DepthVQ, dict[str, float]]:
    """Fit a codebook on depth maps (m, h, w) float metres; returns the model and final metrics.

    Deterministic for a given seed on CPU. Codes unused in the last 50 steps are
    re-seeded from random encoder outputs of the current batch.
    """
    if depths.ndim != 3 or len(depths) == 0:
        raise DatasetError(f"depth codebook: expected depth maps of shape (m, h, w), got {depths.shape}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vq = DepthVQ(cfg)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    data = torch.from_numpy(np.ascontiguousarray(depths, dtype=np.float32))
    last_used = torch.zeros(cfg.num_codes, dtype=torch.long)
    loss = torch.zeros(())
    for step in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=gen)]
        loss, codes, z = vq(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last_used[codes.unique()] = step
        dead = (step - last_used > 50).nonzero().flatten()
        if len(dead) and step < steps - 50:  # leave the last steps to settle the revived codes
            with torch.no_grad():
                vq.codebook.weight[dead] = z[torch.randint(len(z), (len(dead),), generator=gen)]
            last_used[dead] = step
    vq.eval()
    metrics = _metrics(vq, data[: min(len(data), 256)])
    metrics["final_loss"] = loss.item()
    log.info("depth codebook: %s", metrics)
    return vq, metrics


@torch.no_grad()
def _metrics(vq: DepthVQ, depth: torch.Tensor) -> dict[str, float]:
    codes = vq.encode(depth)
    target = (vq.preprocess(depth)[:, 0] + 1) / 2 * (vq.cfg.far - vq.cfg.near) + vq.cfg.near
    err = (vq.decode(codes) - target).abs()
    return {"mae_m": float(err.mean()), "codes_used": float(codes.unique().numel())}


def save_depth_vq(vq: DepthVQ, directory: str | Path) -> None:
    """Write depth_vq.safetensors + depth_vq.json into a checkpoint directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(vq.cfg), indent=2) + "\n")


def load_depth_vq(directory: str | Path) -> DepthVQ:
    """Load the codebook saved by :func:`save_depth_vq`; raises CheckpointError naming the missing file."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory / name} is missing: this checkpoint has no depth codebook (train with --think)"
            )
    vq = DepthVQ(DepthVQConfig(**json.loads((directory / CONFIG_FILE).read_text())))
    vq.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return vq.eval()
