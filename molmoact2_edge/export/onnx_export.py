"""torch.nn.Module -> fixed-shape ONNX file with external data, checked and described for the manifest.

Recipe from ``reference/toolchain.md`` §1: ``torch.onnx.export(dynamo=True)`` at
opset 18-20 (20 by default; never 23, which emits ``Attention`` that TensorRT
10.3 cannot read), weights as external data beside the graph, then
``onnx.checker.check_model(full_check=True)`` and the TensorRT allow-list
(``opset_check``) on the written file. The legacy TorchScript exporter is used
only if dynamo fails, and the reason is logged and recorded.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from molmoact2_edge.errors import ExportError
from molmoact2_edge.export import opset_check

log = logging.getLogger(__name__)
# torch's ONNX op registry warns, once per exported graph, that it skips torchvision's detection ops
# (nms, roi_align, ...) when torchvision is absent; no graph here uses them, so a user has nothing to do
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
# onnxscript's optimizer warns for every multi-output node it leaves unfolded (Split): the graph is
# still correct and ONNX Runtime/TensorRT fold it themselves
logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)

DEFAULT_OPSET = 20
OPSET_RANGE = (18, 20)

# ONNX elem type -> numpy dtype name written into the manifest.
_ONNX_TO_NUMPY: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass
class ExportedGraph:
    """One written graph: where it is and what the manifest says about it."""

    name: str
    path: Path
    opset: int
    exporter: str  # "dynamo" or "torchscript (reason)"
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)


def data_file(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def export_module(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
) -> ExportedGraph:
    """Export ``module(*args)`` to ``path`` (+ ``path.data``) with static shapes and check it.

    Raises ExportError when the opset is outside 18-20 or both exporters fail, OpsetError when the
    graph uses something TensorRT 10.3 cannot parse.
    """
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ExportError(
            f"opset {opset}: use {OPSET_RANGE[0]}-{OPSET_RANGE[1]} (TensorRT 10.3 reads <= 20; opset 23 "
            "emits Attention/RMSNormalization it cannot parse; dynamo builds < 18 at 18 anyway)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    start = time.perf_counter()
    exporter = "dynamo"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters warn about things that do not apply to static graphs
        try:
            _dynamo_export(module, args, path, input_names, output_names, opset)
        except Exception as err:  # torch.export raises many unrelated types; any failure means "try legacy"
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            log.warning("graph %s: dynamo export failed (%s); falling back to dynamo=False", path.stem, reason)
            exporter = f"torchscript (dynamo failed: {reason})"
            try:
                _legacy_export(module, args, path, input_names, output_names, opset)
            except Exception as err2:
                raise ExportError(f"{path}: both ONNX exporters failed; dynamo: {reason}; legacy: {err2}") from err2
    seconds = time.perf_counter() - start
    _finalize(path, input_names, output_names)
    counts = check_graph(path)
    log.info("exported %s in %.1f s (%s, opset %d, %d nodes)", path.name, seconds, exporter, opset, sum(counts.values()))
    return ExportedGraph(path.stem, path, opset, exporter, seconds, counts)


def _dynamo_export(
    module: torch.nn.Module, args: Sequence[torch.Tensor], path: Path, inputs: Sequence[str], outputs: Sequence[str], opset: int
) -> None:
    program = torch.onnx.export(
        module,
        tuple(args),
        dynamo=True,
        opset_version=opset,
        input_names=list(inputs),
        output_names=list(outputs),
        external_data=True,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise ExportError(f"{path}: dynamo exporter returned no program")
    program.save(str(path), external_data=True)


def _legacy_export(
    module: torch.nn.Module, args: Sequence[torch.Tensor], path: Path, inputs: Sequence[str], outputs: Sequence[str], opset: int
) -> None:
    torch.onnx.export(
        module, tuple(args), str(path), dynamo=False, opset_version=opset,
        input_names=list(inputs), output_names=list(outputs), do_constant_folding=True,
    )
    save_with_external_data(onnx.load(str(path)), path)


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path``, initializers over 1 KiB in ``path.data`` (small shape constants stay inline
    so shape inference can read them)."""
    data = data_file(path)
    if data.exists():
        data.unlink()
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name, size_threshold=1024, convert_attribute=False,
    )


def _finalize(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Make the graph's I/O names exactly the schema's (exporters may drop unused inputs or rename outputs)
    and drop the exporter's per-node metadata (stack traces, FX names: most of a small graph's bytes)."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(inputs):
        raise ExportError(f"{path}: graph inputs {got_in} differ from {list(inputs)} (an input unused by the module?)")
    if len(got_out) != len(outputs):
        raise ExportError(f"{path}: graph has outputs {got_out}, expected {list(outputs)}")
    mapping = {old: new for old, new in zip(got_out, outputs, strict=True) if old != new}
    for node in model.graph.node:
        node.output[:] = [mapping.get(o, o) for o in node.output]
        node.input[:] = [mapping.get(i, i) for i in node.input]
    for out in model.graph.output:
        out.name = mapping.get(out.name, out.name)
    onnx.save_model(model, str(path))


def check_graph(path: Path, allow_int4: bool = False) -> dict[str, int]:
    """onnx.checker full check (shape inference included) + TensorRT 10.3 allow-list; op counts."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {err}") from err
    return opset_check.check_file(str(path), allow_int4=allow_int4)


def io_specs(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as manifest entries {name, shape, dtype}; every dim must be a fixed integer."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(value: onnx.ValueInfoProto) -> dict[str, Any]:
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if any(d is None for d in dims):
            raise ExportError(f"{path}: tensor '{value.name}' has a symbolic dim {dims}; bundles are fixed-shape")
        return {"name": value.name, "shape": dims, "dtype": _ONNX_TO_NUMPY.get(int(ttype.elem_type), str(ttype.elem_type))}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]
