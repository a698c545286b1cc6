"""Real-time chunking inside the Euler sampler: guided (inference-time) and conditioned (training-time) RTC.

Same convention as ``model/flow.py`` (t = 0 noise, t = 1 data, N unrolled steps, fp32 accumulator).
``prefix`` Y (b, ah, ad) is the previous chunk in normalized space, ``weights`` W (b, ah) the soft
mask of ``molmoact2_edge/rtc.py``. With W = 0 both samplers return exactly ``euler_sample``'s chunk.

**Guided** (Black, Galliker, Levine 2025, Algorithm 1, ΠGDM guidance). At step k (tau = k/N):

    A1_hat = A + (1 - tau) v(A, tau)          # the one-step estimate of the final chunk
    e      = W * (Y - A1_hat)                  # weighted error against the committed actions
    g      = e^T dA1_hat/dA                    # a vector-Jacobian product through the expert
    v'     = v + min(beta, (1 - tau) / (tau r^2)) g,   r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)

The VJP needs autograd through the expert, which neither ONNX nor TensorRT graphs can express.
``vjp`` chooses how g is formed:

- ``autograd``: the exact VJP (``torch.autograd.grad``); the PyTorch reference only.
- ``fd``: a forward finite difference of the Jacobian-vector product,
  g ~ (A1_hat(A + h e) - A1_hat(A)) / h: ONE extra expert pass per step, exportable. It replaces
  e^T J by J e, exact where J is symmetric. J = I + (1 - tau) dv/dA; the identity part is
  symmetric and dominates at small (1 - tau) and under the beta clip, so the error is confined to
  the expert's cross-step coupling (measured in docs/rtc.md against ``autograd``).
- ``identity``: g = e (J ~ I, zero extra passes), the cheapest exportable form.

**Conditioned** (arXiv 2512.05964): the committed steps are pinned to Y and given flow time 1 (a
per-step time, ``t`` (b, ah)) at every step, exactly as training saw them; the rest integrates
normally. Here W is the hard 0/1 mask; pinned values follow W * Y + (1 - W) * A.

Shape legend: b batch, ah chunk length, ad action dim.
"""

from __future__ import annotations

import torch

from molmoact2_edge.model.flow import VelocityFn
from molmoact2_edge.rtc import GUIDANCE_CLIP

VJP_MODES = ("autograd", "fd", "identity")
EXPORTABLE_VJP = "fd"  # what the exported graph uses (docs/rtc.md: closest to autograd among exportable forms)
FD_STEP = 1e-2  # h of the finite difference, in normalized action units (|e| is O(0.1-1))


def guidance_scale(tau: float, clip: float) -> float:
    """min(clip, (1 - tau) / (tau r^2)); infinite at tau = 0, so the clip applies (a Python float: a graph constant)."""
    if tau <= 0.0:
        return clip
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    return min(clip, (1 - tau) / (tau * r2))


def guided_euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    prefix: torch.Tensor,
    weights: torch.Tensor,
    dim_mask: torch.Tensor | None = None,
    *,
    vjp: str = EXPORTABLE_VJP,
    clip: float = GUIDANCE_CLIP,
) -> torch.Tensor:
    """Inference-time RTC: ``euler_sample`` with ΠGDM guidance toward ``prefix`` weighted by ``weights`` (b, ah)."""
    if vjp not in VJP_MODES:
        raise ValueError(f"vjp must be one of {VJP_MODES}, got {vjp!r}")
    B = noise.shape[0]
    x = noise.float()
    if dim_mask is not None:
        x = x * dim_mask
    w = weights.float()[..., None]  # (b, ah, 1)
    y = prefix.float()
    dt = 1.0 / num_steps
    for k in range(num_steps):
        tau = k * dt
        t = torch.full((B,), tau, dtype=torch.float32, device=noise.device)

        def estimate(a: torch.Tensor, t: torch.Tensor = t, tau: float = tau) -> tuple[torch.Tensor, torch.Tensor]:
            v = velocity(a, t).float()
            if dim_mask is not None:
                v = v * dim_mask
            return a + (1 - tau) * v, v

        if vjp == "autograd":
            with torch.enable_grad():
                a = x.detach().requires_grad_(True)
                a1, v = estimate(a)
                e = w * (y - a1.detach())
                if dim_mask is not None:
                    e = e * dim_mask
                (g,) = torch.autograd.grad(a1, a, grad_outputs=e)
            v = v.detach()
        else:
            a1, v = estimate(x)
            e = w * (y - a1)
            if dim_mask is not None:
                e = e * dim_mask
            g = e if vjp == "identity" else (estimate(x + FD_STEP * e)[0] - a1) / FD_STEP
        x = x + dt * (v + guidance_scale(tau, clip) * g)
        if dim_mask is not None:
            x = x * dim_mask
    return x


def conditioned_euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    prefix: torch.Tensor,
    weights: torch.Tensor,
    dim_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training-time RTC: committed steps (``weights`` (b, ah) = 1) pinned to ``prefix`` at flow time 1."""
    w = weights.float()[..., None]  # (b, ah, 1)
    y = prefix.float()
    if dim_mask is not None:
        y = y * dim_mask
    x = noise.float()
    if dim_mask is not None:
        x = x * dim_mask
    dt = 1.0 / num_steps
    for k in range(num_steps):
        x = w * y + (1 - w) * x
        t = weights.float() + (1 - weights.float()) * (k * dt)  # (b, ah): 1 on the committed steps
        v = velocity(x, t).float()
        if dim_mask is not None:
            v = v * dim_mask
        x = x + dt * (1 - w) * v
        if dim_mask is not None:
            x = x * dim_mask
    return w * y + (1 - w) * x


def rtc_sample(
    mode: str,
    velocity: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    prefix: torch.Tensor,
    weights: torch.Tensor,
    dim_mask: torch.Tensor | None = None,
    *,
    vjp: str = EXPORTABLE_VJP,
    clip: float = GUIDANCE_CLIP,
) -> torch.Tensor:
    """``conditioned_euler_sample`` for mode ``training``, else ``guided_euler_sample`` (``inference``)."""
    if mode == "training":
        return conditioned_euler_sample(velocity, noise, num_steps, prefix, weights, dim_mask)
    return guided_euler_sample(velocity, noise, num_steps, prefix, weights, dim_mask, vjp=vjp, clip=clip)
