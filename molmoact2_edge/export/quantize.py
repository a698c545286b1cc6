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

Before either ORT quantizer runs, ``fold_weight_transposes`` turns every
``Transpose(constant W)`` into a pre-transposed constant: the exporter feeds most of
the flow graph's weights to MatMul through a Transpose, and both quantizers only
quantize a MatMul whose weight input IS a constant (without the fold 420 of ~500
flow GEMMs stayed fp32). Embedding tables (``Gather`` on a constant) are stored as
per-row symmetric int8 behind a ``DequantizeLinear`` (``quantize_gather_weights``), so
the quantized share of the weight bytes (``quantized_weight_fraction``, reported by
``inspect``) covers the whole graph, not only its GEMMs.

These QDQ graphs are the portable form (TensorRT reads them). On onnxruntime's CPU
provider QDQ runs as dequantize-then-fp32-GEMM, slower than fp32; the onnxruntime
backend rewrites them at load into dynamic u8s8 GEMMs (``runtimes/backends/ort_cpu.py``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace ``Transpose(initializer)`` by a transposed initializer (one per weight and perm); the count folded."""
    inits = {init.name: init for init in model.graph.initializer}
    folded: dict[tuple[str, tuple[int, ...]], str] = {}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            keep.append(node)
            continue
        array = numpy_helper.to_array(inits[node.input[0]])
        perm = tuple(next((list(a.ints) for a in node.attribute if a.name == "perm"), reversed(range(array.ndim))))
        key = (node.input[0], perm)
        if key in folded:
            rename[node.output[0]] = folded[key]
            continue
        folded[key] = node.output[0]
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), node.output[0]))
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for out in model.graph.output:
        if out.name in rename:
            raise ExportError(f"fold_weight_transposes: graph output '{out.name}' is a folded transpose")
    del model.graph.node[:]
    model.graph.node.extend(keep)
    _drop_unused_initializers(model)
    return len(folded) + len(rename)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Gemm(A, constant W[, C]) -> MatMul(A, W') [+ Add(C')] with alpha, beta and transB folded into W' and C'.

    onnxruntime's int4 quantizer rewrites MatMul only; the exporter writes some Linears (the LM
    head, the adaLN modulation) as Gemm with transB=1.
    """
    inits = {init.name: init for init in model.graph.initializer}
    count = 0
    for node in list(model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0):
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
        name = f"{node.name or node.output[0]}_matmul_weight"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        replacement = [onnx.helper.make_node("MatMul", [node.input[0], name], [product], name=f"{name}_MatMul")]
        if has_bias:
            beta = np.float32(attrs.get("beta", 1.0))
            bias = node.input[2]
            if beta != 1.0 and bias in inits:
                bias = f"{name}_bias"
                scaled = numpy_helper.to_array(inits[node.input[2]]) * beta
                model.graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), bias))
            elif beta != 1.0:
                continue  # a non-constant bias with beta != 1: leave this Gemm alone
            replacement.append(onnx.helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}_Add"))
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, new in enumerate(replacement):
            model.graph.node.insert(index + offset, new)
        count += 1
    _drop_unused_initializers(model)
    return count


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_gather_weights(model: onnx.ModelProto) -> int:
    """Store each constant embedding table read by ``Gather`` as per-row symmetric int8 + DequantizeLinear(axis 0).

    Row-wise scales keep every embedding row at full int8 resolution; the gather reads
    dequantized rows, so its output (and everything after it) is unchanged in type.
    """
    inits = {init.name: init for init in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits or node.input[0] in done:
            continue
        init = inits[node.input[0]]
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or _axis(node) != 0:
            continue
        table = numpy_helper.to_array(init)
        scale = np.maximum(np.abs(table).max(axis=1), 1e-12).astype(np.float32) / 127.0
        q = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
        name = init.name
        model.graph.initializer.remove(init)
        model.graph.initializer.extend(
            [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_scale"),
             numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero")]
        )
        dq = onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name], name=f"{name}_DequantizeLinear", axis=0
        )
        model.graph.node.insert(0, dq)
        done.add(name)
    return len(done)


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def quantized_weight_fraction(model: onnx.ModelProto | Path) -> float:
    """Share of the graph's weight elements stored quantized (int8/uint8/int4/uint4/fp8).

    Weights are the constants a MatMul/Gemm or the data input of a Gather reads, directly
    or through ``DequantizeLinear``/``Transpose``/``Cast``: what a GEMM or an embedding
    lookup streams from memory. Scales, biases and norm weights are not weights here.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    quantized_types = {
        onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
        onnx.TensorProto.FLOAT8E4M3FN,
    }

    def source(name: str) -> onnx.TensorProto | None:
        while name not in inits:
            node = producers.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Cast", "Reshape"):
                return None
            name = node.input[0]
        return inits[name]

    seen: dict[str, tuple[int, bool]] = {}
    for node in model.graph.node:
        reads = node.input[:2] if node.op_type in ("MatMul", "Gemm") else node.input[:1] if node.op_type == "Gather" else []
        for name in reads:
            init = source(name)
            if init is not None and init.name not in seen:
                seen[init.name] = (int(np.prod(init.dims)), init.data_type in quantized_types)
    total = sum(n for n, _ in seen.values())
    return sum(n for n, q in seen.values() if q) / total if total else 0.0


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


def quantize_int8(src: Path, dst: Path, calibration: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Write the int8 QDQ version of ``src`` to ``dst``; returns the number of quantized/excluded MatMuls.

    calibration: recorded input feeds of this graph (one dict per call), at least one.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ExportError(f"{src.name}: int8 needs calibration feeds; none were recorded")
    model = onnx.load(str(src))
    _ensure_node_names(model)
    folded = fold_weight_transposes(model)
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
    quantized = onnx.load(str(dst))
    tables = quantize_gather_weights(quantized)
    fraction = quantized_weight_fraction(quantized)
    save_with_external_data(quantized, dst)
    _rewrite_external(dst)
    check_graph(dst)
    log.info(
        "int8 %s: %d weight MatMuls (%d transposes folded) and %d embedding tables quantized, %d attention MatMuls "
        "kept float; %.1f%% of weight elements quantized",
        src.name, len(weighted), folded, tables, len(dynamic), 100 * fraction,
    )
    return {"quantized": len(weighted), "excluded": len(dynamic), "quantized_weight_fraction": round(fraction, 4)}


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK) -> dict[str, float]:
    """Write the int4 weight-only (blocked DequantizeLinear, opset 21) version of ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    _ensure_node_names(model)
    fold_weight_transposes(model)
    gemm_to_matmul(model)
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
    dequantized = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    blocked = sum(1 for n in out.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in dequantized)
    if blocked == 0:
        raise ExportError(f"{src.name}: int4 quantizer rewrote no MatMul (weights too small for block {block_size}?)")
    tables = quantize_gather_weights(out)  # embeddings as int8 rows: ORT's int4 quantizer has no QDQ Gather
    fraction = quantized_weight_fraction(out)
    save_with_external_data(out, dst)
    check_graph(dst, allow_int4=True)
    log.info(
        "int4 %s: %d of %d weight MatMuls as blocked INT4 DQ, %d embedding tables int8; %.1f%% of weight elements quantized",
        src.name, blocked, len(weighted), tables, 100 * fraction,
    )
    return {"quantized": blocked, "excluded": len(weighted) - blocked, "quantized_weight_fraction": round(fraction, 4)}


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
