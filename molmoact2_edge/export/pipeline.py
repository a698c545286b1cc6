"""Checkpoint -> verified bundle, the whole export in one function (``export_bundle``).

The order:

  1. load the PyTorch reference policy (``model.policy.Policy``) from the checkpoint;
  2. fix the shapes: camera order, prompt bucket (from the camera count and the
     prompt, or ``--bucket``; a prompt that does not fit is refused, never truncated),
     cache and context lengths, chunk length;
  3. export the graphs once in fp32 (``onnx_export``; checker + TensorRT allow-list);
  4. derive the requested precision from those files (``quantize``); int8 first records
     calibration inputs by running the fp32 graphs through ``PolicySession``;
  5. write the bundle (graphs, config, tokenizer, norm stats, manifest with the robot contract:
     the checkpoint's ``robot_contract.json``, else the release conventions of its tag, else
     the contract flags; ``contract.export_contract``);
  6. parity gate: the finished bundle through ``PolicySession`` on onnxruntime-CPU vs the
     reference (``parity``); the report goes into the manifest;
  7. ``--target tensorrt``: build engines into the bundle (``tensorrt_build``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmoact2_edge import __version__
from molmoact2_edge.contract import CONTRACT_FILE, SO101_JOINTS, ContractFlags, RobotContract, export_contract
from molmoact2_edge.errors import ExportError, PromptTooLongError
from molmoact2_edge.export import calibration, parity, quantize
from molmoact2_edge.export.graphs import FlowGraph, GraphShapes, build_graphs, rtc_mode
from molmoact2_edge.export.onnx_export import DEFAULT_OPSET, data_file, export_module, io_specs
from molmoact2_edge.model.rtc_flow import EXPORTABLE_VJP
from molmoact2_edge.rtc import GUIDANCE_CLIP
from molmoact2_edge.runtimes import bundle as B
from molmoact2_edge.runtimes.depth_decode import depth_block_length
from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.types import Observation

log = logging.getLogger(__name__)

TARGETS = ("onnx", "tensorrt")
# The bucket is the smallest that fits: every padded slot costs a full row of prefill work (a 192-slot
# bucket for a 143-token prompt ran prefill ~1.3x slower than 160, same logits). A longer task at run
# time is refused (PromptTooLongError, checked at pre-flight); export again with --bucket.
BUCKET_MULTIPLE = 16  # buckets are rounded up to this many tokens
BUCKET_MARGIN = 8  # tokens of headroom for tasks longer than the probe task
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
FAST_DIR = "action_tokenizer"
# The int8 calibrator builds its own onnxruntime sessions, which onnxruntime refuses once a process has a
# global (shared) thread pool: export's own sessions keep per-session pools (runtimes/backends/onnxruntime.py).
EXPORT_POOL = "per-session"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """What ``molmo-edge export`` asks for. Defaults suit a first export of a small checkpoint."""

    precision: str = "fp32"  # fp32 | fp16 | int8 | int4
    calib: Path | None = None  # dataset dir or .npz of observations (int8 needs it)
    bucket: int | None = None  # prompt tokens; None: from the cameras and a probe prompt
    cameras: tuple[str, ...] | None = None  # camera order; None: the norm-stats tag's camera_keys
    tag: str | None = None  # norm-stats embodiment tag; None: the only one
    target: str = "onnx"  # onnx | tensorrt (also build engines here)
    quantizer: str = "ort"  # ort | modelopt
    allow_parity_failure: bool = False
    opset: int = DEFAULT_OPSET
    parity_observations: int = 2
    fp32_bundle: Path | None = None  # reuse this fp32 bundle's graphs (same checkpoint and shapes) instead of exporting
    calib_samples: int = 8  # calibration calls recorded per graph
    seeds: tuple[int, int] = parity.DEFAULT_SEEDS
    contract_flags: ContractFlags = ContractFlags()  # --control-hz / --joint-frame / --robot
    rtc: str = "auto"  # auto | inference: the flow graph's real-time chunking (``graphs.rtc_mode``)

    def __post_init__(self) -> None:
        if self.precision not in B.PRECISIONS:
            raise ExportError(f"precision {self.precision!r}: choose one of {B.PRECISIONS}")
        if self.target not in TARGETS:
            raise ExportError(f"target {self.target!r}: choose one of {TARGETS}")
        if self.quantizer not in quantize.QUANTIZERS:
            raise ExportError(f"quantizer {self.quantizer!r}: choose one of {quantize.QUANTIZERS}")
        if self.precision == "int8" and self.calib is None:
            raise ExportError(
                "int8 needs calibration data: pass --calib DATASET_DIR (LeRobot format) or --calib OBS.npz "
                "(recorded observations; see molmoact2_edge.export.calibration.save_observations)"
            )


def export_bundle(
    checkpoint: str | Path, out: str | Path, options: ExportOptions, progress: Progress | None = None
) -> dict[str, Any]:
    """Export ``checkpoint`` to the bundle directory ``out``; returns the manifest.

    Raises ExportError / OpsetError / ParityError / PromptTooLongError naming what failed; on any failure
    ``out`` is removed (a ParityError carries the report as ``.report``).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if options.fp32_bundle is not None and Path(options.fp32_bundle).resolve() == out.resolve():
        raise ExportError(f"--fp32-bundle {options.fp32_bundle} is the output directory; write the new bundle elsewhere")
    _prepare_out(out)
    try:
        return _export(checkpoint, out, options, progress or (lambda msg: log.info("%s", msg)))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # a half-written or failing bundle must not look like a bundle
        raise


