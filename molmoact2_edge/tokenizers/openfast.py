"""OpenFAST action tokenizer: DCT over time, quantize, byte-level BPE (MolmoAct2-FAST-Tokenizer format).

Torch-free (numpy + ``tokenizers``): the device runtime decodes discrete action
chunks with it. Reference: ``reference/molmoact2-checkpoint.md`` §7 and §4.14,
following Physical Intelligence's FAST and the released
``allenai/MolmoAct2-FAST-Tokenizer`` files (``processor_config.json`` +
``tokenizer.json``).

Encode a normalized chunk (ah, ad):
  1. orthonormal DCT-II along time (axis 0), computed as one (ah, ah) matrix product;
  2. x ``scale``, round half-to-even (``np.around``);
  3. flatten row-major: frequency-major, so low frequencies come first;
  4. subtract ``min_token``, clamp at 0, map each integer v to ``chr(v)``;
  5. byte-level BPE over that string -> ids in [0, vocab_size).
Decode reverses it. The release's shape rule: a chunk whose characters do not
reshape to exactly (ah, ad) becomes zeros; here the caller is also told
(``decode`` returns ``(actions, ok)``) and ids outside the vocabulary, which
``tokenizers`` would silently skip, fail the chunk too (§7.1 pitfalls).

Round-trip bound (nothing clamped): decode(encode(x)) = IDCT(round(scale DCT x) / scale),
so each element is off by at most (0.5 / scale) * max_n ||C[:, n]||_1 (C the DCT matrix).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from molmoact2_edge.errors import TokenizerError

log = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"
# Where a checkpoint keeps its OpenFAST files (the release ships them as a separate repo; a subfolder
# keeps their tokenizer.json apart from the text tokenizer's).
ACTION_TOKENIZER_DIR = "action_tokenizer"
TOKENIZER_FILE = "tokenizer.json"
# The released repo ships its processor as remote code; we keep the names so the files load there too.
DEFAULT_AUTO_MAP = {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"}
DEFAULT_PROCESSOR_CLASS = "UniversalActionProcessor"
_REPLACEMENT_CHAR = "\ufffd"  # what the byte-level decoder emits for an invalid UTF-8 sequence


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n, n), float64: coeffs = C @ x, x = C.T @ coeffs (scipy norm='ortho')."""
    k = np.arange(n)[:, None]
    t = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * t + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


def roundtrip_error_bound(time_horizon: int, scale: float) -> float:
    """Largest per-element error of decode(encode(x)) when no coefficient is clamped."""
    return float(0.5 / scale * np.abs(dct_matrix(time_horizon)).sum(axis=0).max())


def quantize(chunk: np.ndarray, scale: float) -> np.ndarray:
    """(ah, ad) chunk -> (ah, ad) int64 rounded DCT coefficients (rows = frequencies)."""
    x = np.asarray(chunk, dtype=np.float32).astype(np.float64)  # the release encodes the float32 chunk
    coeffs = dct_matrix(x.shape[0]) @ x  # (ah, ad)
    return np.around(coeffs * scale).astype(np.int64)


def dequantize(coeffs: np.ndarray, scale: float) -> np.ndarray:
    """(ah, ad) integer coefficients -> (ah, ad) float32 chunk (inverse DCT)."""
    c = np.asarray(coeffs, dtype=np.float64) / scale
    return (dct_matrix(c.shape[0]).T @ c).astype(np.float32)


