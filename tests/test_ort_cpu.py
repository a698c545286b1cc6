"""onnxruntime on CPU: load-time rewrites (RMSNorm fusion, dynamic int8 from QDQ) and the shared thread pool."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from molmoact2_edge.export.onnx_export import save_with_external_data
from molmoact2_edge.export.quantize import quantize_int8
from molmoact2_edge.runtimes.backends import ort_cpu

D, H, T = 64, 128, 16
REPO = Path(__file__).resolve().parent.parent


def _rms(name: str, x: str, out: str, weight: str | None) -> list[onnx.NodeProto]:
    """The exporter's RMSNorm: Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul [, Mul(weight)]."""
    mul_out = out if weight is None else f"{name}_normed"
    nodes = [
        helper.make_node("Pow", [x, "two"], [f"{name}_sq"]),
        helper.make_node("ReduceMean", [f"{name}_sq", "last_axis"], [f"{name}_mean"], keepdims=1),
        helper.make_node("Add", [f"{name}_mean", "eps"], [f"{name}_var"]),
        helper.make_node("Sqrt", [f"{name}_var"], [f"{name}_std"]),
        helper.make_node("Reciprocal", [f"{name}_std"], [f"{name}_rstd"]),
        helper.make_node("Mul", [x, f"{name}_rstd"], [mul_out]),
    ]
    if weight is not None:
        nodes.append(helper.make_node("Mul", [mul_out, weight], [out]))
    return nodes


