"""Model configuration: the released MolmoAct2 ``config.json`` as frozen dataclasses, plus presets.

Torch-free on purpose: the device side reads configs (bundle manifests embed
one). Field names and nesting are exactly the released ones
(``reference/molmoact2-checkpoint.md`` §2), so ``from_json`` reads a downloaded
``config.json`` and ``to_json`` writes one the Hugging Face remote code accepts.
Keys this module does not know (``auto_map``, ``transformers_version``, ...) are
kept in each dataclass's ``extra`` and written back unchanged.

Added-token ids (``<state_i>``, ``<action_i>``, ``<depth_i>``, markers, image
tokens) live here and nowhere else; :func:`token_layout` derives them from a
base text vocabulary by the release's assignment rule (§6), which is how the
presets get theirs.

Presets (``get_preset``): ``tiny`` (tests, < 5M parameters), ``small`` (the
bundled demo, CPU-trainable, 2 cameras at 112 px), ``molmoact2-4b`` (release
shapes, 5,442,196,208 parameters).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from molmoact2_edge.errors import ConfigError

ACTION_MODES = ("continuous", "discrete", "both")
QK_NORM_TYPES = ("qwen3", "olmo")

_T = TypeVar("_T")


# --- generic dict <-> dataclass with unknown keys preserved ---------------------------------


def _known_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]


def _split_known(cls: type, data: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = set(_known_fields(cls))
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _to_dict(obj: Any) -> dict[str, Any]:
    out = {name: _jsonable(getattr(obj, name)) for name in _known_fields(type(obj))}
    out.update(_jsonable(dict(obj.extra)))
    return out


def _build(cls: type[_T], data: Mapping[str, Any], where: str, **converted: Any) -> _T:
    known, extra = _split_known(cls, data, where)
    known.update(converted)
    factory: Any = cls  # a dataclass with an ``extra`` field (mypy cannot see that through the TypeVar)
    try:
        return factory(**known, extra=extra)
    except TypeError as err:  # a wrong type that the dataclass could not take
        raise ConfigError(f"{where}: {err}") from err


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --- sub-configs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VitConfig:
    """SigLIP2-style ViT (``vit_config``)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27  # of the source ViT; only max(vit_layers)+1 blocks are built and stored
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    image_default_input_size: tuple[int, int] = (378, 378)  # (h, w) every crop is resized to
    image_patch_size: int = 14
    image_num_pos: int = 729  # positional table rows = patch grid (27x27, no CLS); must match the input size
    float32_attention: bool = True
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    attn_implementation: str = "sdpa"
    model_type: str = "molmoact2"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        h, w = self.image_default_input_size
        p = self.image_patch_size
        _check(h % p == 0 and w % p == 0, f"vit_config: image size {h}x{w} is not a multiple of patch {p}")
        _check(
            self.image_num_pos == (h // p) * (w // p),
            f"vit_config: image_num_pos {self.image_num_pos} != patch grid {h // p}x{w // p} "
            "(positional-embedding interpolation is not supported; resize inputs to the trained size)",
        )
        _check(
            self.num_attention_heads * self.head_dim == self.hidden_size,
            f"vit_config: heads {self.num_attention_heads} x head_dim {self.head_dim} != hidden {self.hidden_size}",
        )
        _check(self.num_key_value_heads == self.num_attention_heads, "vit_config: the ViT has no GQA")

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of patches per crop."""
        h, w = self.image_default_input_size
        return h // self.image_patch_size, w // self.image_patch_size

    @property
    def patch_dim(self) -> int:
        """Values per patch: 3 * patch^2, ordered (row, col, channel)."""
        return 3 * self.image_patch_size**2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VitConfig:
        size = data.get("image_default_input_size", cls.image_default_input_size)
        return _build(cls, data, "vit_config", image_default_input_size=tuple(size))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class AdapterConfig:
    """Connector: two ViT layers concatenated, 2x2 attention pooling, SwiGLU projector (``adapter_config``)."""

    vit_layers: tuple[int, ...] = (-3, -9)  # ViT block outputs to concatenate, negative = from the end
    pooling_attention_mask: bool = True  # mask invalid (padded) entries of each 2x2 window (release: true)
    hidden_size: int = 1152
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    float32_attention: bool = True
    hidden_act: str = "silu"
    intermediate_size: int = 9728  # projector SwiGLU width
    text_hidden_size: int = 2560  # projector output = LLM width
    image_feature_dropout: float = 0.0
    pooling_size: tuple[int, int] = (2, 2)  # processor default, not in the released config.json
    model_type: str = "molmoact2"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        _check(len(self.vit_layers) >= 1, "adapter_config: vit_layers is empty")
        _check(
            self.num_attention_heads * self.head_dim == self.hidden_size,
            f"adapter_config: heads {self.num_attention_heads} x head_dim {self.head_dim} != hidden {self.hidden_size}",
        )
        _check(self.pooling_size == (2, 2), f"adapter_config: only 2x2 pooling is supported, got {self.pooling_size}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        return _build(
            cls,
            data,
            "adapter_config",
            vit_layers=tuple(data.get("vit_layers", cls.vit_layers)),
            pooling_size=tuple(data.get("pooling_size", cls.pooling_size)),
        )

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        if self.pooling_size == (2, 2) and "pooling_size" not in self.extra:
            del out["pooling_size"]  # the release does not write it
        return out


@dataclass(frozen=True)
class TextConfig:
    """Qwen3-style decoder (``text_config``)."""

    hidden_size: int = 2560
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    vocab_size: int = 154624  # rows of wte.embedding and lm_head: base text + added tokens, padded to 1024
    additional_vocab_size: int = 128  # rows of wte.new_embedding: image/video specials at ids >= vocab_size
    qkv_bias: bool = False
    hidden_act: str = "silu"
    use_qk_norm: bool = True
    qk_norm_type: str = "qwen3"  # "qwen3": per-head RMSNorm (weight [hd]); "olmo": over the projection
    layer_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    rope_scaling: dict[str, Any] | None = None
    rope_scaling_layers: list[int] | None = None
    max_position_embeddings: int = 16384
    norm_after: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "molmoact2_text"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"text_config: {self.num_attention_heads} query heads not divisible by {self.num_key_value_heads} KV heads",
        )
        _check(self.head_dim % 2 == 0, f"text_config: head_dim {self.head_dim} must be even for RoPE")
        _check(self.qk_norm_type in QK_NORM_TYPES, f"text_config: qk_norm_type {self.qk_norm_type!r} not in {QK_NORM_TYPES}")
        _check(self.rope_scaling is None and not self.rope_scaling_layers, "text_config: rope_scaling is not supported")
        _check(not self.norm_after, "text_config: norm_after=true (post-norm blocks) is not supported")
        _check(not self.tie_word_embeddings, "text_config: tied embeddings are not supported (releases never tie)")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextConfig:
        return _build(cls, data, "text_config")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class ActionExpertConfig:
    """Flow-matching DiT conditioned on the LLM's per-layer K/V (``action_expert_config``).

    ``max_action_horizon`` / ``max_action_dim`` are top-level fields: the release
    strips them from this dict on save and injects them on load.
    """

    hidden_size: int = 768
    num_layers: int = 36  # one expert block per LLM layer (hard check)
    num_heads: int = 8  # head_dim 96; from third-party ports, unverified (parameter count cannot tell)
    mlp_ratio: float = 4.0
    ffn_multiple_of: int = 256  # MLP width = ceil(int(hidden*ratio)/multiple)*multiple
    timestep_embed_dim: int = 256
    dropout: float = 0.0
    attn_dropout: float = 0.0
    context_layer_norm: bool = True  # weightless RMSNorm on the projected context K/V
    qk_norm: bool = True
    qk_norm_eps: float = 1e-6
    rope: bool = True  # RoPE over chunk positions in self-attention
    causal_attn: bool = False
    model_type: str = "molmoact2_action_expert"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        _check(
            self.hidden_size % self.num_heads == 0,
            f"action_expert_config: hidden {self.hidden_size} not divisible by {self.num_heads} heads",
        )
        _check(self.head_dim % 2 == 0, f"action_expert_config: head_dim {self.head_dim} must be even for RoPE")
        _check(self.timestep_embed_dim % 2 == 0, "action_expert_config: timestep_embed_dim must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        raw = int(self.hidden_size * self.mlp_ratio)
        return math.ceil(raw / self.ffn_multiple_of) * self.ffn_multiple_of

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionExpertConfig:
        data = {k: v for k, v in data.items() if k not in ("max_action_horizon", "max_action_dim")}
        return _build(cls, data, "action_expert_config")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


# --- token layout (§6) ----------------------------------------------------------------------

# Image/video specials, in id order starting exactly at text vocab_size (they index wte.new_embedding).
IMAGE_TOKENS = (
    "image_start_token_id",  # <im_start>
    "image_end_token_id",  # <im_end>
    "image_patch_id",  # <im_patch>: positions that receive pooled image features
    "image_col_id",  # <im_col>
    "low_res_image_start_token_id",  # <low_res_im_start>
    None,  # <|image|> (no config field)
    "image_low_res_id",  # <im_low>
    "frame_start_token_id",  # <frame_start>
    "frame_end_token_id",  # <frame_end>
)


def token_layout(
    base_vocab_size: int,
    num_state_tokens: int = 256,
    num_action_tokens: int = 2048,
    num_depth_tokens: int = 128,
    vocab_multiple: int = 1024,
) -> dict[str, int]:
    """Token-id fields of ``config.json`` by the release's assignment rule (reference §6).

    Added tokens follow the base text vocabulary in this order: setup markers (2),
    control markers (2), state markers (2) + ``<state_i>``, ``<action_output>``,
    action markers (2) + ``<action_i>``, ``<depth_output>``, depth markers (2) +
    ``<depth_i>``; unused ``<extra_i>`` pad the text vocabulary to a multiple of
    ``vocab_multiple``; image specials start exactly there. With the Qwen3 base
    (151,669) this gives the release ids (``<action_0>`` = 151934, ``<im_start>`` = 154624).
    Returned keys include ``vocab_size`` (text vocabulary, for ``text_config``).
    """
    ids: dict[str, int] = {}
    nxt = base_vocab_size
    for name in ("setup_start_token_id", "setup_end_token_id", "control_start_token_id", "control_end_token_id"):
        ids[name] = nxt
        nxt += 1
    ids["state_start_token_id"], ids["state_end_token_id"], ids["state_token_start_id"] = nxt, nxt + 1, nxt + 2
    nxt += 2 + num_state_tokens
    ids["action_output_token_id"], ids["action_start_token_id"], ids["action_end_token_id"] = nxt, nxt + 1, nxt + 2
    ids["action_token_start_id"] = nxt + 3
    nxt += 3 + num_action_tokens
    ids["depth_output_token_id"], ids["depth_start_token_id"], ids["depth_end_token_id"] = nxt, nxt + 1, nxt + 2
    ids["depth_token_start_id"] = nxt + 3
    nxt += 3 + num_depth_tokens
    vocab_size = math.ceil(nxt / vocab_multiple) * vocab_multiple
    for offset, image_field in enumerate(IMAGE_TOKENS):
        if image_field is not None:
            ids[image_field] = vocab_size + offset
    ids["vocab_size"] = vocab_size
    ids["num_state_tokens"], ids["num_action_tokens"], ids["num_depth_tokens"] = (
        num_state_tokens,
        num_action_tokens,
        num_depth_tokens,
    )
    return ids


# --- top level ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MolmoAct2Config:
    """The whole ``config.json``. Token-id fields are ``None`` only in a config that lacks them."""

    vit_config: VitConfig = field(default_factory=VitConfig)
    adapter_config: AdapterConfig = field(default_factory=AdapterConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    action_expert_config: ActionExpertConfig | None = field(default_factory=ActionExpertConfig)
    add_action_expert: bool = True  # false: VLM-only checkpoint, no model.action_expert.* tensors
    max_action_dim: int = 32  # width of the expert's action I/O; robot dims beyond are padding
    max_action_horizon: int = 30  # longest chunk (ah) the expert produces
    n_obs_steps: int = 1  # output slice starts at n_obs_steps-1; a missing key means 30 in the release code
    action_mode: str = "both"  # "both" masks eos and <action_start>..<action_end> spans from the expert context
    state_format: str = "discrete"
    flow_matching_num_steps: int = 10  # Euler steps at inference
    flow_matching_cutoff: float = 1.0  # training t-law: t = offset + min(cutoff-offset, scale)*Beta(a, b)
    flow_matching_time_offset: float = 0.001
    flow_matching_time_scale: float = 0.999
    flow_matching_beta_alpha: float = 1.0
    flow_matching_beta_beta: float = 1.5
    mask_action_dim_padding: bool = True  # zero padded action dims on noise, velocity and every step
    # training-time RTC (molmoact2_edge/rtc.py): the expert was trained with committed prefixes of up to
    # this many steps fed clean at flow time 1; export and runtime then condition on the prefix. 0: off
    rtc_max_delay: int = 0
    enable_depth_reasoning: bool = False  # MolmoAct2-Think: decode depth tokens before acting
    num_depth_codes: int = 100  # depth tokens generated per image (10x10 grid)
    action_expert_depth_gate: bool = False
    action_expert_depth_gate_per_layer: bool = False
    action_expert_depth_gate_init_bias: float = -4.0
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    image_patch_id: int | None = None
    image_col_id: int | None = None
    low_res_image_start_token_id: int | None = None
    image_low_res_id: int | None = None
    frame_start_token_id: int | None = None
    frame_end_token_id: int | None = None
    use_frame_special_tokens: bool = True
    # Setup/control marker ids are not fields of the released config.json (the tokenizer has them);
    # None means "derive by the §6 rule": the four ids just before state_start_token_id.
    setup_start_token_id: int | None = None
    setup_end_token_id: int | None = None
    control_start_token_id: int | None = None
    control_end_token_id: int | None = None
    action_output_token_id: int | None = None
    action_start_token_id: int | None = None
    action_end_token_id: int | None = None
    action_token_start_id: int | None = None
    num_action_tokens: int = 2048  # <action_i> = action_token_start_id + i = OpenFAST BPE id i
    state_start_token_id: int | None = None
    state_end_token_id: int | None = None
    state_token_start_id: int | None = None
    num_state_tokens: int = 256  # state bins
    depth_output_token_id: int | None = None
    depth_start_token_id: int | None = None
    depth_end_token_id: int | None = None
    depth_token_start_id: int | None = None
    num_depth_tokens: int = 0
    add_setup_tokens: bool = True
    add_control_tokens: bool = True
    norm_stats_filename: str = "norm_stats.json"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None  # Qwen has no BOS: the release uses <|im_end|>
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    model_type: str = "molmoact2"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        text, vit, adapter = self.text_config, self.vit_config, self.adapter_config
        _check(self.action_mode in ACTION_MODES, f"action_mode {self.action_mode!r} not in {ACTION_MODES}")
        _check(self.state_format == "discrete", f"state_format {self.state_format!r}: only 'discrete' exists")
        _check(
            1 <= self.n_obs_steps <= self.max_action_horizon,
            f"n_obs_steps {self.n_obs_steps} outside 1..max_action_horizon {self.max_action_horizon}",
        )
        _check(self.flow_matching_num_steps >= 1, "flow_matching_num_steps must be >= 1")
        _check(
            adapter.text_hidden_size == text.hidden_size,
            f"adapter_config.text_hidden_size {adapter.text_hidden_size} != text_config.hidden_size {text.hidden_size}",
        )
        _check(
            adapter.hidden_size == vit.hidden_size,
            f"adapter_config.hidden_size {adapter.hidden_size} != vit_config.hidden_size {vit.hidden_size}",
        )
        for layer in adapter.vit_layers:
            _check(
                -vit.num_hidden_layers <= layer < vit.num_hidden_layers,
                f"adapter_config.vit_layers entry {layer} outside a {vit.num_hidden_layers}-layer ViT",
            )
        if self.add_action_expert:
            _check(self.action_expert_config is not None, "add_action_expert is true but action_expert_config is null")
            expert = self.action_expert_config
            assert expert is not None
            _check(
                expert.num_layers == text.num_hidden_layers,
                f"action_expert_config.num_layers {expert.num_layers} != text_config.num_hidden_layers "
                f"{text.num_hidden_layers} (one expert block per LLM layer)",
            )
        self._check_token_ids()

    def _check_token_ids(self) -> None:
        text = self.text_config
        ranges = {
            "state": (self.state_token_start_id, self.num_state_tokens),
            "action": (self.action_token_start_id, self.num_action_tokens),
            "depth": (self.depth_token_start_id, self.num_depth_tokens),
        }
        for family, (start, count) in ranges.items():
            if start is not None:
                _check(
                    start >= 0 and start + count <= text.vocab_size,
                    f"<{family}_i> ids {start}..{start + count - 1} do not fit the text vocabulary ({text.vocab_size})",
                )
        for name in IMAGE_TOKENS:
            value = getattr(self, name) if name else None
            if value is not None:
                _check(
                    text.vocab_size <= value < text.vocab_size + text.additional_vocab_size,
                    f"{name} {value} must index wte.new_embedding: ids "
                    f"{text.vocab_size}..{text.vocab_size + text.additional_vocab_size - 1}",
                )

    # --- derived ----------------------------------------------------------------------------

    @property
    def resolved_vit_layers(self) -> tuple[int, ...]:
        """Adapter ViT layers as non-negative block indices (release: (24, 18))."""
        n = self.vit_config.num_hidden_layers
        return tuple(layer % n for layer in self.adapter_config.vit_layers)

    @property
    def num_vit_blocks(self) -> int:
        """ViT blocks actually built and stored: max(resolved vit_layers) + 1 (release: 25)."""
        return max(self.resolved_vit_layers) + 1

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """(rows, cols) of pooled image tokens per camera: ceil(grid / 2)."""
        rows, cols = self.vit_config.patch_grid
        return -(-rows // 2), -(-cols // 2)

    @property
    def tokens_per_image(self) -> int:
        """<im_patch> tokens (pooled features) per camera (release: 196)."""
        rows, cols = self.pooled_grid
        return rows * cols

    def marker_ids(self) -> dict[str, int]:
        """Setup/control marker ids, from the config or by the §6 rule (just before <state_start>)."""
        explicit = {
            "setup_start_token_id": self.setup_start_token_id,
            "setup_end_token_id": self.setup_end_token_id,
            "control_start_token_id": self.control_start_token_id,
            "control_end_token_id": self.control_end_token_id,
        }
        if all(v is not None for v in explicit.values()):
            return {k: int(v) for k, v in explicit.items() if v is not None}
        if self.state_start_token_id is None:
            raise ConfigError("config has neither setup/control marker ids nor state_start_token_id to derive them")
        base = self.state_start_token_id - 4
        return {name: base + i for i, name in enumerate(explicit)}

    def require_token_ids(self, *names: str) -> tuple[int, ...]:
        """The named token-id fields as ints; ConfigError naming any that the config lacks."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"config.json lacks token id field(s) {missing}")
        return tuple(int(getattr(self, n)) for n in names)

    def with_changes(self, **changes: Any) -> MolmoAct2Config:
        """A copy with some top-level fields replaced (re-validated)."""
        return dataclasses.replace(self, **changes)

    # --- JSON -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MolmoAct2Config:
        known, _ = _split_known(cls, data, "config.json")
        converted: dict[str, Any] = {
            "vit_config": VitConfig.from_dict(known.get("vit_config") or {}),
            "adapter_config": AdapterConfig.from_dict(known.get("adapter_config") or {}),
            "text_config": TextConfig.from_dict(known.get("text_config") or {}),
        }
        expert = known.get("action_expert_config")
        add_expert = bool(known.get("add_action_expert", True))
        converted["action_expert_config"] = (
            ActionExpertConfig.from_dict(expert) if expert is not None else (ActionExpertConfig() if add_expert else None)
        )
        if "n_obs_steps" not in data:
            # The release code's class default is 30, which would slice actions from index 29.
            raise ConfigError("config.json lacks n_obs_steps (the release writes 1); add \"n_obs_steps\": 1")
        return _build(cls, data, "config.json", **converted)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["vit_config"] = self.vit_config.to_dict()
        out["adapter_config"] = self.adapter_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["action_expert_config"] = self.action_expert_config.to_dict() if self.action_expert_config else None
        for name in ("setup_start_token_id", "setup_end_token_id", "control_start_token_id", "control_end_token_id"):
            if out[name] is None and name not in self.extra:
                del out[name]  # not a released field: write it only when set
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> MolmoAct2Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: no such config file") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")


