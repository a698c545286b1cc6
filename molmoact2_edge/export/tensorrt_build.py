"""Build TensorRT engines for a bundle on the device that will run them (native TensorRT 10/11 Python API).

``molmo-edge build-engines BUNDLE`` (or ``export --target tensorrt``) parses each
ONNX graph with ``trt.OnnxParser``, builds a serialized engine, and appends an
``engines`` section to the manifest keyed by GPU, compute capability, TensorRT
and JetPack version (``bundle.engine_key``): engines only run where they were
built. Export fields of the manifest are never touched.

Per graph (facts: ``reference/toolchain.md`` §2.2, §3.2):
- Q/DQ (int8, int4) and fp16 graphs build as STRONGLY TYPED networks: the ONNX
  types decide every layer's precision, which is also the only mode TensorRT 11 has.
- fp32 graphs build weakly typed; on TensorRT 10 a graph that the fp16 bundle kept in
  fp32 because fp16 overflows (the LLM prefill) gets ``BuilderFlag.BF16`` where the GPU
  has bf16 (compute capability >= 8.0), as vla-edge builds its prefill. TensorRT 11
  removed the precision flags; there it stays fp32.
- One timing cache per engine set, persisted in the bundle and reused by rebuilds.
- Every I/O tensor's name, shape and dtype is logged; missing fast fp16/int8 is warned about.

Device side: imports nothing from torch or onnx. Written against the TensorRT 10
API; NOT run on the development machine (no GPU, and TensorRT's libraries are not
installable without pypi.nvidia.com).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from molmoact2_edge.errors import BackendUnavailableError, DependencyError, ExportError
from molmoact2_edge.runtimes import bundle as B

log = logging.getLogger(__name__)

INSTALL = (
    "TensorRT is not installed: on a Jetson use JetPack's python3-libnvinfer (TensorRT 10.3 on JetPack 6) "
    "and pip install 'cuda-python<13'; on an x86 GPU machine pip install 'molmoact2-edge[tensorrt]'"
)
DEFAULT_WORKSPACE_GIB = 4.0
STRONG_PRECISIONS = ("fp16", "int8", "int4")


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise DependencyError(INSTALL) from err
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engines(
    path: str | Path,
    graphs: list[str] | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    optimization_level: int = 3,
) -> str:
    """Build engines for ``graphs`` (default: all) of the bundle at ``path``; returns the engine key.

    Raises DependencyError without TensorRT, BackendUnavailableError without a GPU, ExportError when
    the parser or the builder fails (with the parser's errors).
    """
    trt = _import_tensorrt()
    bundle = B.Bundle.open(path)
    facts = B.device_facts()
    if facts is None:
        raise BackendUnavailableError(
            "no CUDA GPU answers (or cuda-python is missing: pip install 'cuda-python<13'); engines are built "
            "on the device that runs them"
        )
    key = B.engine_key(facts["gpu"], facts["compute_capability"], facts["tensorrt"], facts["jetpack"] or None)
    engine_dir = bundle.root / B.ENGINES_DIR / key
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache_path = engine_dir / "timing.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    _warn_platform(builder, bundle)
    built: dict[str, str] = {}
    flags: dict[str, list[str]] = {}
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    for graph in graphs or bundle.graph_names:
        artifact = bundle.artifact(graph)
        start = time.perf_counter()
        plan, cache_bytes, used = _build_one(trt, builder, logger, bundle, graph, artifact, facts, cache_bytes,
                                             workspace_gib, optimization_level)
        engine_path = engine_dir / f"{graph}.engine"
        engine_path.write_bytes(plan)
        built[graph] = engine_path.relative_to(bundle.root).as_posix()
        flags[graph] = used
        log.info("%s: engine %s (%.1f MB) in %.1f s", graph, engine_path.name, len(plan) / 1e6, time.perf_counter() - start)
    cache_path.write_bytes(cache_bytes)
    cache_rel = cache_path.relative_to(bundle.root).as_posix()
    info: dict[str, Any] = {
        **facts,
        "graphs": built,
        "flags": flags,
        "timing_cache": cache_rel,
        "workspace_gib": workspace_gib,
        "optimization_level": optimization_level,
        "built_unix": int(time.time()),
    }
    bundle.add_engines(key, info, [*built.values(), cache_rel])
    return key


def _build_one(
    trt: Any,
    builder: Any,
    logger: Any,
    bundle: B.Bundle,
    graph: str,
    artifact: dict[str, Any],
    facts: dict[str, str],
    cache_bytes: bytes,
    workspace_gib: float,
    optimization_level: int,
) -> tuple[bytes, bytes, list[str]]:
    """(serialized engine, updated timing cache, flags used) for one graph."""
    precision = artifact["precision"]
    strongly_typed = precision in STRONG_PRECISIONS or trt_major(trt) >= 11
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.graph_path(graph)
    if not parser.parse_from_file(str(onnx_path)):  # resolves <name>.onnx.data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT {trt.__version__} could not parse it: " + "; ".join(errors))
    _log_io(network, graph)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    used = ["STRONGLY_TYPED"] if strongly_typed else []
    if not strongly_typed and "note" in artifact and _has_bf16(facts):
        config.set_flag(trt.BuilderFlag.BF16)  # TensorRT 10 only (11 has no precision flags)
        used.append("BF16")
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{graph}: TensorRT failed to build an engine from {onnx_path} (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize()), used


def _has_bf16(facts: dict[str, str]) -> bool:
    major = int(facts["compute_capability"].split(".")[0])
    return major >= 8  # Ampere (Orin is sm_87) and newer


def _log_io(network: Any, graph: str) -> None:
    for i in range(network.num_inputs):
        t = network.get_input(i)
        log.info("%s input  %s %s %s", graph, t.name, tuple(t.shape), t.dtype)
    for i in range(network.num_outputs):
        t = network.get_output(i)
        log.info("%s output %s %s %s", graph, t.name, tuple(t.shape), t.dtype)


def _warn_platform(builder: Any, bundle: B.Bundle) -> None:
    precisions = {a["precision"] for a in bundle.manifest["artifacts"].values()}
    # platform_has_fast_* are deprecated in TensorRT 10 and gone in 11: ask only where they exist.
    if "fp16" in precisions and getattr(builder, "platform_has_fast_fp16", True) is False:
        log.warning("this GPU has no fast fp16: the fp16 graphs will be slow")
    if "int8" in precisions and getattr(builder, "platform_has_fast_int8", True) is False:
        log.warning("this GPU has no fast int8: the int8 graphs will be slow")
