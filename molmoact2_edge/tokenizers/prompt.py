"""The released robot prompt: template, task normalization, state bins, image-token layout, buckets.

Torch-free (numpy + the text tokenizer), shared by the PyTorch reference policy
and the device runtime. Reference: ``reference/molmoact2-checkpoint.md`` §4.2,
§4.3 and §11 A18. The prompt, exactly::

    {image prefix}<|im_start|>user
    The task is to {task}. The setup is {SETUP}.{STATE} The expected control mode is {CONTROL}. {QUESTION}<|im_end|>
    <|im_start|>assistant
    {TRIGGER}

tokenized without special tokens, then BOS (``<|im_end|>``) prepended. The
depth variant (MolmoAct2-Think) changes the question and the trigger.
Export uses fixed shapes, so ``PromptBuilder(bucket=...)`` right-pads to the
bucket and refuses (``PromptTooLongError``) rather than truncates. The prefill and
cross-attention masks of one prompt (§4.8, §4.9, A16) are at the end.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from molmoact2_edge.config import MolmoAct2Config
from molmoact2_edge.errors import PromptTooLongError, TokenizerError
from molmoact2_edge.tokenizers.text import TextTokenizer

QUESTION = "Given these, what action should the robot take to complete the task?"
DEPTH_QUESTION = (
    "Given these, first predict the depth map of the main image and then predict the action "
    "the robot should take to complete the task?"
)
TRIGGER = "<action_output>"
DEPTH_TRIGGER = "<depth_output><action_output>"
# Tokens that get token_type 1 (attend bidirectionally to each other at prefill, §4.2/§4.8).
IMAGE_TYPE_TOKENS = (
    "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>", "<im_low>",
)  # fmt: skip
NUM_STATE_BINS = 256

_OPENERS = "\"'`“‘«([{<"
_CLOSERS = "\"'`”’»)]}>"
_TRAILING = ".,!?;:…" + _CLOSERS
_LEADING_LABEL = re.compile(r"^(?:language instruction|instruction|task|goal)\s*[:\-]\s*", re.IGNORECASE)
_LEADING_PHRASE = re.compile(r"^(?:the|your) task is to\s+", re.IGNORECASE)


def normalize_task(task: str) -> str:
    """The release's task clean-up: whitespace, wrappers, labels, trailing punctuation, sentences -> '; ', lowercase."""
    text = " ".join(task.split())
    while True:
        before = text
        text = text.strip().lstrip(_OPENERS).rstrip(_TRAILING).strip()
        text = _LEADING_PHRASE.sub("", _LEADING_LABEL.sub("", text))
        if text == before:
            break
    sentences = [s.strip() for s in re.split(r"[.!?]+", text) if s.strip()]
    if len(sentences) > 1:
        text = "; ".join(sentences)
    return text.lower()


def state_bins(state_normalized: np.ndarray) -> np.ndarray:
    """(s,) normalized state -> (s,) int64 bins in [0, 255], computed in float32 like the release (A18)."""
    s = np.asarray(state_normalized, dtype=np.float32)
    s = np.nan_to_num(s, nan=0.0, posinf=1.0, neginf=-1.0)
    s = np.clip(s, -1.0, 1.0)
    scaled = (s + np.float32(1.0)) / np.float32(2.0) * np.float32(NUM_STATE_BINS - 1)
    return np.clip(np.round(scaled), 0, NUM_STATE_BINS - 1).astype(np.int64)  # np.round is half-to-even


@dataclass(frozen=True)
class ImageLayout:
    """Token layout of one single-crop camera image (release: 14 x 14 pooled grid, no column tokens = 198 tokens)."""

    grid_h: int = 14
    grid_w: int = 14
    col_tokens: bool = False  # processor use_single_crop_col_tokens

    @property
    def patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def tokens_per_image(self) -> int:
        return self.patches + 2 + (self.grid_h if self.col_tokens else 0)

    def text(self) -> str:
        row = "<im_patch>" * self.grid_w + ("<im_col>" if self.col_tokens else "")
        return "<im_start>" + row * self.grid_h + "<im_end>"

    def prefix(self, num_cameras: int) -> str:
        """One camera: the image string; several: ``Image k`` before each, in camera order."""
        if num_cameras == 1:
            return self.text()
        return "".join(f"Image {k}" + self.text() for k in range(1, num_cameras + 1))


@dataclass(frozen=True)
class PromptSpec:
    """Per-embodiment prompt facts: from norm_stats.json metadata and config.json flags."""

    setup_type: str
    control_mode: str
    add_setup_tokens: bool = True
    add_control_tokens: bool = True
    depth: bool = False  # MolmoAct2-Think: ask for the depth map first
    normalize_task: bool = True


