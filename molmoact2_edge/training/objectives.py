"""The two MolmoAct2 training objectives as modules whose forward returns (loss, metrics).

- ``NextTokenObjective`` (stage 1): the backbone (vision + connector + LLM + lm_head)
  reads prompt + target tokens in one teacher-forced pass with the prefill mask
  (causal, image tokens bidirectional) and is trained with cross-entropy on the target
  tokens (OpenFAST action tokens, and depth tokens for Think).
- ``FlowObjective`` (stage 2): the backbone runs under ``no_grad`` (insulated) unless
  ``finetune_backbone`` loosens it, and its per-layer K/V over the prompt condition the
  action expert. Each chunk gets ``k`` (noise, t) draws sharing one backbone pass:
  ``x_t = (1 - t) * noise + t * a``, target velocity ``a - noise`` (t = 0 noise, 1 data,
  reference §4.11), squared error averaged over the valid (horizon x action-dim) entries.
  Training-time RTC (``config.rtc_max_delay > 0``, arXiv 2512.05964): each draw's first ``rtc_delay``
  steps are the committed prefix, fed clean (the ground-truth actions at flow time 1, per-step
  times) and left out of the loss, so the expert learns to continue a prefix it is given.
  A Think backbone fine-tuned in stage 2 also keeps stage 1's cross-entropy on the target tokens
  (``token_weight``): the runtime decodes the depth codes with that backbone.

Both losses are per-sample means averaged over the batch, so the mean over ranks of equal
shards equals the loss of the combined batch (what DDP's gradient averaging assumes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molmoact2_edge.model.flow import interpolate
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.training.batches import IGNORE


def backbone_pass(
    model: MolmoAct2, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced pass: -> hidden (b, t, e) after ln_f and per-layer keys/values (l, b, kh, t, hd)."""
    ids = batch["input_ids"]
    b, t = ids.shape
    features = model.encode_images(batch["images"])  # (b, n*m, e)
    embeds = model.embed(
        ids, features, batch["image_positions"]
    )  # (b, t, e): image features added at <im_patch>
    positions = torch.arange(t, device=ids.device)[None].expand(b, t)
    return model.model.transformer(embeds, positions, batch["attention_bias"])


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values, mask (b, ...) -> mean over each sample's masked entries, then over the batch."""
    mask = mask.to(values.dtype)
    dims = tuple(range(1, values.dim()))
    return ((values * mask).sum(dims) / mask.sum(dims).clamp(min=1)).mean()


def token_loss(model: MolmoAct2, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy on the target tokens (labels != IGNORE) and its token accuracy."""
    target = labels != IGNORE
    logits = model.lm_head(hidden[target])  # (targets, V): only the target positions, not a (b, t, V) tensor
    per_token = F.cross_entropy(logits.float(), labels[target], reduction="none")
    dense = torch.zeros(labels.shape, dtype=per_token.dtype, device=per_token.device)
    dense[target] = per_token
    accuracy = (logits.argmax(-1) == labels[target]).float().mean()
    return _per_sample_mean(dense, target), accuracy.item()


class NextTokenObjective(nn.Module):
    """Stage 1: cross-entropy on the action (and depth) tokens."""

    def __init__(self, model: MolmoAct2) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden, _, _ = backbone_pass(self.model, batch)
        loss, accuracy = token_loss(self.model, hidden, batch["labels"])
        return loss, {"token_acc": accuracy}


class FlowObjective(nn.Module):
    """Stage 2: flow matching of the action expert on the backbone's per-layer K/V."""

    def __init__(self, model: MolmoAct2, finetune_backbone: bool = False, token_weight: float = 0.0) -> None:
        """token_weight > 0 (with finetune_backbone): also the stage-1 cross-entropy on the target tokens, so a
        Think backbone keeps predicting the depth codes the runtime decodes while the flow loss moves it."""
        super().__init__()
        self.model = model
        self.finetune_backbone = finetune_backbone
        self.token_weight = token_weight if finetune_backbone else 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.set_grad_enabled(self.finetune_backbone and torch.is_grad_enabled()):
            hidden, keys, values = backbone_pass(self.model, batch)
        ctx_k, ctx_v = self.model.model.action_expert.project_context(keys, values)  # (l, b, t, d), trained
        noise, t = batch["noise"], batch["t"]  # (b, k, ah, ad), (b, k)
        b, k = t.shape
        actions, mask = batch["actions"], batch["action_mask"]  # (b, ah, ad)
        targets = actions[:, None].expand_as(noise).flatten(0, 1)  # (b*k, ah, ad)
        x_t, velocity_target = interpolate(noise.flatten(0, 1), targets, t.flatten())
        pad = (~mask.any(1)).repeat_interleave(
            k, dim=0
        )  # (b*k, ad) action-dim padding, zeroed as at inference
        x_t = x_t.masked_fill(pad[:, None, :], 0.0)
        loss_mask = mask[:, None].expand(b, k, *mask.shape[1:])  # (b, k, ah, ad)
        t_model = t.flatten()
        if "rtc_delay" in batch:
            committed = torch.arange(actions.shape[1], device=t.device) < batch["rtc_delay"].flatten()[:, None]
            x_t = torch.where(committed[..., None], targets.masked_fill(pad[:, None, :], 0.0), x_t)
            t_model = torch.where(committed, torch.ones_like(committed, dtype=t.dtype), t.flatten()[:, None])
            loss_mask = loss_mask & ~committed.view(b, k, -1, 1)
        repeat = lambda x: x.repeat_interleave(k, dim=1)  # noqa: E731  (l, b, ...) -> (l, b*k, ...), k per item
        cross_bias = batch["cross_bias"].repeat_interleave(k, dim=0)  # (b*k, 1, 1, t)
        velocity = self.model.expert_velocity(x_t, t_model, repeat(ctx_k), repeat(ctx_v), cross_bias)
        error = (velocity.float() - velocity_target).pow(2).view(b, k, *actions.shape[1:])
        loss = _per_sample_mean(error, loss_mask)
        if not self.token_weight:
            return loss, {}
        tokens, accuracy = token_loss(self.model, hidden, batch["labels"])
        return loss + self.token_weight * tokens, {"flow_loss": loss.item(), "token_acc": accuracy}
