"""Quantization covers the weights: transposed weights folded, embeddings int8, the covered share reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from molmoact2_edge.export.onnx_export import save_with_external_data
from molmoact2_edge.export.quantize import (
    fold_weight_transposes,
    quantize_gather_weights,
    quantize_int4,
    quantize_int8,
    quantized_weight_fraction,
)

K, N, V = 64, 96, 40


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(Transpose(W1)) twice with the same W1 (as unrolled steps) -> MatMul(W2)."""
    w1 = numpy_helper.from_array(rng.standard_normal((N, K)).astype(np.float32) * 0.1, "w1")  # (out, in) like nn.Linear
    w2 = numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32) * 0.1, "w2")
    table = numpy_helper.from_array(rng.standard_normal((V, K)).astype(np.float32), "table")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"], axis=0),
        helper.make_node("Transpose", ["w1"], ["w1_t_a"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1_t_a"], ["h1"]),
        helper.make_node("Transpose", ["w1"], ["w1_t_b"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1_t_b"], ["h2"]),
        helper.make_node("Add", ["h1", "h2"], ["h"]),
        helper.make_node("Transpose", ["w2"], ["w2_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w2_t"], ["y0"]),
        helper.make_node("Transpose", ["y0"], ["y"], perm=[0, 2, 1]),  # an activation transpose stays
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N, 8])],
        [w1, w2, table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_fold_keeps_results_and_shares_one_copy_per_weight() -> None:
    model = _graph(np.random.default_rng(0))
    ids = np.arange(8, dtype=np.int64)[None] % V
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    assert fold_weight_transposes(model) == 3
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Transpose") == 1  # the activation transpose is not a weight
    assert sorted(i.name for i in model.graph.initializer) == ["table", "w1_t_a", "w2_t"]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(before, after)


def test_gather_tables_become_int8_rows_within_half_a_step() -> None:
    model = _graph(np.random.default_rng(1))
    table = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "table"))
    assert quantize_gather_weights(model) == 1
    ids = np.arange(8, dtype=np.int64)[None]
    x = ort.InferenceSession(
        helper.make_model(
            helper.make_graph(
                [n for n in model.graph.node if n.op_type in ("DequantizeLinear", "Gather")],
                "t",
                [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, K])],
                [i for i in model.graph.initializer if i.name.startswith("table")],
            ),
            opset_imports=[helper.make_opsetid("", 20)],
            ir_version=10,
        ).SerializeToString()
    ).run(None, {"ids": ids})[0][0]
    step = np.abs(table[:8]).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(x - table[:8]) <= step / 2 + 1e-6)


def test_int8_and_int4_quantize_every_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    src = tmp_path / "g.onnx"
    save_with_external_data(_graph(rng), src)
    assert quantized_weight_fraction(src) == 0.0
    ids = [{"ids": rng.integers(0, V, (1, 8)).astype(np.int64)} for _ in range(4)]
    reference = _run(src, ids[0]["ids"])
    for precision, quantize in (("int8", lambda d: quantize_int8(src, d, ids)), ("int4", lambda d: quantize_int4(src, d))):
        dst = tmp_path / precision / "g.onnx"
        dst.parent.mkdir()
        report = quantize(dst)
        assert report["excluded"] == 0, precision
        assert report["quantized_weight_fraction"] == 1.0, precision
        assert quantized_weight_fraction(dst) == 1.0, precision
        assert "Transpose" in [n.op_type for n in onnx.load(str(dst)).graph.node]  # only the activation one
        got = _run(dst, ids[0]["ids"])
        rel = np.linalg.norm(got - reference) / np.linalg.norm(reference)
        assert rel < (0.05 if precision == "int8" else 0.2), (precision, rel)