# --- presets --------------------------------------------------------------------------------

_PRESETS: dict[str, Callable[[], MolmoAct2Config]] = {}


def register_preset(name: str) -> Callable[[Callable[[], MolmoAct2Config]], Callable[[], MolmoAct2Config]]:
    """Decorator adding a preset factory; a duplicate name is an error at import."""

    def wrap(factory: Callable[[], MolmoAct2Config]) -> Callable[[], MolmoAct2Config]:
        if name in _PRESETS:
            raise ConfigError(f"preset {name!r} registered twice")
        _PRESETS[name] = factory
        return factory

    return wrap


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> MolmoAct2Config:
    """The named preset; ConfigError with the closest name for a typo."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Known: {preset_names()}")
    return _PRESETS[name]()


def _special_ids(base_vocab_size: int) -> dict[str, Any]:
    """bos/eos/pad for a base vocabulary laid out like Qwen's tail: <|endoftext|>, <|im_start|>, <|im_end|>."""
    return {"pad_token_id": base_vocab_size - 3, "bos_token_id": base_vocab_size - 1, "eos_token_id": base_vocab_size - 1}


def _layout_fields(base_vocab_size: int, num_depth_tokens: int) -> tuple[int, dict[str, Any]]:
    ids: dict[str, Any] = dict(token_layout(base_vocab_size, num_depth_tokens=num_depth_tokens))
    vocab = ids.pop("vocab_size")
    return vocab, ids


