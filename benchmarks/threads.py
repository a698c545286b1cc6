"""Threads: act() at 1 vs 2 onnxruntime intra-op threads, on the bundled checkpoint and on a release-width one.

\b
    python benchmarks/threads.py                      # so101-touch int8 and a 1-layer release-width fp32 bundle
    python benchmarks/threads.py --iterations 12 --rounds 6 --layers 1

Whether a second thread pays depends on how much work each graph op has, not on the pool alone:
the bundled checkpoint (3 M parameters) runs ~1,400 ops per act() of 10-20 us each, where handing
half an op to another thread costs about what it saves; a bundle of the 4B release's widths (two
378 px cameras, 2560-wide LLM, but only ``--layers`` layers of each tower so that it exports on a
2-core machine: random weights, ``benchmarks/export_4b.py``'s checkpoint) runs GEMMs of hundreds
of MFLOP. Both are timed with the backend's defaults (one shared pool per process, spinning off):
the two thread settings in their own processes, taking turns over short rounds
(``runtimes.benchmark.compare_backends``); ``2 vs 1`` is the 1-thread p50 / the 2-thread p50, and
paired the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from benchmarks.runtime import parity_of  # noqa: E402
from molmoact2_edge.runtimes.benchmark import Contender, compare_backends  # noqa: E402

THREADS = (1, 2)


def release_width_bundle(layers: int) -> Path:
    """The cached fp32 bundle of a ``layers``-layer checkpoint of the 4B release's widths (written on first use)."""
    from benchmarks.export_4b import release_width_checkpoint
    from molmoact2_edge.cli.demo import CACHE, cached_bundle
    from molmoact2_edge.contract import ContractFlags
    from molmoact2_edge.export.pipeline import ExportOptions

    checkpoint = CACHE / f"release-width-{layers}l"
    if not (checkpoint / "config.json").is_file():
        release_width_checkpoint(layers, checkpoint)
    # random weights at these widths may exceed the parity gate's fp32 tolerance: export anyway, the table shows it
    options = ExportOptions(cameras=("front", "wrist"), allow_parity_failure=True, contract_flags=ContractFlags())
    return cached_bundle(checkpoint, "fp32", CACHE, options)


def bundled_int8() -> Path:
    """The bundled checkpoint's int8 bundle, as ``benchmarks/runtime.py`` exports it (its best CPU precision)."""
    from benchmarks.runtime import export_all
    from molmoact2_edge.cli.demo import bundled_checkpoint

    return export_all(bundled_checkpoint(), ["fp32", "int8"], None)["int8"]


def thread_rows(name: str, bundle: Path, iterations: int, rounds: int) -> list[list[str]]:
    """One row per thread setting: p50, p25-p75 and, on the 2-thread row, 1-thread p50 / 2-thread p50."""
    contenders = [Contender(f"{t} thread(s)", "onnxruntime", {"intra_op_threads": t}) for t in THREADS]
    report = compare_backends(bundle, contenders, iterations, rounds=rounds)["backends"]
    one, two = (report[c.label] for c in contenders)
    pooled = one["stages_ms"]["total"]["p50"] / two["stages_ms"]["total"]["p50"]
    paired = float(np.median(np.asarray(one["spread_ms"]["round_medians"]) / np.asarray(two["spread_ms"]["round_medians"])))
    manifest = json.loads((bundle / "manifest.json").read_text())
    precision = manifest["artifacts"]["vision"]["precision"]
    rows = []
    for threads, label in zip(THREADS, (c.label for c in contenders), strict=True):
        result = report[label]
        total = result["stages_ms"]["total"]
        stages = " / ".join(f"{result['stages_ms'][s]['p50']:.1f}" for s in ("vision", "prefill", "flow"))
        ratio = f"{pooled:.2f}x (paired {paired:.2f}x)" if threads == 2 else "-"
        rows.append([
            name, precision, str(threads), f"{total['p50']:.1f}",
            f"{result['spread_ms']['p25']:.1f}-{result['spread_ms']['p75']:.1f}", stages, ratio,
            f"{result['idle_cpu_ms']:.0f}" if result["idle_cpu_ms"] is not None else "-", parity_of(bundle),
        ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12, help="timed act() calls per thread setting and bundle")
    parser.add_argument("--rounds", type=int, default=6, help="alternated rounds the calls are split over")
    parser.add_argument("--layers", type=int, default=1, help="layers per tower of the release-width bundle")
    args = parser.parse_args()

    bundles = {"so101-touch (bundled, 3 M parameters)": bundled_int8()}
    bundles[f"release widths, {args.layers} layer(s) per tower (random weights)"] = release_width_bundle(args.layers)
    rows = [row for name, bundle in bundles.items() for row in thread_rows(name, bundle, args.iterations, args.rounds)]
    headers = [
        "bundle", "precision", "threads", "act() p50 ms", "p25-p75 ms", "vision / prefill / flow p50 ms",
        "2 threads vs 1", "CPU the waiting contender used, ms", "parity gate",
    ]  # fmt: skip
    table = markdown_table(headers, rows)
    print(table)
    body = (
        table + "\n\nonnxruntime CPU with the backend's defaults (one shared intra-op pool per process, spinning off, "
        f"CPU rewrites); each thread setting in its own process, {args.rounds} alternated rounds, {args.iterations} "
        "timed calls per setting and bundle (`runtimes.benchmark.compare_backends`). The release-width bundle has the "
        "4B release's widths, image size and cameras but few layers (random weights, exported on this machine). "
        "Its parity figures say little: at initialization the expert's output layer is zero (adaLN-zero, as training "
        "starts), so the flow's velocity is 0 on both paths; the vision and prefill gates (1e-6 relative) do compare "
        "real outputs, and every op of the flow still runs."
    )
    write_section("threads", "Threads: act() at 1 vs 2 onnxruntime threads, by model width", body)


if __name__ == "__main__":
    main()
