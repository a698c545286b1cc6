"""Is this Python environment installed the way docs/jetson.md says? Each step checked, each failure with its fix.

``molmo-edge doctor`` prints these. The steps (JetPack 6: L4T R36, Python 3.10, CUDA 12.6,
TensorRT 10.3; JetPack 7: L4T R38/R39, CUDA 13, TensorRT 10.16):

1. a virtual environment that sees JetPack's system packages (``--system-site-packages``):
   TensorRT's Python bindings come with JetPack (``python3-libnvinfer``), not from PyPI;
2. exactly one distribution providing the ``onnxruntime`` module: ``onnxruntime`` (PyPI CPU),
   ``onnxruntime-gpu`` (PyPI CUDA on x86_64, or NVIDIA's Jetson wheels on a Jetson). Two of
   them overwrite each other's files, which breaks one of them silently;
3. on a Jetson, the CUDA execution provider in that onnxruntime (the Jetson wheel has it);
4. ``tensorrt`` importable; 5. ``cuda-python`` of the JetPack's CUDA major importable.

Torch-free and import-light: only ``importlib`` and file reads, so it runs on a half-installed machine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

JETSON_INDEX = {6: "https://pypi.jetson-ai-lab.io/jp6/cu126", 7: "https://pypi.jetson-ai-lab.io/sbsa/cu130"}
CUDA_PYTHON = {6: "cuda-python>=12.6,<13", 7: "cuda-python>=13,<14"}
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str
    fix: str | None = None  # the exact command(s), when not ok


def jetpack_major(l4t: str | None) -> int | None:
    """JetPack major version from the L4T release ('R36.4.3' -> 6, 'R38.2' -> 7); None off a Jetson."""
    if not l4t:
        return None
    try:
        major = int(l4t.lstrip("R").split(".")[0])
    except ValueError:
        return None
    return 6 if major == 36 else 7 if major >= 38 else None


def onnxruntime_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module."""
    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            importlib.metadata.version(dist)
            found.append(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def sees_system_site_packages(prefix: str = sys.prefix, base_prefix: str = sys.base_prefix) -> bool:
    """True outside a venv, or in a venv created with --system-site-packages."""
    if prefix == base_prefix:
        return True
    cfg = Path(prefix) / "pyvenv.cfg"
    try:
        lines = cfg.read_text().splitlines()
    except OSError:
        return False
    return any(ln.replace(" ", "").lower() == "include-system-site-packages=true" for ln in lines)


def install_steps(
    *,
    l4t: str | None,
    ort_dists: list[str] | None = None,
    ort_providers: list[str] | None = None,
    importable: Mapping[str, bool] | None = None,
    system_site: bool | None = None,
) -> list[Step]:
    """Each install step, checked. The keyword arguments default to this machine (tests pass their own)."""
    jp = jetpack_major(l4t)
    dists = onnxruntime_distributions() if ort_dists is None else ort_dists
    found = importable or {m: _importable(m) for m in ("onnxruntime", "tensorrt", "cuda.bindings")}
    index = JETSON_INDEX.get(jp or 6)
    ort_fix = (
        f"pip uninstall -y {' '.join(dists) or 'onnxruntime'}; pip install onnxruntime-gpu --index-url {index}"
        if jp
        else f"pip uninstall -y {' '.join(dists) or 'onnxruntime'}; pip install onnxruntime   "
        "# or onnxruntime-gpu on a CUDA desktop"
    )
    steps = []
    if jp:
        sees = sees_system_site_packages() if system_site is None else system_site
        steps.append(
            Step(
                "venv sees JetPack's system packages",
                sees,
                "TensorRT's Python bindings come with JetPack, outside any venv",
                "python3 -m venv --system-site-packages ~/molmo-venv && . ~/molmo-venv/bin/activate "
                "&& pip install .   # from the molmoact2-edge clone",
            )
        )
    if len(dists) > 1:
        steps.append(Step("one onnxruntime distribution", False, f"{dists} all install the onnxruntime module", ort_fix))
    elif not found["onnxruntime"]:
        steps.append(Step("onnxruntime", False, "no onnxruntime module", ort_fix))
    else:
        steps.append(Step("onnxruntime", True, f"from {dists[0] if dists else 'an unlisted distribution'}"))
    if jp and found["onnxruntime"]:
        providers = _providers() if ort_providers is None else ort_providers
        has_cuda = "CUDAExecutionProvider" in providers
        steps.append(
            Step("onnxruntime has CUDA", has_cuda, f"providers {providers}", None if has_cuda else ort_fix)
        )
    trt_fix = (
        "sudo apt install python3-libnvinfer   # JetPack's bindings; then a venv with --system-site-packages"
        if jp
        else "pip install 'molmoact2-edge[tensorrt]'"
    )
    steps.append(Step("tensorrt", found["tensorrt"], "TensorRT Python bindings", None if found["tensorrt"] else trt_fix))
    cuda_fix = f"pip install '{CUDA_PYTHON.get(jp or 6)}'"
    steps.append(
        Step("cuda-python", found["cuda.bindings"], "cuda.bindings (engines' memory and streams)", None if found["cuda.bindings"] else cuda_fix)
    )
    return steps


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())