QWEN3_BASE_VOCAB = 151669  # Qwen3 tokenizer: ids 0..151668
SMALL_BASE_VOCAB = 2048  # text vocabulary of the tiny/small presets' tokenizer (ids 0..2047; specials last)


@register_preset("molmoact2-4b")
def _molmoact2_4b() -> MolmoAct2Config:
    vocab, ids = _layout_fields(QWEN3_BASE_VOCAB, num_depth_tokens=128)
    markers = {k: ids.pop(k) for k in list(ids) if k.startswith(("setup_", "control_"))}
    del markers  # released config.json has no marker fields; they are derived (marker_ids)
    return MolmoAct2Config(
        text_config=TextConfig(vocab_size=vocab),
        **ids,
        # Qwen3: <|endoftext|> 151643, <|im_end|> 151645 (BOS = <|im_end|>)
        bos_token_id=151645,
        eos_token_id=151645,
        pad_token_id=151643,
        extra={"architectures": ["MolmoAct2ForConditionalGeneration"], "dtype": "float32"},
    )


@register_preset("small")
def _small() -> MolmoAct2Config:
    vocab, ids = _layout_fields(SMALL_BASE_VOCAB, num_depth_tokens=128)
    return MolmoAct2Config(
        vit_config=VitConfig(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=64,
            image_default_input_size=(112, 112),
            image_patch_size=14,
            image_num_pos=64,
        ),
        adapter_config=AdapterConfig(
            vit_layers=(-1, -3),
            hidden_size=192,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=64,
            intermediate_size=768,
            text_hidden_size=256,
        ),
        text_config=TextConfig(
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=768,
            vocab_size=vocab,
            max_position_embeddings=1024,
        ),
        action_expert_config=ActionExpertConfig(
            hidden_size=192, num_layers=6, num_heads=4, mlp_ratio=4.0, ffn_multiple_of=64, timestep_embed_dim=64
        ),
        max_action_dim=32,
        max_action_horizon=30,
        **ids,
        **_special_ids(SMALL_BASE_VOCAB),
    )


