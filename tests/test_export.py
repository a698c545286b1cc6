"""Export on the tiny preset: bundles in every precision pass the parity gate; broken graphs, corrupted bundles
and forbidden ops are refused; ``molmo-edge inspect`` reads a bundle.

One fp32 export (the slow part) is shared by the module; fp16/int8/int4 bundles derive from it with
``fp32_bundle`` (no second export, except fp16's flow graph, which is re-exported with an fp16 expert).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from molmoact2_edge.checkpoint import save_checkpoint
from molmoact2_edge.cli import main as cli_main
from molmoact2_edge.config import get_preset
from molmoact2_edge.depth_cache import DepthCache
from molmoact2_edge.errors import (
    BundleError,
    DependencyError,
    ExportError,
    OpsetError,
    ParityError,
    PromptTooLongError,
)
from molmoact2_edge.export import opset_check, parity, quantize
from molmoact2_edge.export.calibration import save_observations, synthetic_observations
from molmoact2_edge.export.graphs import build_graphs
from molmoact2_edge.export.pipeline import ExportOptions, export_bundle, longest_prompt
from molmoact2_edge.model.molmoact2 import MolmoAct2
from molmoact2_edge.model.policy import Policy
from molmoact2_edge.normalization import NormStats
from molmoact2_edge.runtimes import bundle as B
from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.tokenizers.text import train_small_tokenizer
from molmoact2_edge.types import STAGES
from tests._runtime_bundle import contract_of

CAMERAS = ("front", "wrist")
CORPUS = ["The task is to pick up the red cube. The setup is so101 arm. The current state of the robot is"] * 20


@pytest.fixture(autouse=True)
def _one_thread():
    """The shared 2-core machine: one torch thread is several times faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_checkpoint(path: Path, **changes) -> Path:
    """tiny preset with ``changes``, every weight perturbed so the adaLN-Zero expert is not trivially zero;
    norm stats and a small tokenizer beside it."""
    torch.manual_seed(0)
    config = get_preset("tiny").with_changes(**changes)
    model = MolmoAct2.from_config(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rng = np.random.default_rng(0)
    norm = NormStats.compute(
        "so101", rng.normal(size=(200, 6)) * 30, rng.normal(size=(200, 6)) * 30,
        setup_type="so101 arm", control_mode="absolute joint pose", action_horizon=8, n_action_steps=6,
    )  # fmt: skip
    save_checkpoint(model, config, path, norm_stats=norm)
    train_small_tokenizer(CORPUS).save(path / "tokenizer.json")
    contract_of("so101", CAMERAS, 6).save(path / "robot_contract.json")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 flow steps: export time grows with the unrolled steps."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", flow_matching_num_steps=2)