def render_prompt(
    task: str,
    bins: Sequence[int] | np.ndarray | None,
    num_cameras: int,
    spec: PromptSpec,
    layout: ImageLayout,
) -> str:
    """The prompt string (without BOS)."""
    task = normalize_task(task) if spec.normalize_task else task
    setup = _wrap(spec.setup_type, "setup", spec.add_setup_tokens)
    control = _wrap(spec.control_mode, "control", spec.add_control_tokens)
    state = ""
    if bins is not None and len(bins):
        state = (
            " The current state of the robot is <state_start>"
            + "".join(f"<state_{int(b)}>" for b in bins)
            + "<state_end>."
        )
    question, trigger = (DEPTH_QUESTION, DEPTH_TRIGGER) if spec.depth else (QUESTION, TRIGGER)
    return (
        f"{layout.prefix(num_cameras)}<|im_start|>user\n"
        f"The task is to {task}. The setup is {setup}.{state} The expected control mode is {control}. {question}<|im_end|>\n"
        f"<|im_start|>assistant\n{trigger}"
    )


def prompt_corpus(tasks: Sequence[str], specs: Sequence[PromptSpec]) -> list[str]:
    """The text between the special tokens of every (task, spec) prompt: a corpus for
    ``train_small_tokenizer`` so that the template's words become single tokens."""
    layout = ImageLayout(1, 1)
    texts = (render_prompt(task, [0], 1, spec, layout) for task in tasks for spec in specs)
    return [piece for text in texts for piece in _SPECIAL.split(text) if piece]


_SPECIAL = re.compile(r"<[^<>\s]+>")


def _wrap(text: str, marker: str, add_markers: bool) -> str:
    return f"<{marker}_start>{text}<{marker}_end>" if add_markers and text else text


@dataclass
class Prompt:
    """A tokenized prompt, right-padded to ``len(input_ids)`` (the bucket, or the prompt itself).

    input_ids (t,) int64; attention_mask (t,) bool, False on pads; token_type_ids (t,) int64, 1 on
    image-type tokens; image_positions (n*m,) int64, where the pooled image features are added,
    in camera order then row-major; num_valid: tokens before the padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    image_positions: np.ndarray
    num_valid: int

    @property
    def position_ids(self) -> np.ndarray:
        """(t,) int64 0..t-1 over the whole sequence including BOS (pads only ever see valid keys)."""
        return np.arange(len(self.input_ids), dtype=np.int64)


def config_token_ids(config: MolmoAct2Config) -> dict[str, int]:
    """config.json's token-id fields that are set, plus the setup/control markers and the text vocab size."""
    ids = {
        f.name: int(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if (f.name.endswith("_id") or f.name.startswith("num_") and f.name.endswith("_tokens"))
        and getattr(config, f.name) is not None
    }
    ids.update(config.marker_ids())
    ids["vocab_size"] = config.text_config.vocab_size
    return ids


class PromptBuilder:
    """Builds prompt ids from text; every id comes from the tokenizer, checked against config.json's ids first.

    Takes the token ids as a mapping (released field names) rather than a config, so the device
    runtime builds prompts from a bundle manifest without the model config.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        token_ids: Mapping[str, int],
        layout: ImageLayout,
        bucket: int | None = None,
    ):
        """token_ids: config.json's id fields (``config_token_ids``), e.g. ``bos_token_id``, ``image_patch_id``."""
        tokenizer.check_ids(dict(token_ids), "config.json")
        self.tokenizer = tokenizer
        self.layout = layout
        self.bucket = bucket
        self.bos_id = int(token_ids["bos_token_id"])
        self.pad_id = int(token_ids["pad_token_id"])
        self.patch_id = int(token_ids["image_patch_id"])
        self.first_state_id = tokenizer.token_to_id("<state_0>")
        self.image_type_ids = np.array([tokenizer.token_to_id(t) for t in IMAGE_TYPE_TOKENS], dtype=np.int64)
        # (task, state length, cameras, spec) -> (the first prompt, where its state ids are), or None when the swap
        # did not check out: the control loop asks for the same prompt every chunk but the state, and encoding
        # it is most of building it
        self._templates: dict[tuple[str, int | None, int, PromptSpec], tuple[Prompt, np.ndarray] | None] = {}

    @classmethod
    def from_config(
        cls, tokenizer: TextTokenizer, config: MolmoAct2Config, bucket: int | None = None
    ) -> PromptBuilder:
        """The release layout: the config's pooled grid per camera, no column tokens (use_single_crop_col_tokens=false)."""
        return cls(tokenizer, config_token_ids(config), ImageLayout(*config.pooled_grid), bucket)

    def build(
        self, task: str, bins: Sequence[int] | np.ndarray | None, num_cameras: int, spec: PromptSpec
    ) -> Prompt:
        key = (task, None if bins is None else len(bins), num_cameras, spec)
        template = self._templates.get(key)
        if template is not None and bins is not None:  # the same prompt but the state: swap the state ids
            prompt, slots = template
            ids = prompt.input_ids.copy()
            ids[slots] = self.first_state_id + np.asarray(bins, dtype=np.int64)
            return dataclasses.replace(prompt, input_ids=ids)  # masks and positions do not depend on the state
        ids = self._encode(task, bins, num_cameras, spec)
        prompt = self.pad(ids, task)
        if bins is not None and len(bins) and key not in self._templates:  # checked once per task, kept either way
            slots = np.flatnonzero(self._is_state(ids))
            swaps = self._state_swaps_exactly(ids, slots, task, bins, num_cameras, spec)
            for shared in (prompt.attention_mask, prompt.token_type_ids, prompt.image_positions) if swaps else ():
                shared.flags.writeable = False  # every later prompt of the task holds these very arrays
            self._templates[key] = (prompt, slots) if swaps else None
        return prompt

    def _encode(
        self, task: str, bins: Sequence[int] | np.ndarray | None, num_cameras: int, spec: PromptSpec
    ) -> np.ndarray:
        text = render_prompt(task, bins, num_cameras, spec, self.layout)
        ids = self.tokenizer.encode(text)
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id, *ids]
        array = np.asarray(ids, dtype=np.int64)
        if bins is not None and int(self._is_state(array).sum()) != len(bins):
            raise TokenizerError(
                f"state tokens did not survive tokenization: expected {len(bins)} in {text!r}"
            )
        return array

    def _is_state(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= self.first_state_id) & (ids < self.first_state_id + NUM_STATE_BINS)

    def _state_swaps_exactly(
        self,
        ids: np.ndarray,
        slots: np.ndarray,
        task: str,
        bins: Sequence[int] | np.ndarray,
        num_cameras: int,
        spec: PromptSpec,
    ) -> bool:
        """Whether swapping the state ids at ``slots`` of ``ids`` gives what encoding another state does (the state
        tokens are atomic special tokens, so it should); checked once per task before the control loop relies on it."""
        other = (np.asarray(bins, dtype=np.int64) + 1) % NUM_STATE_BINS
        swapped = ids.copy()
        swapped[slots] = self.first_state_id + other
        return np.array_equal(swapped, self._encode(task, other, num_cameras, spec))

    def pad(self, ids: np.ndarray, what: str = "prompt") -> Prompt:
        """Right-pad ``ids`` to the bucket (pad_token_id, mask 0, type 0); longer than the bucket -> PromptTooLongError."""
        n = len(ids)
        length = n if self.bucket is None else self.bucket
        if n > length:
            raise PromptTooLongError(
                f"prompt for {what!r} has {n} tokens but the bucket holds {length}; shorten the task, use fewer "
                "cameras, or export again with a larger --bucket (prompts are never truncated)"
            )
        input_ids = np.full(length, self.pad_id, dtype=np.int64)
        input_ids[:n] = ids
        mask = np.zeros(length, dtype=bool)
        mask[:n] = True
        types = (np.isin(input_ids, self.image_type_ids) & mask).astype(np.int64)
        positions = np.flatnonzero((input_ids == self.patch_id) & mask).astype(np.int64)
        return Prompt(input_ids, mask, types, positions, n)


