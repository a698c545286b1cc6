"""Bundle precisions as rewrites of the exported fp32 ONNX graphs (one export serves every precision).

- ``fp16``: onnxruntime's ``float16`` converter with fp32 graph I/O for ``vision``.
  The flow graph is instead re-exported with an fp16 copy of the expert
  (``graphs.FlowGraph(dtype=float16)``): the converter would round the Euler
  accumulator through fp16 between steps, and per-step fp16 error compounds
  (``reference/toolchain.md`` §1.3). The LLM graphs (``prefill``, ``decode_step``)
  are NOT converted: fp16 prefill overflows and corrupts K/V silently (vla-edge:
  0.55 relative RMS, reference §8.6); they stay fp32 in the ONNX and the manifest
  says so, and the TensorRT builder may build them in bf16 where the GPU has it.

Quantized forms that TensorRT accepts (``reference/toolchain.md`` §2):

- ``int8``: onnxruntime ``quantize_static`` in QDQ format, per-channel symmetric
  weights, symmetric activations (every zero point 0), MinMax calibration on
  recorded graph inputs. Only MatMul/Gemm nodes with a constant weight are
  quantized: activation x activation MatMuls (attention Q.K^T and P.V, which read
  the KV cache) are excluded, as the reference's tested recipe advises.
- ``int4``: onnxruntime ``MatMulNBitsQuantizer`` with ``quant_format=QDQ``:
  blocked INT4 ``DequantizeLinear`` (block 32, symmetric, opset 21) on weights,
  activations stay float.
- ``--quantizer modelopt``: NVIDIA ModelOpt's ONNX quantizer (CPU calibration),
  when the optional ``quant`` extra is installed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from molmoact2_edge.errors import DependencyError, ExportError
from molmoact2_edge.export.onnx_export import check_graph, data_file, save_with_external_data

log = logging.getLogger(__name__)

QUANTIZERS = ("ort", "modelopt")
INT4_BLOCK = 32
INT4_OPSET = 21


FP16_KEPT_FP32 = ("prefill", "decode_step", "decode_block", "expert_context")  # graphs the fp16 bundle keeps in fp32 (see above)


def to_fp16(src: Path, dst: Path) -> dict[str, int]:
    """Write the fp16 version of ``src`` (fp32 graph inputs and outputs kept) to ``dst``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    save_with_external_data(converted, dst)
    check_graph(dst)
    log.info("fp16 %s: %d nodes", src.name, len(converted.graph.node))
    return {"converted": len(model.graph.node), "kept_fp32": 0}


def weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(names of MatMul/Gemm nodes with a constant weight, names of activation x activation MatMuls)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    weighted: list[str] = []
    dynamic: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        (weighted if any(i in constants for i in node.input[:2]) else dynamic).append(node.name)
    return weighted, dynamic


def _ensure_node_names(model: onnx.ModelProto) -> None:
    """Quantizers address nodes by name; give unnamed nodes stable ones."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


class _FeedReader:
    """onnxruntime CalibrationDataReader over recorded graph inputs."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._iter: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._iter, None)
        return dict(item) if item is not None else None