def _block(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> embedding -> RMSNorm(w) -> MatMul -> RMSNorm (weightless) -> adaLN modulate -> MatMul + bias
    -> MatMul(w3) -> MatMul(w3) -> y."""
    inits = [
        numpy_helper.from_array(rng.standard_normal((50, D)).astype(np.float32), "table"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(D)).astype(np.float32), "norm_w"),
        numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32) * 0.1, "w1"),
        numpy_helper.from_array(rng.standard_normal((H, D)).astype(np.float32) * 0.1, "w2"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(rng.standard_normal((1, 1, H)).astype(np.float32) * 0.1, "mod_scale"),
        numpy_helper.from_array(rng.standard_normal((1, 1, H)).astype(np.float32) * 0.1, "mod_shift"),
        numpy_helper.from_array(np.ones((1, 1, H), np.float32), "one"),
        numpy_helper.from_array(rng.standard_normal(D).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) * 0.1, "w3"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"], axis=0),
        *_rms("n1", "x", "x1", "norm_w"),
        helper.make_node("MatMul", ["x1", "w1"], ["h"]),
        *_rms("n2", "h", "h1", None),  # the expert's adaLN: norm(h) * (1 + scale) + shift, scale constant
        helper.make_node("Add", ["one", "mod_scale"], ["one_plus_scale"]),
        helper.make_node("Mul", ["h1", "one_plus_scale"], ["h2"]),
        helper.make_node("Add", ["h2", "mod_shift"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"]),
        helper.make_node("Add", ["h4", "b2"], ["h5"]),  # a linear layer's bias
        helper.make_node("MatMul", ["h5", "w3"], ["h6"]),  # one weight read twice, as unrolled flow steps do
        helper.make_node("MatMul", ["h6", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, T])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.fixture()
def graphs(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    fp32 = tmp_path / "fp32" / "block.onnx"
    fp32.parent.mkdir()
    save_with_external_data(_block(rng), fp32)
    int8 = tmp_path / "int8" / "block.onnx"
    int8.parent.mkdir()
    quantize_int8(fp32, int8, [{"ids": rng.integers(0, 50, (1, T)).astype(np.int64)} for _ in range(4)])
    return {"fp32": fp32, "int8": int8}


def test_rms_norm_and_adaln_fusion_is_exact_and_cached(graphs: dict[str, Path], tmp_path: Path) -> None:
    ids = np.arange(T, dtype=np.int64)[None]
    out = ort_cpu.prepare(graphs["fp32"], tmp_path / "cache")
    assert out != graphs["fp32"] and out.is_relative_to(tmp_path / "cache")
    ops = _ops(out)
    assert ops.count("SimplifiedLayerNormalization") == 2
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Mul"} & set(ops)  # 1 + scale went into the norm
    np.testing.assert_allclose(_run(out, ids), _run(graphs["fp32"], ids), rtol=1e-5, atol=1e-5)
    stamp = out.stat().st_mtime_ns
    assert ort_cpu.prepare(graphs["fp32"], tmp_path / "cache") == out and out.stat().st_mtime_ns == stamp
    assert ort_cpu.prepare(graphs["fp32"], tmp_path / "cache", fuse=False) == graphs["fp32"]  # nothing else applies
    assert ort_cpu.prepare(graphs["fp32"], tmp_path / "cache", fuse=False, dynamic_int8=False) == graphs["fp32"]


def test_qdq_becomes_dynamic_int8_on_the_bundles_weights(graphs: dict[str, Path], tmp_path: Path) -> None:
    ids = np.arange(T, dtype=np.int64)[None]
    out = ort_cpu.prepare(graphs["int8"], tmp_path / "cache")
    ops = _ops(out)
    assert ops.count("DynamicQuantizeMatMul") == 4
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops  # tables folded, activations dynamic
    rewritten = onnx.load(str(out))
    fused = [n for n in rewritten.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert [len(n.input) for n in fused].count(5) == 1 and ops.count(
        "Add"
    ) == 1  # the bias went into the GEMM
    names = [i.name for i in rewritten.graph.initializer]
    assert len(names) == len(set(names))  # the shared weight's zero point is added once
    qdq = onnx.load(str(graphs["int8"]))
    weights = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer if i.data_type == TensorProto.INT8}
    for node in rewritten.graph.node:
        if node.op_type == "DynamicQuantizeMatMul":  # the very int8 weights TensorRT reads
            same = numpy_helper.to_array(next(i for i in rewritten.graph.initializer if i.name == node.input[1]))
            np.testing.assert_array_equal(same, weights[node.input[1]])
    reference = _run(graphs["fp32"], ids)
    for got in (_run(out, ids), _run(graphs["int8"], ids)):
        assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.03


SHARED_POOL_SCRIPT = """
import json, os, sys
import numpy as np
from pathlib import Path
from molmoact2_edge.errors import BackendError
from molmoact2_edge.runtimes.backends.base import OnnxGraphs
from molmoact2_edge.runtimes.backends.onnxruntime import OnnxRuntimeOptions, OnnxRuntimeSession

def Files(paths): return OnnxGraphs({g: Path(p) for g, p in paths.items()})

def threads(): return len(os.listdir("/proc/self/task"))
paths = json.loads(sys.argv[1])
before = threads()
session = OnnxRuntimeSession(Files(paths), OnnxRuntimeOptions(intra_op_threads=2, providers=("CPUExecutionProvider",)))
after = threads()
ids = np.arange(16, dtype=np.int64)[None]
outs = {g: session.run(g, {"ids": ids})["y"].tolist() for g in paths}
try:
    OnnxRuntimeSession(Files(paths), OnnxRuntimeOptions(thread_pool="per-session"))
    refused = False
except BackendError:
    refused = True
print(json.dumps({"describe": session.describe(), "new_threads": after - before, "refused": refused, "outs": outs}))
"""


def test_shared_pool_serves_every_graph_of_a_bundle(graphs: dict[str, Path]) -> None:
    env = {**os.environ, "MOLMO_EDGE_ORT_THREAD_POOL": "shared", "PYTHONPATH": str(REPO)}
    paths = {"a": str(graphs["fp32"]), "b": str(graphs["int8"])}
    done = subprocess.run(
        [sys.executable, "-c", SHARED_POOL_SCRIPT, json.dumps(paths)], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["describe"]["thread_pool"] == ["shared"] and report["describe"]["spinning"] is False
    assert report["new_threads"] <= 1  # one pool of 2 threads (1 worker) for both sessions, not one each
    assert report["refused"]  # onnxruntime allows no per-session pool after the global one: a clear error
    ids = np.arange(T, dtype=np.int64)[None]
    np.testing.assert_allclose(np.array(report["outs"]["a"]), _run(graphs["fp32"], ids), rtol=1e-5, atol=1e-5)


def _rotary_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """q (B, N, S, Hd) and k (B, S, N, Hd) rotated as the exporter writes it, then the attention scores."""
    n, s, hd, half = 2, 6, 8, 4
    angles = rng.standard_normal((s, half)).astype(np.float32)
    cos, sin = np.concatenate([np.cos(angles)] * 2, -1), np.concatenate([np.sin(angles)] * 2, -1)
    inits = [
        numpy_helper.from_array(cos.reshape(1, 1, s, hd), "cos_q"),
        numpy_helper.from_array(sin.reshape(1, 1, s, hd), "sin_q"),
        numpy_helper.from_array(cos.reshape(1, s, 1, hd), "cos_k"),
        numpy_helper.from_array(sin.reshape(1, s, 1, hd), "sin_k"),
        *(numpy_helper.from_array(np.array([v], np.int64), name) for name, v in
          [("zero", 0), ("half", half), ("end", 2**62), ("last", -1), ("step", 1)]),
    ]  # fmt: skip

    def rotate(x: str, cos_name: str, sin_name: str, out: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Slice", [x, "zero", "half", "last", "step"], [f"{x}_lo"]),
            helper.make_node("Slice", [x, "half", "end", "last", "step"], [f"{x}_hi"]),
            helper.make_node("Neg", [f"{x}_hi"], [f"{x}_neg"]),
            helper.make_node("Concat", [f"{x}_neg", f"{x}_lo"], [f"{x}_rot"], axis=-1),
            helper.make_node("Mul", [x, cos_name], [f"{x}_cos"]),
            helper.make_node("Mul", [f"{x}_rot", sin_name], [f"{x}_sin"]),
            helper.make_node("Add", [f"{x}_cos", f"{x}_sin"], [out]),
        ]

    nodes = [
        *rotate("q", "cos_q", "sin_q", "q_r"),
        *rotate("k", "cos_k", "sin_k", "k_r"),
        helper.make_node("Transpose", ["k_r"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q_r", "k_t"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "rotary",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, n, s, hd]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, s, n, hd])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, n, s, s])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_rotary_fusion_matches_the_exporters_ops_in_both_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "rotary.onnx"
    save_with_external_data(_rotary_graph(rng), src)
    out = ort_cpu.prepare(src, tmp_path / "cache")
    ops = _ops(out)
    assert ops.count("RotaryEmbedding") == 2 and not {"Neg", "Slice", "Concat"} & set(ops)
    feeds = {
        "q": rng.standard_normal((1, 2, 6, 8)).astype(np.float32),
        "k": rng.standard_normal((1, 6, 2, 8)).astype(np.float32),
    }
    expected, got = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (src, out)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _adaln_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """The expert's adaLN around a residual stream: two modulations of one time embedding (each split into
    shift / scale [/ gate]), ``norm(x + y) * (1 + scale) + shift``, a gated residual, a second modulation."""
    e = 32
    inits = [
        numpy_helper.from_array(rng.standard_normal((e, 3 * D)).astype(np.float32) * 0.1, "wm1"),
        numpy_helper.from_array(rng.standard_normal(3 * D).astype(np.float32) * 0.1, "bm1"),
        numpy_helper.from_array(rng.standard_normal((e, 2 * D)).astype(np.float32) * 0.1, "wm2"),
        numpy_helper.from_array(rng.standard_normal(2 * D).astype(np.float32) * 0.1, "bm2"),
        numpy_helper.from_array(np.array([D, D, D], np.int64), "sizes3"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("MatMul", ["t", "wm1"], ["m1"]),
        helper.make_node("Add", ["m1", "bm1"], ["m1b"]),
        helper.make_node("Split", ["m1b", "sizes3"], ["shift", "scale", "gate"], axis=-1),
        helper.make_node("MatMul", ["t", "wm2"], ["m2"]),
        helper.make_node("Add", ["m2", "bm2"], ["m2b"]),
        helper.make_node("Split", ["m2b"], ["shift2", "scale2"], axis=2, num_outputs=2),
        helper.make_node("Add", ["x", "y"], ["h"]),
        *_rms("n", "h", "hn", None),
        helper.make_node("Add", ["scale", "one"], ["one_plus"]),
        helper.make_node("Mul", ["hn", "one_plus"], ["hm"]),
        helper.make_node("Add", ["hm", "shift"], ["hmod"]),
        helper.make_node("Mul", ["hmod", "gate"], ["gated"]),
        helper.make_node("Add", ["h", "gated"], ["h2"]),  # the residual stream reads the sum on
        helper.make_node("Add", ["one", "scale2"], ["one_plus2"]),
        helper.make_node("Mul", ["h2", "one_plus2"], ["h3"]),
        helper.make_node("Add", ["h3", "shift2"], ["out"]),
    ]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, T, D]) for n in ("x", "y")]
    graph = helper.make_graph(
        nodes, "adaln", [*value, helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, T, e])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, T, D])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _fp32_and_int8(tmp_path: Path, model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> tuple[Path, Path]:
    """``model`` saved as fp32 and its static QDQ int8 quantization (the exporter's), in two folders."""
    fp32, int8 = tmp_path / "fp32" / f"{model.graph.name}.onnx", tmp_path / "int8" / f"{model.graph.name}.onnx"
    fp32.parent.mkdir()
    int8.parent.mkdir()
    save_with_external_data(model, fp32)
    quantize_int8(fp32, int8, calibration)
    return fp32, int8


def test_modulations_merge_their_offsets_fold_and_residual_norms_fuse(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)

    def feeds() -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal((1, T, D)).astype(np.float32), "y": rng.standard_normal((1, T, D)).astype(np.float32),
                "t": rng.standard_normal((1, T, 32)).astype(np.float32)}  # fmt: skip

    fp32, int8 = _fp32_and_int8(tmp_path, _adaln_graph(rng), [feeds() for _ in range(4)])
    fused = ort_cpu.prepare(int8, tmp_path / "cache")
    plain = ort_cpu.prepare(int8, tmp_path / "cache", fuse=False)  # dynamic int8 only: the same GEMM numerics
    ops = _ops(fused)
    assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("Split") == 1  # two modulations, one GEMM
    assert ops.count("SkipSimplifiedLayerNormalization") == 1 and "SimplifiedLayerNormalization" not in ops
    model = onnx.load(str(fused))
    consts = {i.name for i in model.graph.initializer if not i.dims}
    assert not [
        n for n in model.graph.node if n.op_type == "Add" and set(n.input) & consts
    ]  # 1 + scale folded
    check = feeds()
    got, expected = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, check)[0]
        for p in (fused, plain)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_qkv_is_split_into_heads_without_gathers(tmp_path: Path) -> None:
    """(1, t, 3 * 2 * 8) viewed as (1, t, 3, 2, 8) and picked apart with Gather -> one Split of the merged axis."""
    inits = [numpy_helper.from_array(np.array([1, T, 3, 2, 8], np.int64), "view_shape")]
    inits += [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in range(3)]
    nodes = [
        helper.make_node("Reshape", ["qkv", "view_shape"], ["view"]),
        *(helper.make_node("Gather", ["view", f"i{i}"], [name], axis=2) for i, name in enumerate("qkv")),
        helper.make_node("Mul", ["q", "k"], ["qk"]),
        helper.make_node("Sub", ["qk", "v"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "heads", [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, T, 48])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, T, 2, 8])], inits,
    )  # fmt: skip
    src = tmp_path / "heads.onnx"
    save_with_external_data(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), src
    )
    out = ort_cpu.prepare(src, tmp_path / "cache")
    ops = _ops(out)
    assert "Gather" not in ops and ops.count("Split") == 1
    feeds = {"qkv": np.random.default_rng(5).standard_normal((1, T, 48)).astype(np.float32)}
    expected, got = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (src, out)
    )
    np.testing.assert_array_equal(got, expected)