# --- masks over one unbatched prompt, from a token-id mapping (the device side has no config) ---------
# model/masks.py holds the batched, config-based twins the PyTorch side feeds its graphs with; both
# follow reference §4.8 / §4.9 / A16 and tests/test_prompt.py checks they agree.


def prefill_allowed(attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
    """(t, t) bool: query q may see key k iff k is valid and (k <= q, or both are image-type tokens) (§4.8)."""
    t = len(attention_mask)
    causal = np.tril(np.ones((t, t), dtype=bool))
    image = token_type_ids.astype(bool)
    return (causal | (image[:, None] & image[None, :])) & attention_mask.astype(bool)[None, :]


def cross_attention_valid(
    input_ids: np.ndarray, attention_mask: np.ndarray, token_ids: Mapping[str, int], action_mode: str
) -> np.ndarray:
    """(t,) bool: positions the action expert may attend to (§4.9, A16).

    In action_mode 'both' also drop every eos_token_id position (BOS and the user turn's
    <|im_end|>) and each inclusive <action_start>..<action_end> span (an unmatched start masks to the end).
    """
    valid = attention_mask.astype(bool) & (np.asarray(input_ids) >= 0)
    if action_mode != "both":
        return valid
    ids = np.asarray(input_ids)
    is_start = (ids == int(token_ids["action_start_token_id"])).astype(np.int64)
    is_end = (ids == int(token_ids["action_end_token_id"])).astype(np.int64)
    opened = np.cumsum(is_start) - np.cumsum(is_end) + is_end  # > 0 inside a span, its end included
    return valid & (ids != int(token_ids["eos_token_id"])) & ~(opened > 0)