def quantize_int8(src: Path, dst: Path, calibration: Sequence[Mapping[str, np.ndarray]]) -> dict[str, int]:
    """Write the int8 QDQ version of ``src`` to ``dst``; returns the number of quantized/excluded MatMuls.

    calibration: recorded input feeds of this graph (one dict per call), at least one.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ExportError(f"{src.name}: int8 needs calibration feeds; none were recorded")
    model = onnx.load(str(src))
    _ensure_node_names(model)
    weighted, dynamic = weight_matmuls(model)
    if not weighted:
        raise ExportError(f"{src.name}: no MatMul/Gemm with a constant weight to quantize")
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / src.name
        save_with_external_data(model, named)
        quantize_static(
            str(named),
            str(dst),
            _FeedReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=weighted,
            nodes_to_exclude=dynamic,  # attention MatMuls reading the KV cache stay float
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    _rewrite_external(dst)
    check_graph(dst)
    log.info("int8 %s: %d weight MatMuls quantized, %d attention MatMuls kept float", src.name, len(weighted), len(dynamic))
    return {"quantized": len(weighted), "excluded": len(dynamic)}


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK) -> dict[str, int]:
    """Write the int4 weight-only (blocked DequantizeLinear, opset 21) version of ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    _ensure_node_names(model)
    weighted, _ = weight_matmuls(model)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, algo_config=config)
    nbits_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits_log.level
    nbits_log.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer.process()
    finally:
        nbits_log.setLevel(level)
    out = _dedupe_shared_weights(quantizer.model.model)
    blocked = sum(1 for n in out.graph.node if n.op_type == "DequantizeLinear")
    if blocked == 0:
        raise ExportError(f"{src.name}: int4 quantizer rewrote no MatMul (weights too small for block {block_size}?)")
    save_with_external_data(out, dst)
    check_graph(dst, allow_int4=True)
    log.info("int4 %s: %d of %d weight MatMuls as blocked INT4 DQ", src.name, blocked, len(weighted))
    return {"quantized": blocked, "excluded": len(weighted) - blocked}


def _dedupe_shared_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """One DequantizeLinear per shared weight.

    The flow graph's unrolled Euler steps reuse the expert's weights, and the quantizer emits a DQ (and
    its initializers) per MatMul under the same names, which breaks SSA. Identical duplicates are dropped;
    the first copy precedes every consumer because it was emitted for the first consumer.
    """
    seen_outputs: dict[str, list[str]] = {}
    keep = []
    for node in model.graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type == "DequantizeLinear" and out in seen_outputs:
            if seen_outputs[out] != list(node.input):
                raise ExportError(f"int4: two different DequantizeLinear nodes write '{out}'")
            continue
        seen_outputs[out] = list(node.input)
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    names: set[str] = set()
    inits = []
    for init in model.graph.initializer:
        if init.name not in names:
            names.add(init.name)
            inits.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model


def quantize_modelopt(
    src: Path, dst: Path, mode: str, calibration: Sequence[Mapping[str, np.ndarray]] | None
) -> dict[str, int]:
    """NVIDIA ModelOpt ONNX PTQ on CPU (``mode`` int8 or int4); needs ``pip install 'molmoact2-edge[quant]'``."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError as err:
        raise DependencyError(
            "--quantizer modelopt needs NVIDIA ModelOpt: pip install 'molmoact2-edge[quant]' "
            "(or 'nvidia-modelopt[onnx]'; it pins onnxruntime-gpu, so use a separate venv), "
            "or use the default --quantizer ort"
        ) from err
    stacked: dict[str, np.ndarray] | None = None
    if calibration:
        stacked = {k: np.concatenate([np.asarray(f[k]) for f in calibration], axis=0) for k in calibration[0]}
    kwargs: dict[str, object] = {"calibration_eps": ["cpu"], "output_path": str(dst)}
    if mode == "int4":
        kwargs["calibration_method"] = "rtn_dq"
    elif stacked is None:
        raise ExportError(f"{src.name}: modelopt int8 needs calibration feeds")
    mo_quantize(str(src), quantize_mode=mode, calibration_data=stacked, **kwargs)
    _rewrite_external(dst)
    counts = check_graph(dst, allow_int4=mode == "int4")
    return {"quantized": counts.get("DequantizeLinear", 0), "excluded": 0}


def _rewrite_external(path: Path) -> None:
    """Normalize any quantizer's output to one ``<name>.onnx.data`` beside the graph (the bundle layout)."""
    model = onnx.load(str(path))
    stale = [p for p in path.parent.glob(path.name + "*") if p != path and p != data_file(path)]
    save_with_external_data(model, path)
    for p in stale:
        p.unlink()