@register_preset("small-fast")
def _small_fast() -> MolmoAct2Config:
    """The bundled demo policy: CPU-trainable in minutes (so101-touch: 16.5 on 2 cores), 6x6 pooled tokens per 96 px camera.

    Against ``small``: 8 px patches at 96 px give each camera 36 image tokens (16 px of the image
    each, against 28 px for ``small``'s 4x4 grid at 112 px), so the cube covers several tokens,
    while narrower and shallower blocks make a training step several times cheaper.
    """
    vocab, ids = _layout_fields(SMALL_BASE_VOCAB, num_depth_tokens=128)
    return MolmoAct2Config(
        vit_config=VitConfig(
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=32,
            image_default_input_size=(96, 96),
            image_patch_size=8,
            image_num_pos=144,
        ),
        adapter_config=AdapterConfig(
            vit_layers=(-1, -2),
            hidden_size=96,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=32,
            intermediate_size=256,
            text_hidden_size=128,
        ),
        text_config=TextConfig(
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=384,
            vocab_size=vocab,
            max_position_embeddings=1024,
        ),
        action_expert_config=ActionExpertConfig(
            hidden_size=96, num_layers=3, num_heads=3, mlp_ratio=4.0, ffn_multiple_of=32, timestep_embed_dim=64
        ),
        max_action_dim=32,
        max_action_horizon=30,
        **ids,
        **_special_ids(SMALL_BASE_VOCAB),
    )


@register_preset("tiny")
def _tiny() -> MolmoAct2Config:
    vocab, ids = _layout_fields(SMALL_BASE_VOCAB, num_depth_tokens=128)
    return MolmoAct2Config(
        vit_config=VitConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            image_default_input_size=(64, 64),
            image_patch_size=8,
            image_num_pos=64,
        ),
        adapter_config=AdapterConfig(
            vit_layers=(-1, -2),
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=64,
            text_hidden_size=64,
        ),
        text_config=TextConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=vocab,
            max_position_embeddings=512,
        ),
        action_expert_config=ActionExpertConfig(
            hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=4.0, ffn_multiple_of=32, timestep_embed_dim=32
        ),
        max_action_dim=8,
        max_action_horizon=8,
        **ids,
        **_special_ids(SMALL_BASE_VOCAB),
    )
