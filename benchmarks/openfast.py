"""OpenFAST compression: BPE tokens per action chunk on smooth random chunks, and encode/decode time.

Usage: python benchmarks/openfast.py [--train 2000] [--test 500]

Chunks are sums of three random sinusoids per dimension (0.3-2 cycles per chunk), clipped
to [-1, 1] like normalized actions. For each (horizon, dims, scale, vocabulary) a tokenizer
is trained on ``--train`` chunks and measured on ``--test`` other chunks. "values/token" is
(horizon x dims) / mean tokens; "max err" is the worst element error of decode(encode(x)),
next to its bound (0.5/scale) x max DCT column L1 norm. Times are per chunk on this CPU,
encode and decode separately (tokenizer only, no model), after one warm-up pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.tokenizers.openfast import OpenFASTTokenizer, roundtrip_error_bound  # noqa: E402

CASES = [  # (horizon, dims, scale, vocab)
    (30, 6, 10.0, 2048),
    (30, 6, 10.0, 1024),
    (30, 6, 20.0, 2048),
    (30, 14, 10.0, 2048),
    (50, 14, 10.0, 2048),
    (10, 7, 10.0, 2048),
]


def smooth_chunks(n: int, horizon: int, dims: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, horizon)[:, None, None]
    amp = rng.uniform(-0.5, 0.5, (n, 1, 3, dims))
    freq = rng.uniform(0.3, 2.0, (n, 1, 3, dims))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, 3, dims))
    x = (amp * np.sin(2 * np.pi * freq * t[None] + phase)).sum(axis=2)
    return list(np.clip(x, -1.0, 1.0).astype(np.float32))


def measure(horizon: int, dims: int, scale: float, vocab: int, n_train: int, n_test: int) -> list[object]:
    tok = OpenFASTTokenizer.train(smooth_chunks(n_train, horizon, dims, 0), vocab_size=vocab, scale=scale)
    test = smooth_chunks(n_test, horizon, dims, 1)
    encoded = [tok.encode(c) for c in test]  # warm-up pass, also the token counts
    t0 = time.perf_counter()
    encoded = [tok.encode(c) for c in test]
    t_enc = (time.perf_counter() - t0) / n_test
    t0 = time.perf_counter()
    decoded = [tok.decode(ids, horizon, dims) for ids in encoded]
    t_dec = (time.perf_counter() - t0) / n_test
    lengths = np.array([len(ids) for ids in encoded])
    err = max(float(np.abs(out - c).max()) for (out, _), c in zip(decoded, test, strict=True))
    ok = all(flag for _, flag in decoded)
    return [
        f"{horizon}x{dims}",
        f"{scale:g}",
        tok.vocab_size,
        f"{lengths.mean():.1f}",
        f"{np.percentile(lengths, 99):.0f}",
        f"{horizon * dims / lengths.mean():.1f}",
        f"{err:.3f} / {roundtrip_error_bound(horizon, scale):.3f}",
        "yes" if ok else "NO",
        f"{t_enc * 1e6:.0f}",
        f"{t_dec * 1e6:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="training chunks per case")
    parser.add_argument("--test", type=int, default=500, help="held-out chunks per case")
    args = parser.parse_args()
    headers = [
        "chunk",
        "scale",
        "vocab",
        "tokens mean",
        "tokens p99",
        "values/token",
        "max err / bound",
        "all decode",
        "encode us",
        "decode us",
    ]
    rows = [measure(h, d, s, v, args.train, args.test) for h, d, s, v in CASES]
    table = markdown_table(headers, rows)
    print(table)
    body = (
        f"Smooth random chunks (3 sinusoids per dim, clipped to [-1, 1]); {args.train} training and "
        f"{args.test} held-out chunks per row. Times per chunk (tokenizer only).\n\n" + table
    )
    write_section("openfast", "OpenFAST action tokenizer: compression", body)


if __name__ == "__main__":
    main()