def _timed_graph(rng: np.random.Generator, flow: bool = False) -> onnx.ModelProto:
    """A flow step in small: per-token time ``w + (1 - w) * t0`` -> time MLP -> adaLN (scale, shift, gate) around
    norm(x) -> MatMul -> gated output. With ``w`` all zero everything but the norm and the GEMM is constant.
    flow: named like the bundle's flow graph (``w`` is ``rtc_weights``; ``rtc_prefix`` is added to the output)."""
    inits = [
        numpy_helper.from_array(np.full((1, T, 1), 0.3, np.float32), "t0"),
        numpy_helper.from_array(np.ones((1, T, 1), np.float32), "one_t"),
        numpy_helper.from_array(rng.standard_normal((1, 32)).astype(np.float32), "freq"),
        numpy_helper.from_array(rng.standard_normal((32, 3 * D)).astype(np.float32) * 0.3, "w_time"),
        numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) * 0.1, "w_x"),
        numpy_helper.from_array(np.ones(D, np.float32), "ones"),
        numpy_helper.from_array(np.array([D, D, D], np.int64), "thirds"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Sub", ["one_t", "w"], ["one_minus_w"]),
        helper.make_node("Mul", ["one_minus_w", "t0"], ["wt"]),
        helper.make_node("Add", ["w", "wt"], ["t"]),  # (1, T, 1) per-token time
        helper.make_node("MatMul", ["t", "freq"], ["phase"]),
        helper.make_node("Sin", ["phase"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w_time"], ["mod"]),
        helper.make_node("Split", ["mod", "thirds"], ["scale", "shift", "gate"], axis=-1),
        *_rms("n", "x", "normed", None),
        helper.make_node("Add", ["ones", "scale"], ["one_plus_scale"]),
        helper.make_node("Mul", ["normed", "one_plus_scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "shift"], ["modulated"]),
        helper.make_node("MatMul", ["modulated", "w_x"], ["h"]),
        helper.make_node("Mul", ["h", "gate"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, T, 1])]  # fmt: skip
    if flow:
        nodes[-1].output[0] = "gated"
        nodes.append(helper.make_node("Add", ["gated", "rtc_prefix"], ["y"]))
        inputs.append(helper.make_tensor_value_info("rtc_prefix", TensorProto.FLOAT, [1, T, D]))
        for node in nodes:
            node.input[:] = ["rtc_weights" if name == "w" else name for name in node.input]
        inputs[1].name = "rtc_weights"
    graph = helper.make_graph(
        nodes, "timed", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_zero_input_variant_folds_the_time_path_through_qdq(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((1, T, D)).astype(np.float32), "w": np.zeros((1, T, 1), np.float32)}
             for _ in range(4)]  # fmt: skip
    fp32, int8 = _fp32_and_int8(tmp_path, _timed_graph(rng), calib)
    x = rng.standard_normal((1, T, D)).astype(np.float32)
    zero = {"x": x, "w": np.zeros((1, T, 1), np.float32)}

    def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]

    variant = ort_cpu.prepare(fp32, tmp_path / "cache", zero_inputs=("w",))
    assert [i.name for i in onnx.load(str(variant)).graph.input] == ["x"]
    assert _ops(variant) == ["SimplifiedLayerNormalization", "Add", "MatMul", "Mul"]  # time path folded, scale in the norm
    np.testing.assert_allclose(run(variant, zero), run(fp32, zero), rtol=1e-5, atol=1e-5)

    general, variant = (ort_cpu.prepare(int8, tmp_path / "cache", zero_inputs=z) for z in ((), ("w",)))
    assert _ops(general).count("DynamicQuantizeMatMul") == 3  # the time path runs on every call
    # the time MLP went through its QDQ once, here; the gate went into the GEMM's per-column scales
    assert _ops(variant) == ["SimplifiedLayerNormalization", "Add", "DynamicQuantizeMatMul"]
    reference = run(fp32, zero)
    for path in (general, variant):
        got = run(path, zero)
        assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.03
    with pytest.raises(ValueError, match="no input"):
        ort_cpu.prepare(fp32, tmp_path / "cache", zero_inputs=("rtc_weights",))


def test_backend_runs_the_zero_variant_only_when_the_rtc_feeds_are_zero(tmp_path: Path) -> None:
    from molmoact2_edge.runtimes.backends.base import OnnxGraphs
    from molmoact2_edge.runtimes.backends.onnxruntime import OnnxRuntimeOptions, OnnxRuntimeSession

    rng = np.random.default_rng(6)
    path = tmp_path / "flow.onnx"
    save_with_external_data(_timed_graph(rng, flow=True), path)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = OnnxRuntimeOptions(providers=("CPUExecutionProvider",), cache_dir=str(tmp_path / "trt"))
    session = OnnxRuntimeSession(OnnxGraphs({"flow": path}), options)
    assert session.describe()["zero_variants"] == ["flow[rtc_prefix,rtc_weights=0]"]
    x = rng.standard_normal((1, T, D)).astype(np.float32)
    zero = {"x": x, "rtc_weights": np.zeros((1, T, 1), np.float32), "rtc_prefix": np.zeros((1, T, D), np.float32)}
    prefixed = {**zero, "rtc_weights": np.full((1, T, 1), 0.5, np.float32),
                "rtc_prefix": rng.standard_normal((1, T, D)).astype(np.float32)}  # fmt: skip
    assert [session._variant("flow", feeds) for feeds in (zero, prefixed)] == ["flow[rtc_prefix,rtc_weights=0]", "flow"]
    runs = {name: session.run("flow", feeds)["y"] for name, feeds in (("zero", zero), ("prefixed", prefixed))}
    for name, feeds in (("zero", zero), ("prefixed", prefixed)):
        np.testing.assert_allclose(runs[name], plain.run(None, feeds)[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(runs["zero"], runs["prefixed"], atol=1e-2)  # the general graph ran for the prefix
    off = OnnxRuntimeSession(OnnxGraphs({"flow": path}), dataclasses.replace(options, zero_variants=False))
    assert off.describe()["zero_variants"] == []


def test_constant_folding_leaves_random_ops_to_run_every_call(tmp_path: Path) -> None:
    """RandomUniform reads no input, but its value is not a constant: it must not be evaluated once."""
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], shape=[1, T, D], dtype=TensorProto.FLOAT, seed=1.0),
        helper.make_node("Mul", ["r", "w"], ["rw"]),
        helper.make_node("Add", ["x", "rw"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])],
        [numpy_helper.from_array(np.full((1, T, D), 2.0, np.float32), "w")],
    )  # fmt: skip
    src = tmp_path / "random.onnx"
    save_with_external_data(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), src)
    graph_ = ort_cpu._Graph(onnx.load(str(src)))
    assert graph_.fold_constant_cones(shared_pool=False) == 0
    assert [n.op_type for n in graph_.g.node] == ["RandomUniform", "Mul", "Add"]


def test_constant_folding_that_cannot_be_evaluated_leaves_the_graph_as_it_was(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(7)
    src = tmp_path / "timed.onnx"
    save_with_external_data(_timed_graph(rng), src)
    graph = ort_cpu._Graph(onnx.load(str(src), load_external_data=True))

    def refuse(*_: object) -> list[np.ndarray]:
        raise RuntimeError("no kernel")

    before = [n.op_type for n in graph.g.node]
    monkeypatch.setattr(graph, "_evaluate", refuse)
    assert graph.fold_constant_cones(shared_pool=False) == 0
    assert [n.op_type for n in graph.g.node] == before
