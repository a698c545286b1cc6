"""An op/opset allow-list for the TensorRT 10.3 ONNX parser (JetPack 6), run on every exported graph.

TensorRT cannot be installed on CI machines (no GPU, stub wheels), so this
is the check that stands in for "the parser on the Jetson will read it". The
list follows onnx-tensorrt's ``docs/operators.md`` for the 10.x series (opsets
9-20): what it marks unsupported, and what newer opsets added that 10.3 lacks,
is refused here with the node named.

Refused on purpose:
- opset > 20 in the default domain: opset 23 turns SDPA into ``Attention`` and
  ``nn.RMSNorm`` into ``RMSNormalization`` (parser support came in TRT 10.14).
  Opset 21 is allowed only for int4 graphs, whose blocked ``DequantizeLinear``
  needs it (TensorRT's documented int4 weight-only form).
- any non-default domain (``com.microsoft``: ORT contrib ops such as ``MatMulNBits``).
- QOperator / integer-matmul quantization (``QLinearMatMul``, ``MatMulInteger``,
  ``DynamicQuantizeLinear``): TensorRT takes explicit Q/DQ only.
- Q/DQ with a non-zero zero point (TensorRT quantization is symmetric) and
  float64 tensors (TensorRT has no double type).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from molmoact2_edge.errors import OpsetError

log = logging.getLogger(__name__)

MAX_OPSET = 20
MAX_OPSET_INT4 = 21

# Default-domain ops the TensorRT 10.x ONNX parser converts (onnx-tensorrt operators.md, 10.1-GA),
# minus those that only newer releases read.
TRT10_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos
    Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid
    HardSwish Hardmax Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
    Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
    Where Xor
    """.split()  # noqa: SIM905 (a word list reads better than 160 quoted strings)
)

# Why the common offenders are refused: shown in the error so the fix is obvious.
REASONS = {
    "Attention": "opset-23 Attention is read only by TensorRT >= 10.14; export at opset <= 20 so SDPA decomposes",
    "RMSNormalization": "opset-23 op; export at opset <= 20 (or write RMSNorm by hand)",
    "RotaryEmbedding": "opset-23 op; use the cos/sin table form of RoPE",
    "QLinearMatMul": "QOperator quantization; TensorRT needs explicit QDQ (quantize_static QuantFormat.QDQ)",
    "QLinearConv": "QOperator quantization; TensorRT needs explicit QDQ",
    "MatMulInteger": "dynamic quantization; TensorRT needs explicit QDQ",
    "ConvInteger": "dynamic quantization; TensorRT needs explicit QDQ",
    "DynamicQuantizeLinear": "dynamic quantization; TensorRT needs explicit QDQ",
    "MatMulNBits": "ORT contrib op; quantize int4 with quant_format=QDQ (blocked DequantizeLinear)",
}


def _fail(where: str, node: onnx.NodeProto | None, why: str) -> OpsetError:
    label = f"node '{node.name}' ({node.domain or 'ai.onnx'}::{node.op_type})" if node is not None else "graph"
    return OpsetError(f"{where}: {label}: {why}")


def _iter_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise OpsetError("graph imports no default-domain opset")


def check_model(
    model: onnx.ModelProto, where: str = "graph", allow_int4: bool = False, base_dir: str = ""
) -> dict[str, int]:
    """Raise OpsetError for the first thing TensorRT 10.3's parser would refuse; return op counts.

    where: a label for messages (the ONNX file path).
    allow_int4: accept opset 21 and INT4 DequantizeLinear (int4 weight-only graphs).
    base_dir: folder of the external data files (to read zero points stored outside the graph).
    """
    limit = MAX_OPSET_INT4 if allow_int4 else MAX_OPSET
    opset = default_opset(model)
    if opset > limit:
        raise _fail(where, None, f"default-domain opset {opset} > {limit}; TensorRT 10.3 reads opsets 9-{limit}")
    for imp in model.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            log.debug("%s imports domain %s (allowed only if no node uses it)", where, imp.domain)

    initializers = {init.name: init for init in model.graph.initializer}
    for init in initializers.values():
        if init.data_type == onnx.TensorProto.DOUBLE:
            raise OpsetError(f"{where}: initializer '{init.name}' is float64; TensorRT has no double type")
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and not allow_int4:
            raise OpsetError(f"{where}: initializer '{init.name}' is 4-bit in a graph not marked int4")

    counts: dict[str, int] = {}
    for node in _iter_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            raise _fail(where, node, f"custom domain '{node.domain}' " + REASONS.get(node.op_type, "is not read by TensorRT"))
        if node.op_type not in TRT10_OPS:
            raise _fail(where, node, REASONS.get(node.op_type, "not supported by the TensorRT 10.3 ONNX parser"))
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to == onnx.TensorProto.DOUBLE:
                raise _fail(where, node, "casts to float64; TensorRT has no double type")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(where, node, initializers, base_dir)
    return counts


def _check_qdq(
    where: str, node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], base_dir: str
) -> None:
    """TensorRT's explicit quantization is symmetric: every zero point must be 0."""
    if len(node.input) < 3 or not node.input[2]:
        return
    zp = initializers.get(node.input[2])
    if zp is None:
        raise _fail(where, node, f"zero point '{node.input[2]}' is not a constant; TensorRT needs constant zero 0")
    if np.any(numpy_helper.to_array(zp, base_dir).astype(np.int64) != 0):
        raise _fail(where, node, f"zero point '{zp.name}' is non-zero; TensorRT quantization is symmetric")


def check_file(path: str, allow_int4: bool = False) -> dict[str, int]:
    """Load (without external weights) and check an ONNX file; returns op counts."""
    model = onnx.load(path, load_external_data=False)
    return check_model(model, where=str(path), allow_int4=allow_int4, base_dir=str(Path(path).parent))
