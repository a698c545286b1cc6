"""Backend registry (lazy, no silent fallback) and the onnxruntime backend's I/O binding against plain ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from molmoact2_edge.errors import BackendError, BackendUnavailableError, DependencyError
from molmoact2_edge.runtimes.backends import base
from molmoact2_edge.runtimes.backends.base import OnnxGraphs, available_backends, load_backend


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.fixture
def kv_graph(tmp_path: Path) -> Path:
    """A decode-step-like graph: token features x (1, 4), static cache (1, 8, 4) updated at a position, logits."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Unsqueeze", ["h", "axes0"], ["h3"]),
        helper.make_node("Reshape", ["pos", "shape_idx"], ["idx"]),
        helper.make_node("ScatterND", ["cache", "idx", "h3"], ["cache_out"]),
        helper.make_node("ReduceSum", ["cache_out", "axes1"], ["logits"], keepdims=0),
    ]
    inits = [
        w,
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([1, 1, 2], np.int64), "shape_idx"),
        numpy_helper.from_array(np.array([1], np.int64), "axes1"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("pos", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("cache", TensorProto.FLOAT, [1, 8, 4]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("cache_out", TensorProto.FLOAT, [1, 8, 4]),
    ]
    return _save(tmp_path / "decode_step.onnx", nodes, inputs, outputs, inits)


def test_io_binding_matches_plain_inference_session_over_a_decode_loop(kv_graph: Path) -> None:
    plain = ort.InferenceSession(str(kv_graph), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    cache_a = cache_b = np.zeros((1, 8, 4), np.float32)
    with load_backend("onnxruntime", OnnxGraphs({"decode_step": kv_graph})) as session:
        kept = []
        for step in range(8):
            x = rng.standard_normal((1, 4)).astype(np.float32)
            pos = np.array([0, step], np.int64)
            ours = session.run("decode_step", {"x": x, "pos": pos, "cache": cache_a})
            ref = dict(
                zip(
                    ["logits", "cache_out"],
                    plain.run(None, {"x": x, "pos": pos, "cache": cache_b}),
                    strict=True,
                )
            )
            np.testing.assert_array_equal(ours["logits"], ref["logits"])
            np.testing.assert_array_equal(ours["cache_out"], ref["cache_out"])
            cache_a, cache_b = ours["cache_out"], ref["cache_out"]
            kept.append(ours["logits"])
        # returned arrays are the caller's: later runs must not overwrite them
        assert not np.array_equal(kept[0], kept[-1])
        assert session.describe()["providers"] == ["CPUExecutionProvider"]


def _decode_loop(session: base.BackendSession, steps: int, keep: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits per step and the final cache of ``steps`` decode_step calls, the cache kept resident or not."""
    rng = np.random.default_rng(2)
    cache: np.ndarray | base.Resident = np.zeros((1, 8, 4), np.float32)
    logits = []
    for step in range(steps):
        feeds = {
            "x": rng.standard_normal((1, 4)).astype(np.float32),
            "pos": np.array([0, step], np.int64),
            "cache": cache,
        }
        out, kept = session.run_keeping("decode_step", feeds, ["cache_out"] if keep else [])
        cache = kept["cache_out"] if keep else out["cache_out"]
        logits.append(out["logits"])
    return logits, cache.numpy() if isinstance(cache, base.Resident) else cache


def test_resident_cache_gives_the_same_results_without_host_copies(kv_graph: Path) -> None:
    with load_backend("onnxruntime", OnnxGraphs({"decode_step": kv_graph})) as session:
        copied = _decode_loop(session, 8, keep=False)
        resident = _decode_loop(session, 8, keep=True)
        _, kept = session.run_keeping(
            "decode_step", {"x": np.ones((1, 4), np.float32), "pos": np.array([0, 0], np.int64), "cache": copied[1]},
            ["cache_out"],
        )  # fmt: skip
    for a, b in zip(copied[0], resident[0], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(copied[1], resident[1])
    assert isinstance(kept["cache_out"].value, ort.OrtValue)  # left in the binding's buffer, not copied out


def test_a_resident_overwritten_by_later_runs_is_refused(kv_graph: Path) -> None:
    feeds = {
        "x": np.ones((1, 4), np.float32),
        "pos": np.array([0, 1], np.int64),
        "cache": np.zeros((1, 8, 4), np.float32),
    }
    with load_backend("onnxruntime", OnnxGraphs({"decode_step": kv_graph})) as session:
        first = session.run_keeping("decode_step", feeds, ["cache_out"])[1]["cache_out"]
        second = session.run_keeping("decode_step", {**feeds, "cache": first}, ["cache_out"])[1]["cache_out"]
        assert second.slot is not first.slot  # a call never writes the buffer it reads
        session.run_keeping(
            "decode_step", {**feeds, "cache": second}, ["cache_out"]
        )  # writes first's slot again
        assert first.stale and not second.stale
        with pytest.raises(BackendError, match="overwritten"):
            session.run("decode_step", {**feeds, "cache": first})
        with pytest.raises(BackendError, match="overwritten"):
            first.numpy()
        with pytest.raises(BackendError, match="no output"):
            session.run_keeping("decode_step", feeds, ["cache"])


def test_run_rejects_wrong_shape_dtype_and_names(kv_graph: Path) -> None:
    session = load_backend("onnxruntime", OnnxGraphs({"decode_step": kv_graph}))
    good = {
        "x": np.zeros((1, 4), np.float32),
        "pos": np.zeros(2, np.int64),
        "cache": np.zeros((1, 8, 4), np.float32),
    }
    with pytest.raises(
        BackendError, match="input 'x': expected shape \\(1, 4\\) dtype float32, got shape \\(2, 4\\)"
    ):
        session.run("decode_step", {**good, "x": np.zeros((2, 4), np.float32)})
    with pytest.raises(BackendError, match="dtype int64, got shape \\(2,\\) dtype int32"):
        session.run("decode_step", {**good, "pos": np.zeros(2, np.int32)})
    with pytest.raises(BackendError, match="missing input\\(s\\) \\['cache'\\]"):
        session.run("decode_step", {k: v for k, v in good.items() if k != "cache"})
    with pytest.raises(BackendError, match="'flow' is not loaded"):
        session.run("flow", good)
    session.close()
    session.close()  # safe twice
    with pytest.raises(BackendError, match="closed"):
        session.run("decode_step", good)


def test_dynamic_shape_graph_is_refused(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "vision.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [],
    )
    with pytest.raises(BackendError, match="'x' has a dynamic shape"):
        load_backend("onnxruntime", OnnxGraphs({"vision": path}))


def test_missing_library_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        base.BACKENDS,
        "tensorrt",
        base.BackendEntry("x.y", "Z", ("not_a_real_module_xyz",), "pip install thing"),
    )
    with pytest.raises(BackendUnavailableError, match="not_a_real_module_xyz.*pip install thing") as info:
        load_backend("tensorrt", OnnxGraphs({}))
    assert isinstance(info.value, DependencyError)
    assert "pip install thing" in (available_backends()["tensorrt"] or "")


def test_requested_gpu_provider_missing_is_an_error_not_a_fallback(kv_graph: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        load_backend(
            "onnxruntime",
            OnnxGraphs({"decode_step": kv_graph}),
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        )


def test_auto_says_what_it_picked_and_why(kv_graph: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        base.BACKENDS, "tensorrt", base.BackendEntry("x.y", "Z", ("no_trt_here",), "pip install trt")
    )
    session = load_backend(
        "auto", OnnxGraphs({"decode_step": kv_graph}), intra_op_threads=1, engine_dir="ignored"
    )
    assert session.name == "onnxruntime"
    assert "auto picked onnxruntime" in session.reason and "no_trt_here" in session.reason


def test_unknown_backend_and_option_suggest_the_closest(kv_graph: Path) -> None:
    with pytest.raises(BackendError, match="Did you mean 'onnxruntime'"):
        load_backend("onnxrutime", OnnxGraphs({}))
    with pytest.raises(BackendError, match="Did you mean 'intra_op_threads'"):
        load_backend("onnxruntime", OnnxGraphs({"decode_step": kv_graph}), intra_op_thread=2)


def test_tensorrt_here_is_unavailable_with_the_reason() -> None:
    """No GPU and no TensorRT on the dev machine: the real registry says so and how to get it."""
    from molmoact2_edge.runtimes.backends.tensorrt import gpu_count

    count, why = gpu_count()
    assert count == 0 and why
    reason = available_backends()["tensorrt"]
    assert reason is not None and "tensorrt" in reason and "pip install" in reason
    with pytest.raises(BackendUnavailableError, match="molmoact2-edge\\[tensorrt\\]"):
        load_backend("tensorrt", OnnxGraphs({}))


def test_tensorrt_backend_uses_only_real_cuda_runtime_names() -> None:
    """The backend cannot run without a GPU, but every cuda.bindings.runtime name it calls must exist."""
    import re

    runtime = pytest.importorskip("cuda.bindings.runtime")
    from molmoact2_edge.runtimes.backends import tensorrt as trt_backend

    source = Path(trt_backend.__file__).read_text()
    used = sorted(set(re.findall(r"cudart\.(\w+)", source)))
    assert {"cudaStreamBeginCapture", "cudaGraphInstantiate", "cudaGraphLaunch", "cudaMemcpyAsync"} <= set(
        used
    )
    assert [name for name in used if not hasattr(runtime, name)] == []
    assert runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal is not None
    # no driver here: the guard reports why instead of raising
    count, why = trt_backend.gpu_count()
    assert count == 0 and why


class _Doubler(base.BackendSession):
    """A backend without resident buffers: ``double`` maps x (3,) to 2x."""

    name = "doubler"
    SPEC = base.TensorSpec("x", (3,), np.dtype(np.float32))

    def specs(self, graph: str) -> tuple[list[base.TensorSpec], list[base.TensorSpec]]:
        return [self.SPEC], [base.TensorSpec("y", (3,), np.dtype(np.float32))]

    def _run(self, graph: str, feeds) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
        return {"y": 2 * np.asarray(feeds["x"])}


def test_backends_without_resident_buffers_keep_outputs_on_the_host() -> None:
    session = _Doubler(OnnxGraphs({}), None)
    x: np.ndarray | base.Resident = np.ones(3, np.float32)
    for _ in range(3):
        out, kept = session.run_keeping("double", {"x": x}, ["y"])
        assert out == {} and isinstance(kept["y"].value, np.ndarray)
        x = kept["y"]
    np.testing.assert_array_equal(x.numpy(), np.full(3, 8, np.float32))
    with pytest.raises(BackendError, match="expected shape"):
        session.run(
            "double", {"x": base.Resident(base.TensorSpec("z", (4,), np.dtype(np.float32)), np.zeros(4))}
        )


def test_flushing_denormals_leaves_a_masked_softmax_unchanged(tmp_path: Path) -> None:
    """The masked positions' probabilities are what flushes (exp of about -30000): the output is the same."""
    nodes = [
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
        for n, s in (("scores", [1, 4, 8]), ("bias", [1, 4, 8]), ("v", [1, 8, 3]))
    ]
    path = _save(
        tmp_path / "attend.onnx",
        nodes,
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 3])],
        [],
    )
    rng = np.random.default_rng(4)
    feeds = {
        "scores": rng.standard_normal((1, 4, 8)).astype(np.float32),
        "bias": np.where(np.tril(np.ones((4, 8))) > 0, 0, -30000).astype(np.float32)[None],
        "v": rng.standard_normal((1, 8, 3)).astype(np.float32),
    }
    outs = {}
    for flush in (True, False):
        with load_backend("onnxruntime", OnnxGraphs({"attend": path}), flush_denormals=flush) as session:
            assert session.describe()["flush_denormals"] is flush
            outs[flush] = session.run("attend", feeds)["out"]
    np.testing.assert_allclose(outs[True], outs[False], rtol=0, atol=1e-6)