@dataclass
class OpenFASTTokenizer:
    """DCT + BPE action tokenizer; ``bpe`` is a byte-level BPE ``tokenizers.Tokenizer`` without special tokens."""

    bpe: Tokenizer
    scale: float = 10.0
    min_token: int = 0
    time_horizon: int | None = None  # default ah for decode; the policy passes the tag horizon explicitly
    action_dim: int | None = None  # default ad for decode
    auto_map: dict | None = None  # kept verbatim from a released processor_config.json
    processor_class: str = DEFAULT_PROCESSOR_CLASS

    @property
    def vocab_size(self) -> int:
        return int(self.bpe.get_vocab_size())

    # --- encode / decode ------------------------------------------------------------------

    def chunk_to_text(self, chunk: np.ndarray) -> str:
        """(ah, ad) normalized chunk -> the character string BPE sees (steps 1-4)."""
        if chunk.ndim != 2:
            raise TokenizerError(f"OpenFAST encodes one (ah, ad) chunk, got shape {chunk.shape}")
        values = np.maximum(quantize(chunk, self.scale).reshape(-1) - self.min_token, 0)  # frequency-major
        return "".join(map(chr, values.tolist()))

    def encode(self, chunk: np.ndarray) -> list[int]:
        """(ah, ad) normalized chunk -> BPE ids in [0, vocab_size)."""
        return list(self.bpe.encode(self.chunk_to_text(chunk)).ids)

    def decode(
        self, ids: Sequence[int], time_horizon: int | None = None, action_dim: int | None = None
    ) -> tuple[np.ndarray, bool]:
        """BPE ids -> ((ah, ad) float32 chunk, ok). A chunk that fails the shape rule is zeros with ok=False."""
        ah = time_horizon if time_horizon is not None else self.time_horizon
        ad = action_dim if action_dim is not None else self.action_dim
        if ah is None or ad is None:
            raise TokenizerError(
                "OpenFAST decode needs time_horizon and action_dim (pass them, or set them in processor_config.json)"
            )
        coeffs = self._decode_coefficients(ids, ah, ad)
        if coeffs is None:
            return np.zeros((ah, ad), dtype=np.float32), False
        return dequantize(coeffs, self.scale), True

    def _decode_coefficients(self, ids: Sequence[int], ah: int, ad: int) -> np.ndarray | None:
        vocab = self.vocab_size
        bad = [int(i) for i in ids if not 0 <= int(i) < vocab]
        if bad:
            log.debug("OpenFAST decode: ids %s outside [0, %d)", bad[:8], vocab)
            return None
        text = self.bpe.decode([int(i) for i in ids], skip_special_tokens=False)
        if _REPLACEMENT_CHAR in text or len(text) != ah * ad:
            log.debug("OpenFAST decode: %d characters for a (%d, %d) chunk", len(text), ah, ad)
            return None
        values = np.fromiter((ord(ch) for ch in text), dtype=np.int64, count=len(text)) + self.min_token
        return values.reshape(ah, ad)

    # --- training -------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        chunks: Iterable[np.ndarray],
        vocab_size: int = 2048,
        scale: float = 10.0,
        min_frequency: int = 2,
    ) -> OpenFASTTokenizer:
        """Fit ``min_token`` and a byte-level BPE of ``vocab_size`` ids on normalized (ah, ad) chunks.

        Deterministic for the same chunks. The alphabet is the 256 byte symbols, so any
        coefficient (also one beyond the training range) stays encodable.
        """
        quantized = [quantize(c, scale) for c in chunks]
        if not quantized:
            raise TokenizerError("OpenFAST train: no chunks given")
        shapes = {q.shape for q in quantized}
        if len(shapes) != 1:
            raise TokenizerError(
                f"OpenFAST train: chunks must share one (ah, ad) shape, got {sorted(shapes)}"
            )
        ((ah, ad),) = shapes
        min_token = int(min(int(q.min()) for q in quantized))
        bpe = _byte_level_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            max_token_length=10000,
        )
        texts = ["".join(map(chr, (q.reshape(-1) - min_token).tolist())) for q in quantized]
        bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(bpe=bpe, scale=scale, min_token=min_token, time_horizon=ah, action_dim=ad)

    # --- files ----------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> OpenFASTTokenizer:
        """Read ``processor_config.json`` + ``tokenizer.json`` (the released layout)."""
        directory = Path(directory)
        cfg_path, tok_path = directory / PROCESSOR_CONFIG, directory / TOKENIZER_FILE
        for path in (cfg_path, tok_path):
            if not path.is_file():
                raise TokenizerError(f"OpenFAST tokenizer: missing {path}")
        try:
            cfg = json.loads(cfg_path.read_text())
            bpe = Tokenizer.from_file(str(tok_path))
        except (ValueError, Exception) as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"OpenFAST tokenizer: cannot read {directory}: {err}") from err
        tok = cls(
            bpe=bpe,
            scale=float(cfg.get("scale", 10)),
            min_token=int(cfg.get("min_token", 0)),
            time_horizon=cfg.get("time_horizon"),
            action_dim=cfg.get("action_dim"),
            auto_map=cfg.get("auto_map"),
            processor_class=cfg.get("processor_class", DEFAULT_PROCESSOR_CLASS),
        )
        declared = cfg.get("vocab_size")
        if declared is not None and int(declared) != tok.vocab_size:
            raise TokenizerError(
                f"{cfg_path}: vocab_size {declared} but {tok_path} holds {tok.vocab_size} ids"
            )
        return tok

    def save(self, directory: str | Path) -> None:
        """Write ``processor_config.json`` + ``tokenizer.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, object] = {
            "auto_map": self.auto_map or DEFAULT_AUTO_MAP,
            "processor_class": self.processor_class,
            "scale": self.scale,
            "vocab_size": self.vocab_size,
            "min_token": self.min_token,
        }
        if self.time_horizon is not None:
            cfg["time_horizon"] = self.time_horizon
        if self.action_dim is not None:
            cfg["action_dim"] = self.action_dim
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        self.bpe.save(str(directory / TOKENIZER_FILE))


def _byte_level_bpe() -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return bpe


# --- FAST ids <-> the LLM's <action_i> tokens (discrete mode, §4.14) -----------------------


def fast_to_llm_ids(fast_ids: Sequence[int], action_token_start_id: int) -> list[int]:
    """BPE id b -> LLM token ``<action_b>`` = action_token_start_id + b."""
    return [action_token_start_id + int(b) for b in fast_ids]


def llm_to_fast_ids(llm_ids: Sequence[int], action_token_start_id: int, num_action_tokens: int) -> list[int]:
    """Keep ids in [start, start + num) and map them back to BPE ids; anything else is dropped (as released)."""
    stop = action_token_start_id + num_action_tokens
    return [int(i) - action_token_start_id for i in llm_ids if action_token_start_id <= int(i) < stop]


def action_span(generated: Sequence[int], action_start_id: int, action_end_id: int) -> list[int]:
    """Ids between the first ``<action_start>`` and the following ``<action_end>``.

    A missing start marker widens the span to the beginning, a missing end marker to the end.
    """
    ids = [int(i) for i in generated]
    begin = ids.index(action_start_id) + 1 if action_start_id in ids else 0
    rest = ids[begin:]
    end = rest.index(action_end_id) if action_end_id in rest else len(rest)
    return rest[:end]