@pytest.fixture(scope="module")
def calib(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "obs.npz"
    meta = NormStats.load(checkpoint / "norm_stats.json").tag()
    save_observations(path, synthetic_observations(CAMERAS, meta, 4, seed=7))
    return path


@pytest.fixture(scope="module")
def bundles(checkpoint: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Lazily exported bundles by precision (fp32 first, the others reuse its graphs)."""
    root = tmp_path_factory.mktemp("bundles")
    made: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, precision: str) -> Path:
            if "fp32" not in made:
                made["fp32"] = root / "fp32"
                export_bundle(checkpoint, made["fp32"], ExportOptions(cameras=CAMERAS))
            if precision not in made:
                made[precision] = root / precision
                options = ExportOptions(
                    precision=precision, cameras=CAMERAS, fp32_bundle=made["fp32"],
                    calib=calib if precision == "int8" else None,
                )  # fmt: skip
                export_bundle(checkpoint, made[precision], options)
            return made[precision]

    return Lazy()


def _onnx(bundle: Path, graph: str) -> onnx.ModelProto:
    return onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False)


# --- export + parity ------------------------------------------------------------------------


def test_fp32_bundle_manifest_parity_and_session(bundles, checkpoint: Path) -> None:
    path = bundles["fp32"]
    bundle = B.Bundle.open(path)
    m = bundle.manifest
    assert m["schema_version"] == B.SCHEMA_VERSION and len(m["source"]["sha256"]) == 64
    assert set(bundle.graph_names) == {"vision", "prefill", "flow"}  # nothing is decoded: no decode_step
    # nothing decodes, so prefill returns only the expert context (no logits, no decoder cache)
    assert [t["name"] for t in m["artifacts"]["prefill"]["outputs"]] == ["context_k", "context_v"]
    assert m["prompt"]["bucket"] % 16 == 0 and m["prompt"]["bucket"] - 16 < longest_prompt(
        Policy.from_checkpoint(checkpoint), CAMERAS
    ) + 8 <= m["prompt"]["bucket"]  # the smallest multiple of 16 with 8 tokens of headroom
    assert m["model"]["chunk_length"] == 8 and m["model"]["flow_steps"] == 2 and m["cameras"]["order"] == list(CAMERAS)
    assert m["model"]["rtc"]["mode"] == "off"  # guided RTC only with export --rtc inference
    assert {"config.json", "norm_stats.json", "tokenizer.json"} <= set(m["files"])
    for name, art in m["artifacts"].items():
        assert [t["name"] for t in art["inputs"]] == list(B.GRAPHS[name].inputs)
        assert art["opset"] == 20 and art["precision"] == "fp32"
        assert opset_check.check_file(str(path / art["file"]))  # the allow-list accepts what export wrote
    report = m["parity"]
    assert report["passed"] and report["end_to_end"]["ratio"] < 1e-3
    assert all(g["rel_rms"] < 1e-5 for g in report["graphs"].values())

    policy = Policy.from_checkpoint(checkpoint, camera_order=list(CAMERAS), bucket=m["prompt"]["bucket"])
    obs = synthetic_observations(CAMERAS, policy.meta, 1, seed=3)[0]
    with PolicySession(path, "onnxruntime", providers=("CPUExecutionProvider",)) as session:
        chunk = session.act(obs, seed=5)
        assert set(chunk.timings) == set(STAGES) and chunk.timings["total"] >= chunk.timings["flow"] > 0
        np.testing.assert_allclose(chunk.actions, policy.act(obs, seed=5).actions, atol=1e-3)
        assert np.abs(session.act(obs, seed=6).actions - chunk.actions).max() > 1e-2


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantized_bundles_pass_the_gate(bundles, precision: str) -> None:
    path = bundles[precision]
    m = B.Bundle.open(path).manifest
    report = m["parity"]
    assert report["passed"], report
    assert report["end_to_end"]["ratio"] <= parity.SEED_SPREAD_FRACTION
    precisions = {g: a["precision"] for g, a in m["artifacts"].items()}
    if precision == "fp16":
        assert precisions == {"vision": "fp16", "prefill": "fp32", "flow": "fp16"}  # LLM kept fp32 (overflow)
        flow = _onnx(path, "flow")
        assert any(i.data_type == TensorProto.FLOAT16 for i in flow.graph.initializer)
        assert flow.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # fp32 accumulator out
    elif precision == "int8":
        prefill = _onnx(path, "prefill")
        ops = {n.op_type for n in prefill.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert m["artifacts"]["prefill"]["quantization"]["excluded"] > 0  # attention MatMuls stay float
        opset_check.check_file(str(path / "prefill.onnx"))  # zero points all 0
    else:
        model = _onnx(path, "flow")
        assert opset_check.default_opset(model) == 21
        blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert blocked and all(any(a.name == "block_size" for a in n.attribute) for n in blocked)
        with pytest.raises(OpsetError, match="opset 21"):
            opset_check.check_model(model)  # only allowed for int4 graphs


def test_gate_fails_on_a_broken_graph(bundles, checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken"
    shutil.copytree(bundles["fp32"], path)
    model = onnx.load(str(path / "flow.onnx"))
    weights = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2]
    target = max(weights, key=lambda i: int(np.prod(i.dims)))
    array = numpy_helper.to_array(target) * 3.0 + 0.05  # a "wrong" weight the exporter could have written
    target.CopyFrom(numpy_helper.from_array(array.astype(np.float32), target.name))
    onnx.save_model(model, str(path / "flow.onnx"), save_as_external_data=True, location="flow.onnx.data")
    manifest = json.loads((path / B.MANIFEST).read_text())
    for rel in ("flow.onnx", "flow.onnx.data"):  # re-hash: a consistent bundle whose numbers are wrong
        manifest["files"][rel] = B.file_entry(path / rel)
    B.write_manifest(path, manifest)

    policy = Policy.from_checkpoint(checkpoint, camera_order=list(CAMERAS), bucket=manifest["prompt"]["bucket"])
    bundle = B.Bundle.open(path)
    shapes_graphs = _reference_graphs(policy, bundle)
    obs = synthetic_observations(CAMERAS, policy.meta, 1, seed=1)
    with PolicySession(bundle, "onnxruntime", providers=("CPUExecutionProvider",)) as session:
        report = parity.run_parity(policy, session, shapes_graphs, obs, dict.fromkeys(bundle.graph_names, "fp32"))
    assert not report["passed"] and not report["graphs"]["flow"]["passed"] and report["graphs"]["vision"]["passed"]
    with pytest.raises(ParityError, match="flow rel RMS"):
        parity.enforce(report, allow_failure=False, where=str(path))
    parity.enforce(report, allow_failure=True, where=str(path))  # logged, not raised


def _reference_graphs(policy: Policy, bundle: B.Bundle):
    from molmoact2_edge.runtimes.backends.torch import graph_shapes

    return build_graphs(policy.model, graph_shapes(bundle), with_decode=False)


def test_reusing_fp32_graphs_of_another_flow_mode_is_refused(bundles, checkpoint: Path, tmp_path: Path) -> None:
    options = ExportOptions(precision="int4", cameras=CAMERAS, fp32_bundle=bundles["fp32"], rtc="inference")
    with pytest.raises(ExportError, match="real-time chunking is off, not inference"):
        export_bundle(checkpoint, tmp_path / "guided", options)
    assert not (tmp_path / "guided").exists()


def test_export_refuses_bad_requests(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--calib"):
        ExportOptions(precision="int8")
    if importlib.util.find_spec("modelopt") is None:
        with pytest.raises(DependencyError, match=r"molmoact2-edge\[quant\]"):
            quantize.quantize_modelopt(tmp_path / "a.onnx", tmp_path / "b.onnx", "int4", None)
    with pytest.raises(PromptTooLongError, match="never truncated"):
        export_bundle(checkpoint, tmp_path / "b", ExportOptions(cameras=CAMERAS, bucket=16))
    with pytest.raises(ExportError, match="--cameras"):
        export_bundle(checkpoint, tmp_path / "b", ExportOptions())  # tag has no camera_keys
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "x.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(checkpoint, tmp_path / "notabundle", ExportOptions(cameras=CAMERAS))


# --- bundle integrity -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "altered", "extra", "schema"])
def test_corrupted_bundles_are_refused(bundles, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "b"
    shutil.copytree(bundles["fp32"], path)
    if damage == "missing":
        (path / "tokenizer.json").unlink()
        match = "tokenizer.json.*missing"
    elif damage == "altered":
        data = bytearray((path / "flow.onnx.data").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "flow.onnx.data").write_bytes(bytes(data))
        match = "flow.onnx.data.*altered"
    elif damage == "extra":
        (path / "notes.txt").write_text("hello")
        match = "notes.txt.*not listed"
    else:
        manifest = json.loads((path / B.MANIFEST).read_text())
        manifest["schema_version"] = 99
        (path / B.MANIFEST).write_text(json.dumps(manifest))
        match = "schema_version 99"
    with pytest.raises(BundleError, match=match):
        B.Bundle.open(path)
    with pytest.raises(BundleError, match=match):
        PolicySession(path, "onnxruntime")


def test_engine_sets_are_appended_and_verified(bundles, tmp_path: Path) -> None:
    path = tmp_path / "b"
    shutil.copytree(bundles["fp32"], path)
    bundle = B.Bundle.open(path)
    key = B.engine_key("Orin", "8.7", "10.3.0.30", "R36.4.3")
    assert key == "Orin_sm87_trt10.3.0.30_jpR36.4.3"
    engine_dir = path / B.ENGINES_DIR / key
    engine_dir.mkdir(parents=True)
    (engine_dir / "flow.engine").write_bytes(b"plan bytes")
    bundle.add_engines(key, {"graphs": {"flow": f"{B.ENGINES_DIR}/{key}/flow.engine"}}, [f"{B.ENGINES_DIR}/{key}/flow.engine"])
    reopened = B.Bundle.open(path)
    assert reopened.engine_path("flow", key) == engine_dir / "flow.engine"
    assert reopened.engine_path("vision", key) is None
    assert reopened.manifest["artifacts"] == bundle.manifest["artifacts"]  # export fields untouched
    (engine_dir / "flow.engine").write_bytes(b"other bytes")
    with pytest.raises(BundleError, match="flow.engine"):
        B.Bundle.open(path)


def test_build_engines_without_tensorrt_says_what_to_install(bundles) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from molmoact2_edge.export.tensorrt_build import build_engines

        with pytest.raises(DependencyError, match="python3-libnvinfer"):
            build_engines(bundles["fp32"])
    else:
        pytest.skip("TensorRT is installed here; the engine build itself needs a GPU test")


# --- the TensorRT 10.3 allow-list -------------------------------------------------------------


def _graph(node: onnx.NodeProto, opset: int, domain_opsets: dict[str, int] | None = None, inits=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domain_opsets or {}).items()]
    graph = helper.make_graph([node], "g", [x], [y], initializer=list(inits))
    return helper.make_model(graph, opset_imports=imports)


def test_allow_list_names_the_forbidden_node() -> None:
    attention = helper.make_node("Attention", ["x", "x", "x"], ["y"], name="attn_0")
    with pytest.raises(OpsetError, match="opset 23"):
        opset_check.check_model(_graph(attention, 23))
    with pytest.raises(OpsetError, match="attn_0.*Attention.*10.14"):
        opset_check.check_model(_graph(attention, 20))
    nbits = helper.make_node("MatMulNBits", ["x", "x"], ["y"], name="mm_4bit", domain="com.microsoft")
    with pytest.raises(OpsetError, match="mm_4bit.*com.microsoft"):
        opset_check.check_model(_graph(nbits, 20, {"com.microsoft": 1}))
    qlinear = helper.make_node("QLinearMatMul", ["x"] * 8, ["y"], name="qmm")
    with pytest.raises(OpsetError, match="qmm.*QDQ"):
        opset_check.check_model(_graph(qlinear, 20))
    zp = numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    dq = helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"], name="dq_asym")
    with pytest.raises(OpsetError, match="dq_asym.*symmetric"):
        opset_check.check_model(_graph(dq, 20, inits=[zp, scale]))
    cast = helper.make_node("Cast", ["x"], ["y"], name="to_double", to=TensorProto.DOUBLE)
    with pytest.raises(OpsetError, match="to_double.*float64"):
        opset_check.check_model(_graph(cast, 20))
    ok = helper.make_node("Relu", ["x"], ["y"], name="relu")
    assert opset_check.check_model(_graph(ok, 20)) == {"Relu": 1}


# --- depth cache ----------------------------------------------------------------------------


def test_depth_cache_repredicts_only_changed_cells() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    cache = DepthCache()
    cells, previous, changed = cache.plan("front", image)
    assert previous is None and changed.all()
    codes = np.arange(100)
    cache.update("front", cells, codes, changed)
    _, previous, changed = cache.plan("front", image.copy())
    assert not changed.any() and np.array_equal(previous, codes)
    moved = image.copy()
    moved[:24, :32] = 255 - moved[:24, :32]  # top-left cell only (the image is resized to 320 x 320)
    _, _, changed = cache.plan("front", moved)
    assert changed[0] and changed.sum() <= 4
    cache.reset("front")  # every cell re-predicted; the last codes stay, as drafts only
    _, drafts, changed = cache.plan("front", image)
    assert changed.all() and np.array_equal(drafts, codes)


# --- CLI --------------------------------------------------------------------------------------


def test_export_cli_derives_int4_from_the_fp32_bundle(bundles, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    args = ["export", str(checkpoint), "-o", str(out), "--precision", "int4", "--cameras", "front,wrist"]
    result = CliRunner().invoke(cli_main.cli, [*args, "--fp32-bundle", str(bundles["fp32"])])
    assert result.exit_code == 0, result.output
    assert "reusing the fp32 graphs" in result.output and "end to end" in result.output and "pass" in result.output
    assert {a["precision"] for a in B.Bundle.open(out).manifest["artifacts"].values()} == {"int4"}


def test_inspect_cli(bundles) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_main.cli, ["inspect", str(bundles["fp32"]), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["parity"]["passed"] and set(summary["artifacts"]) == {"vision", "prefill", "flow"}
    assert all(a["quantized_weight_fraction"] == 0.0 for a in summary["artifacts"].values())
    for precision in ("int8", "int4"):  # every weight GEMM and embedding table quantized (goal >= 95%)
        result = runner.invoke(cli_main.cli, ["inspect", str(bundles[precision]), "--json"])
        fractions = {g: a["quantized_weight_fraction"] for g, a in json.loads(result.output)["artifacts"].items()}
        assert min(fractions.values()) >= 0.95, (precision, fractions)
    result = runner.invoke(cli_main.cli, ["inspect", str(bundles["fp32"])])
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and "prefill" in result.output and "pass" in result.output
    result = runner.invoke(cli_main.cli, ["inspect", str(bundles["fp32"].parent)])
    assert result.exit_code == 1 and "manifest.json is missing" in result.output


def test_prefill_schema_accepts_both_output_sets_and_nothing_else(tmp_path: Path) -> None:
    """Bundles exported before continuous prefills dropped their logits and cache still validate."""
    full, context_only = B.PREFILL.outputs, B.PREFILL.outputs_for(decoding=False)
    assert context_only == ("context_k", "context_v") and B.PREFILL.outputs_for(decoding=True) == full
    assert B.FLOW.outputs_for(decoding=False) == B.FLOW.outputs  # only prefill has decoding-only outputs
    art = {"file": "prefill.onnx", "inputs": [{"name": n} for n in B.PREFILL.inputs]}
    common = dict(root=tmp_path, source={}, toolchain={}, model=dict.fromkeys(
        ("chunk_length", "flow_steps", "action_dim", "max_action_dim", "state_dim"), 1),
        prompt={"bucket": 16}, cameras={"order": ["front"]}, parity=None, exporter_version="t", robot_contract={})  # fmt: skip
    for outputs in (full, context_only):
        artifacts = {"prefill": {**art, "outputs": [{"name": n} for n in outputs]}}
        B.build_manifest(**common, artifacts=artifacts)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="differ from the bundle schema"):
        artifacts = {"prefill": {**art, "outputs": [{"name": "logits"}, {"name": "context_k"}]}}
        B.build_manifest(**common, artifacts=artifacts)  # type: ignore[arg-type]