def _export(checkpoint: Path, out: Path, options: ExportOptions, say: Progress) -> dict[str, Any]:
    from molmoact2_edge.model.policy import Policy

    start = time.perf_counter()
    say(f"loading {checkpoint}")
    policy = Policy.from_checkpoint(checkpoint, tag=options.tag)
    policy.rtc = rtc_mode(policy.config, options.rtc)  # the reference samples as the exported flow graph will
    known = options.cameras or policy.camera_order or None
    calib_obs = calibration.load_observations(options.calib, known) if options.calib else []
    cameras = _cameras(options, policy, calib_obs)
    policy.camera_order = list(cameras)
    longest = longest_prompt(policy, cameras, [o.task for o in calib_obs])
    suggested = int(math.ceil((longest + BUCKET_MARGIN) / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
    if options.bucket is not None and options.bucket < longest:
        raise PromptTooLongError(
            f"--bucket {options.bucket}: the prompt for {len(cameras)} camera(s) already needs {longest} tokens; "
            f"use --bucket {suggested} (prompts are never truncated)"
        )
    bucket = options.bucket or suggested
    policy.prompts.bucket = bucket
    shapes = _shapes(policy, cameras, bucket)
    contract = bundle_contract(checkpoint, policy, cameras, shapes.image_size, options.contract_flags)
    if contract.provenance != "recorded":
        say(f"robot contract: {checkpoint} records none; {describe_provenance(contract)}")
    say(f"shapes: {len(cameras)} camera(s) {list(cameras)}, bucket {bucket}, cache {shapes.cache_length}, chunk {shapes.chunk_length}")

    decoding = shapes.cache_length > bucket  # tokens are decoded after the prompt (Think, discrete)
    graphs = build_graphs(policy.model, shapes, with_decode=decoding, with_flow=policy.mode != "discrete", rtc=policy.rtc)
    owns_stage = options.fp32_bundle is None
    stage = out.parent / f".{out.name}.fp32-stage" if owns_stage else Path(options.fp32_bundle)  # type: ignore[arg-type]
    artifacts: dict[str, dict[str, Any]] = {}
    try:
        if owns_stage:
            shutil.rmtree(stage, ignore_errors=True)
            examples = shapes.example_inputs(policy.config)
            for name, module in graphs.items():
                say(f"exporting {name} (fp32, opset {options.opset})")
                spec = B.GRAPHS[name]
                outputs = spec.outputs_for(decoding)
                exported = export_module(
                    module, examples[name], stage / f"{name}.onnx", spec.inputs, outputs, options.opset
                )
                artifacts[name] = {"exporter": exported.exporter, "export_seconds": round(exported.seconds, 2)}
            _copy_side_files(checkpoint, stage, policy.mode == "discrete")
            _write_manifest(stage, checkpoint, policy, shapes, contract, _artifacts(stage, artifacts, dict.fromkeys(graphs, "fp32")), None)
        else:
            say(f"reusing the fp32 graphs of {stage}")
            artifacts = _check_reusable(stage, checkpoint, shapes, cameras, list(graphs), policy.rtc)

        precisions = graph_precisions(options.precision, list(graphs))
        calib_calls: dict[str, list[dict[str, Any]]] = {}
        if options.precision == "int8":
            say(f"recording calibration inputs on {len(calib_obs)} observation(s)")
            calib_calls = _record_calibration(stage, calib_obs, options.calib_samples)
        out.mkdir(parents=True, exist_ok=True)
        for name in graphs:
            src, dst = stage / f"{name}.onnx", out / f"{name}.onnx"
            say(f"{name}: {precisions[name]}")
            if name == B.FLOW.name and precisions[name] == "fp16":
                artifacts[name]["quantization"] = _export_fp16_flow(policy, shapes, dst, options.opset)
            else:
                artifacts[name]["quantization"] = _convert(src, dst, precisions[name], options, calib_calls.get(name, []))
        _copy_side_files(checkpoint, out, policy.mode == "discrete")
    finally:
        if owns_stage:
            shutil.rmtree(stage, ignore_errors=True)

    final = _artifacts(out, artifacts, precisions)
    manifest = _write_manifest(out, checkpoint, policy, shapes, contract, final, None)
    observations = (calib_obs or calibration.synthetic_observations(cameras, policy.meta, options.parity_observations))[
        : options.parity_observations
    ]
    say(f"parity gate: {len(observations)} observation(s), seeds {list(options.seeds)}, onnxruntime CPU")
    # the gate checks the flow graph in the mode it was exported for, opt-in inference-time RTC included
    with PolicySession(out, "onnxruntime", providers=("CPUExecutionProvider",), thread_pool=EXPORT_POOL) as session:
        report = parity.run_parity(policy, session, graphs, observations, precisions, options.seeds)
    report["allowed_failure"] = bool(options.allow_parity_failure and not report["passed"])
    manifest["parity"] = report
    B.write_manifest(out, manifest)
    parity.enforce(report, options.allow_parity_failure, str(out))
    if options.target == "tensorrt":
        from molmoact2_edge.export import tensorrt_build

        say("building TensorRT engines")
        tensorrt_build.build_engines(out)
        manifest = B.Bundle.open(out).manifest
    say(f"bundle written to {out} in {time.perf_counter() - start:.1f} s")
    return manifest


def _check_reusable(
    path: Path, checkpoint: Path, shapes: GraphShapes, cameras: Sequence[str], graphs: list[str], rtc: str
) -> dict[str, dict[str, Any]]:
    """The fp32 bundle at ``path`` must come from this checkpoint with these shapes and flow mode; its export facts."""
    from molmoact2_edge.checkpoint import checkpoint_sha256

    bundle = B.Bundle.open(path)
    m = bundle.manifest
    problems = []
    if m["source"]["sha256"] != checkpoint_sha256(checkpoint):
        problems.append("it was exported from a different checkpoint")
    if any(a["precision"] != "fp32" for a in m["artifacts"].values()):
        problems.append("it is not an fp32 bundle")
    if m["prompt"]["bucket"] != shapes.bucket or bundle.camera_order != list(cameras):
        problems.append(f"bucket/cameras {m['prompt']['bucket']}/{bundle.camera_order} != {shapes.bucket}/{list(cameras)}")
    if sorted(bundle.graph_names) != sorted(graphs) or m["model"]["cache_length"] != shapes.cache_length:
        problems.append("its graphs or cache length differ")
    if m["model"].get("rtc", {}).get("mode") != rtc:
        problems.append(f"its flow graph's real-time chunking is {m['model'].get('rtc', {}).get('mode')}, not {rtc} (--rtc)")
    if problems:
        raise ExportError(f"--fp32-bundle {path}: cannot reuse: " + "; ".join(problems))
    return {g: {k: m["artifacts"][g][k] for k in ("exporter", "export_seconds")} for g in graphs}


def bundle_contract(
    checkpoint: Path, policy: Any, cameras: Sequence[str], image_size: Sequence[int], flags: ContractFlags
) -> RobotContract:
    """The robot contract of the bundle (``contract.export_contract``), decided before any graph is exported."""
    path = checkpoint / CONTRACT_FILE
    recorded = RobotContract.load(path) if path.is_file() else None
    names = tuple(policy.meta.action_stats.names)
    if not names and policy.action_dim == len(SO101_JOINTS) and flags.robot == "so101":
        names = SO101_JOINTS
    names = tuple(n.removesuffix(".pos") for n in names) or tuple(f"joint_{i}" for i in range(policy.action_dim))
    return export_contract(
        recorded,
        flags,
        tag=policy.tag or next(iter(policy.norm.tags)),
        executed_steps=int(policy.n_action_steps),
        cameras=tuple(cameras),
        image_size=(int(image_size[0]), int(image_size[1])),
        action=policy.meta.control_mode or "absolute joint pose",
        joint_names=names,
        where=str(checkpoint),
    )


def describe_provenance(contract: RobotContract) -> str:
    """One line saying where an unrecorded contract's values came from (export prints it)."""
    if contract.provenance == "flags":
        return "using the contract given by the flags"
    values = ", ".join(f"{k} from {src}" for k, src in contract.assumed.items())
    return (
        f"ASSUMED the release conventions of tag {contract.embodiment_tag!r}: joint frame {contract.joint_frame}, "
        f"{contract.control_hz:g} Hz ({values}); pass --control-hz / --joint-frame if your checkpoint differs"
    )


def graph_precisions(precision: str, graphs: Sequence[str]) -> dict[str, str]:
    """The precision each graph is stored in for a bundle precision (fp16 keeps the LLM graphs fp32)."""
    if precision == "fp16":
        return {g: ("fp32" if g in quantize.FP16_KEPT_FP32 else "fp16") for g in graphs}
    return dict.fromkeys(graphs, precision)


def longest_prompt(policy: Any, cameras: Sequence[str], tasks: Sequence[str] = ()) -> int:
    """Tokens of the longest prompt over ``tasks`` and a probe task (the bucket must hold it; export adds
    BUCKET_MARGIN and rounds up to BUCKET_MULTIPLE)."""
    state = _probe_state(policy)
    longest = 0
    for task in [*tasks, calibration.DEFAULT_TASK]:
        obs = Observation(images={}, state=state, task=task)
        saved, policy.prompts.bucket = policy.prompts.bucket, None
        try:
            longest = max(longest, policy.build_prompt(obs, len(cameras)).num_valid)
        finally:
            policy.prompts.bucket = saved
    return longest


def _probe_state(policy: Any) -> Any:
    import numpy as np

    return np.zeros(policy.meta.state_dim, dtype=np.float32)


def _cameras(options: ExportOptions, policy: Any, calib_obs: list[Observation]) -> tuple[str, ...]:
    if options.cameras:
        return tuple(options.cameras)
    if policy.camera_order:
        return tuple(policy.camera_order)
    if calib_obs:
        return tuple(sorted(calib_obs[0].images))
    raise ExportError(
        "the camera order is unknown: the norm-stats tag has no camera_keys; pass --cameras front,wrist "
        "(the observation's camera names, in the order the policy was trained with)"
    )


def _shapes(policy: Any, cameras: Sequence[str], bucket: int) -> GraphShapes:
    cfg = policy.config
    budget = 0
    if policy.depth:
        budget += 1 + cfg.num_depth_codes + max(8, policy.horizon)
    if policy.mode == "discrete":
        budget += 16 * policy.horizon
    # Think: <depth_start>, the codes and <depth_end> fit one decode_block call; its padding tokens are
    # written past the last real one, so the cache keeps k scratch slots the expert never reads.
    block = depth_block_length(cfg.num_depth_codes) if policy.depth else 0
    return GraphShapes(
        num_cameras=len(cameras),
        image_size=tuple(cfg.vit_config.image_default_input_size),
        bucket=bucket,
        cache_length=bucket + budget + block,
        context_length=bucket + budget if policy.depth else bucket,  # Think: the expert reads the depth tokens too
        chunk_length=policy.horizon,
        pooled_per_camera=cfg.tokens_per_image,
        block_length=block,
    )


def _prepare_out(out: Path) -> None:
    """An export replaces a previous bundle at ``out`` but never a directory that is not one."""
    if out.exists() and any(out.iterdir()):
        if not (out / B.MANIFEST).is_file():
            raise ExportError(f"{out} exists and is not a bundle; choose an empty or new directory")
        shutil.rmtree(out)


def _copy_side_files(checkpoint: Path, dest: Path, discrete: bool) -> None:
    from molmoact2_edge.checkpoint import load_config

    dest.mkdir(parents=True, exist_ok=True)
    names = [*SIDE_FILES, load_config(checkpoint).norm_stats_filename]
    for name in names:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, dest / name)
    if not (dest / "tokenizer.json").is_file():
        raise ExportError(f"{checkpoint}: no tokenizer.json; the runtime needs it to build prompts")
    if discrete:
        if not (checkpoint / FAST_DIR).is_dir():
            raise ExportError(f"{checkpoint}: discrete mode needs {FAST_DIR}/ (the OpenFAST tokenizer)")
        shutil.copytree(checkpoint / FAST_DIR, dest / FAST_DIR, dirs_exist_ok=True)


def _export_fp16_flow(policy: Any, shapes: GraphShapes, dst: Path, opset: int) -> dict[str, int]:
    """The flow graph with an fp16 expert and fp32 Euler accumulation (see ``quantize`` for why not the converter)."""
    import torch

    cfg = policy.config
    module = FlowGraph(
        policy.model.model.action_expert, cfg.flow_matching_num_steps, cfg.mask_action_dim_padding, torch.float16, policy.rtc
    )
    exported = export_module(module, shapes.example_inputs(cfg)[B.FLOW.name], dst, B.FLOW.inputs, B.FLOW.outputs, opset)
    return {"converted": sum(exported.op_counts.values()), "kept_fp32": 0}


def _convert(src: Path, dst: Path, precision: str, options: ExportOptions, calls: list[dict[str, Any]]) -> dict[str, Any]:
    if precision == "fp32":
        shutil.copy2(src, dst)
        if data_file(src).exists():
            shutil.copy2(data_file(src), data_file(dst))
        return {}
    if precision == "fp16":
        return quantize.to_fp16(src, dst)
    if options.quantizer == "modelopt":
        return quantize.quantize_modelopt(src, dst, precision, calls)
    if precision == "int8":
        return quantize.quantize_int8(src, dst, calls)
    return quantize.quantize_int4(src, dst)


def _record_calibration(stage: Path, observations: Sequence[Observation], per_graph: int) -> dict[str, list[dict[str, Any]]]:
    recorder = parity.FirstCalls(per_graph=per_graph)
    with PolicySession(
        stage, "onnxruntime", providers=("CPUExecutionProvider",), thread_pool=EXPORT_POOL, record_feeds=recorder
    ) as session:
        for i, obs in enumerate(observations):
            session.reset()
            session.act(obs, seed=i)
    return recorder.calls


def _artifacts(root: Path, extra: dict[str, dict[str, Any]], precisions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Manifest entries of the graphs written under ``root``."""
    import onnx

    out = {}
    for name in extra:
        path = root / f"{name}.onnx"
        inputs, outputs = io_specs(path)
        model = onnx.load(str(path), load_external_data=False)
        opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
        entry = {
            "file": path.name,
            "data_file": data_file(path).name if data_file(path).exists() else None,
            "precision": precisions[name],
            "opset": int(opset),
            "inputs": inputs,
            "outputs": outputs,
            **extra[name],
        }
        if name in quantize.FP16_KEPT_FP32 and precisions[name] == "fp32" and "fp16" in precisions.values():
            entry["note"] = "kept fp32: fp16 LLM prefill overflows (reference §8.6); TensorRT may build it in bf16"
        out[name] = entry
    return out


def _write_manifest(
    root: Path,
    checkpoint: Path,
    policy: Any,
    shapes: GraphShapes,
    contract: RobotContract,
    artifacts: dict[str, dict[str, Any]],
    report: dict[str, Any] | None,
) -> dict[str, Any]:
    from molmoact2_edge.checkpoint import checkpoint_sha256
    from molmoact2_edge.tokenizers.prompt import config_token_ids

    cfg = policy.config
    tag = policy.tag or next(iter(policy.norm.tags))
    model = {
        "chunk_length": shapes.chunk_length,
        "flow_steps": policy.num_steps,
        "action_dim": policy.action_dim,
        "max_action_dim": cfg.max_action_dim,
        "state_dim": policy.meta.state_dim,
        "action_mode": cfg.action_mode,
        "mode": policy.mode,
        "depth": bool(policy.depth),
        "num_depth_codes": cfg.num_depth_codes,
        "n_obs_steps": cfg.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "cache_length": shapes.cache_length,
        "context_length": shapes.context_length,
        "block_length": shapes.block_length,
        "norm_tag": tag,
        "norm_mode": policy.norm.norm_mode,
        # real-time chunking inside the flow graph (molmoact2_edge/rtc.py); the runtime reads the mode from here
        "rtc": {"mode": policy.rtc, "vjp": EXPORTABLE_VJP, "clip": GUIDANCE_CLIP, "max_delay": cfg.rtc_max_delay},
    }
    prompt = {
        "bucket": shapes.bucket,
        "tokenizer_file": "tokenizer.json",
        "norm_stats_file": cfg.norm_stats_filename,
        "fast_tokenizer_dir": FAST_DIR if policy.mode == "discrete" else None,
        "token_ids": config_token_ids(cfg),
        "spec": dataclasses.asdict(policy.spec),
        "image_layout": dataclasses.asdict(policy.prompts.layout),
    }
    manifest = B.build_manifest(
        root=root,
        source={"checkpoint": str(checkpoint.resolve()), "sha256": checkpoint_sha256(checkpoint)},
        toolchain=_toolchain(),
        model=model,
        prompt=prompt,
        cameras={"order": list(contract.camera_names), "image_size": list(shapes.image_size)},
        artifacts=artifacts,
        parity=report,
        exporter_version=__version__,
        robot_contract=contract.to_dict(),
    )
    B.write_manifest(root, manifest)
    return manifest


def _toolchain() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
