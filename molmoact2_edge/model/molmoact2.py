"""MolmoAct2: the whole network with the released parameter names, and its export entry points.

Names follow the released checkpoint (reference §3): ``model.vision_backbone.*``,
``model.transformer.*``, ``model.action_expert.*``, optional
``model.action_expert_depth_gate*``, and ``lm_head.weight``, so a downloaded
``*.safetensors`` loads with ``load_state_dict(strict=True)``.

The network is split at the seams the bundle exports (DESIGN §3), each a method
without data-dependent control flow:

    encode_images(images)                                  -> image features
    embed(input_ids, image_features, image_token_positions) -> prompt embeddings
    prefill(embeds, attention_bias, ...)                   -> logits, KV cache, expert context
    decode_step(token, position_ids, cache_position, k_cache, v_cache, attention_bias)
                                                           -> logits, updated KV cache (returned)
    expert_velocity(x_t, t, expert_k, expert_v, cross_bias) -> velocity
    sample_actions(noise, expert_k, expert_v, cross_bias, dim_mask, num_steps) -> actions

Host-side masks and positions (token ids -> tensors) are in ``masks.py`` (numpy).

Shape legend: b batch, n cameras, h w c pixels, t prompt tokens, m image tokens,
l layers, kh KV heads, hd head dim, L cache length, e LLM width, d expert width,
ah chunk length, ad action dim (max_action_dim), V text vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.model.action_expert import ActionExpert, Modulation
from molmoact2_edge.model.connector import VisionBackbone
from molmoact2_edge.model.flow import euler_sample
from molmoact2_edge.model.layers import RMSNorm
from molmoact2_edge.model.llm import LLM


@dataclass
class PrefillOutput:
    """What ``prefill`` returns (tensors only, so export can name them)."""

    logits: torch.Tensor  # (b, t, V)
    hidden: torch.Tensor  # (b, t, e) after ln_f
    k_cache: torch.Tensor  # (l, b, kh, L, hd), post-QK-norm and post-RoPE; zeros beyond t
    v_cache: torch.Tensor  # (l, b, kh, L, hd)
    expert_k: torch.Tensor | None  # (l, b, t, d) projected + normalized context for the expert
    expert_v: torch.Tensor | None  # (l, b, t, d)


class MolmoAct2Model(nn.Module):
    """``model``: the three towers (and the optional depth gate) under their released names."""

    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        self.transformer = LLM(config.text_config)
        self.vision_backbone = VisionBackbone(config)
        if config.add_action_expert:
            self.action_expert = ActionExpert(config)
            if config.action_expert_depth_gate:
                kv = config.text_config.kv_dim
                self.action_expert_depth_gate: nn.Module = (
                    nn.ModuleList([nn.Linear(kv, 1) for _ in range(config.text_config.num_hidden_layers)])
                    if config.action_expert_depth_gate_per_layer
                    else nn.Linear(kv, 1)
                )


class MolmoAct2(nn.Module):
    """The MolmoAct2 network (``MolmoAct2ForConditionalGeneration`` layout)."""

    def __init__(self, config: MolmoAct2Config) -> None:
        super().__init__()
        self.config = config
        self.model = MolmoAct2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

    # --- construction ---------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter's initialization, in one place (std = config.initializer_range):

        | parameters                                         | init                       |
        |----------------------------------------------------|----------------------------|
        | every Linear weight, wte tables, positional table  | normal(0, std)             |
        | connector (pooling attention, projector) weights   | normal(0, 1/sqrt(fan_in))  |
        | every Linear bias                                  | 0                          |
        | RMSNorm / LayerNorm weights, LayerNorm biases      | 1 / 0                      |
        | expert ``*.modulation.linear`` weight and bias      | 0 (adaLN-Zero: gates start closed) |
        | expert ``final_layer.linear`` weight and bias       | 0 (velocity starts at 0, DiT)      |
        | depth gate weight / bias                           | 0 / depth_gate_init_bias   |
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        wte = self.model.transformer.wte
        nn.init.normal_(wte.embedding, 0.0, std)
        nn.init.normal_(wte.new_embedding, 0.0, std)
        nn.init.normal_(self.model.vision_backbone.image_vit.positional_embedding, 0.0, std)
        # The connector is a chain without residuals (pooling q/k/v/o, then a SwiGLU whose output is a
        # product of two projections). At std 0.02 each layer shrinks its input ~0.3x and the product
        # squares it: a from-scratch model's image features start near 1e-6 with a vanishing gradient,
        # and the policy trains blind (measured: loss unchanged with shuffled images). Fan-in scaling
        # keeps the features at the embeddings' scale. Released checkpoints load over this anyway.
        vision = self.model.vision_backbone
        for module in [*vision.image_pooling_2d.modules(), *vision.image_projector.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, module.in_features**-0.5)
        if self.config.add_action_expert:
            expert = self.model.action_expert
            for module in expert.modules():
                if isinstance(module, Modulation):  # every block's and the final layer's
                    nn.init.zeros_(module.linear.weight)
                    nn.init.zeros_(module.linear.bias)
            nn.init.zeros_(expert.final_layer.linear.weight)
            nn.init.zeros_(expert.final_layer.linear.bias)
            if self.config.action_expert_depth_gate:
                for module in self.model.action_expert_depth_gate.modules():
                    if isinstance(module, nn.Linear):
                        nn.init.zeros_(module.weight)
                        nn.init.constant_(module.bias, self.config.action_expert_depth_gate_init_bias)

    @classmethod
    def from_config(cls, config: MolmoAct2Config, seed: int | None = 0) -> MolmoAct2:
        """A freshly initialized model; ``seed`` makes it deterministic (None: use the global RNG)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.init_weights()
        return model

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component: vit, connector, llm, lm_head, action_expert, depth_gate, total."""
        groups = {
            "vit": "model.vision_backbone.image_vit.",
            "connector": "model.vision_backbone.image_",  # pooling + projector (image_vit counted above)
            "llm": "model.transformer.",
            "lm_head": "lm_head.",
            "action_expert": "model.action_expert.",
            "depth_gate": "model.action_expert_depth_gate",
        }
        counts = dict.fromkeys(groups, 0)
        for name, p in self.named_parameters():
            for group, prefix in groups.items():
                if name.startswith(prefix) and not (group == "connector" and name.startswith(groups["vit"])):
                    counts[group] += p.numel()
                    break
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # --- entry points ---------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, n, h, w, 3) uint8 at the ViT input size -> features (b, n*m, e), camera-major."""
        return self.model.vision_backbone(images)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (b, t) int64 (-1 = pad) -> (b, t, e)."""
        return self.model.transformer.wte(input_ids)

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None, image_token_positions: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with image features ADDED at the <im_patch> positions (§4.6).

        input_ids (b, t); image_features (b, m, e); image_token_positions (b, m) int64 indices into t,
        in the order of the features (``masks.image_token_positions``).
        """
        x = self.embed_tokens(input_ids)
        if image_features is None or image_token_positions is None:
            return x
        index = image_token_positions[..., None].expand(-1, -1, x.shape[-1])  # (b, m, e)
        return x.scatter_add(1, index, image_features.to(x.dtype))

    def prefill(
        self,
        embeds: torch.Tensor,
        attention_bias: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache_len: int | None = None,
        context_valid: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
    ) -> PrefillOutput:
        """Full-sequence forward over the prompt.

        embeds (b, t, e); attention_bias (b, 1, t, t) float (``masks.prefill_attention_bias``);
        position_ids (b, t) int64 (default 0..t-1); cache_len L >= t pads the returned
        KV cache with zeros to the static decode length (default t). ``context_valid``
        (b, t) bool and ``depth_mask`` (b, t) bool are needed only with the depth gate.
        """
        B, T, _ = embeds.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=embeds.device)[None].expand(B, T)
        hidden, k, v = self.model.transformer(embeds, position_ids, attention_bias)  # k, v (l, b, kh, t, hd)
        logits = self.lm_head(hidden)
        expert_k = expert_v = None
        if self.config.add_action_expert:
            expert_k, expert_v = self.expert_context(k, v, context_valid, depth_mask)
        if cache_len is not None and cache_len > T:
            pad = (0, 0, 0, cache_len - T)  # zeros after the prompt along the cache axis
            k, v = F.pad(k, pad), F.pad(v, pad)
        return PrefillOutput(logits, hidden, k, v, expert_k, expert_v)

    def expert_context(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        context_valid: torch.Tensor | None = None,
        depth_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM K/V (l, b, kh, t, hd) -> the expert's projected context (l, b, t, d), depth gate included.

        With ``action_expert_depth_gate`` the raw K and V at valid depth-token positions are scaled
        by the gate BEFORE the shared projection (as the release's training code does); then
        ``context_valid`` (b, t) bool and ``depth_mask`` (b, t) bool are required.
        """
        if self.config.action_expert_depth_gate:
            assert context_valid is not None and depth_mask is not None, "the depth gate needs context_valid and depth_mask"
            scale = self._depth_gate(v_cache, context_valid, depth_mask)  # (l or 1, b, 1, t, 1)
            k_cache, v_cache = k_cache * scale, v_cache * scale
        return self.model.action_expert.project_context(k_cache, v_cache)

    def _depth_gate(self, values: torch.Tensor, valid: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Scale (l or 1, b, 1, t, 1) for the LLM K/V handed to the expert: the gate at depth tokens, else 1.

        gate = sigmoid(Linear(mean of V over valid non-depth positions)), from the last layer's V
        (one Linear) or from each layer's own V (per-layer ModuleList), as the release's training
        code does; all valid positions are pooled when a row has no valid non-depth token.
        """
        L, B, KH, T, HD = values.shape
        flat = values.permute(0, 1, 3, 2, 4).reshape(L, B, T, KH * HD)  # (l, b, t, kh*hd)
        depth = depth & valid
        keep = valid & ~depth
        # all valid if none; Where on float masks (onnxruntime has no bool Where kernel)
        keep = torch.where(keep.any(-1, keepdim=True), keep.to(flat.dtype), valid.to(flat.dtype))
        mean = (flat * keep[None, ..., None]).sum(2) / keep.sum(-1).clamp(min=1.0)[None, :, None]  # (l, b, kh*hd)
        gate_mod = self.model.action_expert_depth_gate
        if isinstance(gate_mod, nn.ModuleList):
            gate = torch.stack([torch.sigmoid(g(mean[i])) for i, g in enumerate(gate_mod)])  # (l, b, 1)
        else:
            gate = torch.sigmoid(gate_mod(mean[-1]))[None]  # (1, b, 1)
        gate = gate[:, :, :, None, None]  # (l or 1, b, 1, 1, 1)
        return torch.where(depth[None, :, None, :, None], gate, torch.ones_like(gate))

    def decode_step(
        self,
        token: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attention_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One (or a few) new tokens against the static cache.

        token: ids (b, s) int64 or embeddings (b, s, e); position_ids (b, s); cache_position (s,)
        int64 slots to write; k_cache/v_cache (l, b, kh, L, hd); attention_bias (b, 1, s, L)
        (``masks.decode_attention_bias``, the new slots included). Returns logits (b, s, V) and
        NEW caches (the inputs are not modified).
        """
        embeds = self.embed_tokens(token) if not token.is_floating_point() else token
        hidden, k, v = self.model.transformer(embeds, position_ids, attention_bias, k_cache, v_cache, cache_position)
        return self.lm_head(hidden), k, v

    def expert_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, expert_k: torch.Tensor, expert_v: torch.Tensor, cross_bias: torch.Tensor
    ) -> torch.Tensor:
        """x_t (b, ah, ad), t (b,), expert_k/v (l, b, t, d), cross_bias (b, 1, 1, t) -> velocity (b, ah, ad)."""
        return self.model.action_expert(x_t, t, expert_k, expert_v, cross_bias)

    def sample_actions(
        self,
        noise: torch.Tensor,
        expert_k: torch.Tensor,
        expert_v: torch.Tensor,
        cross_bias: torch.Tensor,
        dim_mask: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """Euler-integrate the flow from ``noise`` (b, ah, ad) -> normalized actions (b, ah, ad) fp32.

        dim_mask (1, 1, ad) or (b, 1, ad): 1 = real action dim (``flow.action_dim_mask``); ignored
        unless ``mask_action_dim_padding``. num_steps defaults to ``flow_matching_num_steps``.
        """
        steps = num_steps if num_steps is not None else self.config.flow_matching_num_steps
        mask = dim_mask if self.config.mask_action_dim_padding else None

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.expert_velocity(x, t, expert_k, expert_v, cross_bias)

        return euler_sample(velocity, noise, steps, mask)
