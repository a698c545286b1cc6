"""Flow matching: the Euler sampler used at inference and the training-side time law, reference §4.11, §11 A15.

Convention: x_t = (1 - t) * noise + t * actions, target velocity = actions - noise;
t = 0 is noise, t = 1 is data. Inference integrates N Euler steps with t_k = k/N.
The step loop is a plain Python loop over a fixed N, so ``torch.onnx.export``
unrolls it into a static graph (no Loop/If nodes); the accumulator stays fp32
whatever the expert's dtype (toolchain §1.3: fp16 accumulation compounds error).

Padded action dims (beyond the robot's action_dim) are zeroed on the noise, on
every velocity and after every step when ``action_dim_mask`` is given
(``mask_action_dim_padding``).

Shape legend: b batch, ah chunk length, ad action dim (max_action_dim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from molmoact2_edge.config import MolmoAct2Config

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (b, ah, ad), t (b,)) -> v (b, ah, ad)


def action_dim_mask(action_dim: int, max_action_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, ad) float32: 1 for the robot's first ``action_dim`` dims, 0 for padding."""
    return (torch.arange(max_action_dim, device=device) < action_dim).float()[None, None]


def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    dim_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t=0 (``noise``, (b, ah, ad)) to t=1 in ``num_steps`` steps.

    ``noise`` is read, never modified. ``dim_mask`` broadcastable to (b, ah, ad), 1 = real dim.
    Returns fp32 (b, ah, ad) normalized actions.
    """
    assert num_steps >= 1, f"num_steps must be >= 1, got {num_steps}"
    B = noise.shape[0]
    x = noise.float()
    if dim_mask is not None:
        x = x * dim_mask
    dt = 1.0 / num_steps
    for k in range(num_steps):
        t = torch.full((B,), k * dt, dtype=torch.float32, device=noise.device)
        v = velocity(x, t).float()
        if dim_mask is not None:
            v = v * dim_mask
        x = x + dt * v
        if dim_mask is not None:
            x = x * dim_mask
    return x


def sample_flow_time(
    shape: tuple[int, ...], config: MolmoAct2Config, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Training t-law: t = offset + min(cutoff - offset, scale) * Beta(alpha, beta) (draws from torch's global RNG)."""
    beta = torch.distributions.Beta(
        torch.tensor(config.flow_matching_beta_alpha, device=device),
        torch.tensor(config.flow_matching_beta_beta, device=device),
    )
    span = min(config.flow_matching_cutoff - config.flow_matching_time_offset, config.flow_matching_time_scale)
    return config.flow_matching_time_offset + span * beta.sample(shape)


def interpolate(noise: torch.Tensor, actions: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for flow time t (b,): x_t = (1-t)*noise + t*actions, target = actions - noise."""
    tt = t.to(noise.dtype)[:, None, None]
    return (1 - tt) * noise + tt * actions, actions - noise
