"""The bundle: a directory of fixed-shape graphs plus ``manifest.json``, and the one place for its names.

Export writes through this module and the device reads through it, so the
schema, the graph names and every tensor name exist exactly once. Torch-free
(the standard library only): it runs on a Jetson.

Layout of a bundle directory::

    manifest.json            this module's schema (SCHEMA_VERSION), built by ``build_manifest``,
                             with the robot contract (``molmoact2_edge.contract``) under ``robot_contract``
    vision.onnx(.data)       one ONNX graph per entry of GRAPHS (external data beside it)
    prefill.onnx(.data)
    decode_step.onnx(.data)  only when the model decodes tokens (depth codes or discrete actions)
    decode_block.onnx(.data) Think bundles: a block of depth tokens in one call (``runtimes.depth_decode``)
    expert_context.onnx(.data) Think bundles of checkpoints with the expert's depth gate
    flow.onnx(.data)
    config.json              the checkpoint's config, copied
    norm_stats.json          normalization statistics, copied
    tokenizer.json, ...      tokenizer files the prompt builder needs, copied
    engines/<key>/...        TensorRT engines, appended on the device (``add_engines``)

Every file except ``manifest.json`` is listed with its sha256 and byte count;
``Bundle.open`` refuses a missing, altered or extra file and an unknown schema
version, naming the file. Export fields are never edited after export; the
device builder only appends to the ``engines`` section.

Shape legend: b batch, n cameras, h w pixels, t prompt tokens (the bucket),
tc context tokens the expert attends to, tm decoder cache length, l layers,
kh KV heads, hd head dim, e expert width, v vocabulary, ah chunk length,
ad action dim (padded to the model's max action dim).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmoact2_edge.contract import RobotContract
from molmoact2_edge.errors import BundleError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the robot contract (contract.py) is part of the manifest
MANIFEST = "manifest.json"
ENGINES_DIR = "engines"
PRECISIONS = ("fp32", "fp16", "int8", "int4")


# --- graph and tensor names (the one place) ---------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """A graph's name and its input/output tensor names, in call order.

    decoding_only: outputs only a bundle that decodes tokens (Think, discrete) reads; a continuous bundle's
    graph leaves them out (prefill's full-vocabulary logits and decoder cache: on the 4B release the
    logits alone are 0.79 GB of weight reads per chunk that nothing would read).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    decoding_only: tuple[str, ...] = ()

    def outputs_for(self, decoding: bool) -> tuple[str, ...]:
        return self.outputs if decoding else tuple(o for o in self.outputs if o not in self.decoding_only)


VISION = GraphSpec(
    "vision",
    inputs=("images",),  # (b, n, h, w, 3) uint8, already resized to the bundle's image size
    outputs=("image_features",),  # (b, n * q, d) pooled features, q per camera, in camera order
)
PREFILL = GraphSpec(
    "prefill",
    inputs=(
        "input_ids",  # (b, t) int64, right-padded to the bucket
        "image_features",  # (b, n * q, d) from the vision graph
        "image_feature_index",  # (b, t) int64: row of image_features added at each position, n*q = none
        "attention_bias",  # (b, 1, t, t) float32 additive (0 allowed, large negative blocked)
        "last_index",  # (b,) int64 position of the last real prompt token (its logits are returned)
    ),
    outputs=(
        "logits",  # (b, v) next-token logits after the last real prompt token
        "context_k",  # (l, b, t, e) keys already projected into the expert's space
        "context_v",  # (l, b, t, e)
        "cache_k",  # (l, b, kh, tm, hd) decoder cache, prompt written at 0..t-1
        "cache_v",  # (l, b, kh, tm, hd)
    ),
    decoding_only=("logits", "cache_k", "cache_v"),
)
DECODE_STEP = GraphSpec(
    "decode_step",
    inputs=(
        "input_id",  # (b, 1) int64
        "position",  # (b,) int64: cache slot and rotary position of this token
        "cache_k",  # (l, b, kh, tm, hd)
        "cache_v",  # (l, b, kh, tm, hd)
        "cache_bias",  # (b, 1, 1, tm) float32 additive: which cache slots this token may attend to
    ),
    outputs=(
        "logits",  # (b, v)
        "cache_k_out",  # (l, b, kh, tm, hd) the cache with this token written (inputs are not mutated)
        "cache_v_out",
        "context_k",  # (l, b, 1, e) this token's keys projected for the expert
        "context_v",
    ),
)
DECODE_BLOCK = GraphSpec(
    "decode_block",
    inputs=(
        "input_ids",  # (b, k) int64: a block of k tokens; only the first n are real (the rest is padding)
        "positions",  # (b, k) int64: cache slot and rotary position of each token (consecutive)
        "cache_k",  # (l, b, kh, tm, hd)
        "cache_v",  # (l, b, kh, tm, hd)
        "block_bias",  # (b, 1, k, tm) float32 additive: the cache slots each token may attend to
        "last_index",  # (b,) int64: block index whose full logits are returned (the last real token)
    ),
    outputs=(
        "depth_argmax",  # (b, k) int64: argmax over the depth-code rows after each token (code index)
        "token_argmax",  # (b, k) int64: argmax over the whole vocabulary after tokens last_index-1 and last_index, -1 elsewhere
        "logits",  # (b, v) the logits after token last_index
        "cache_k_out",  # (l, b, kh, tm, hd) the cache with all k tokens written (inputs are not mutated)
        "cache_v_out",
        "context_k",  # (l, b, k, e) each token's keys projected for the expert
        "context_v",
    ),
)
EXPERT_CONTEXT = GraphSpec(
    "expert_context",
    inputs=(
        "cache_k",  # (l, b, kh, tm, hd) the decoder cache after the depth tokens
        "cache_v",
        "context_valid",  # (b, tc) bool: the expert's cross-attention mask (pools the gate's mean)
        "depth_mask",  # (b, tc) bool: depth-token positions (scaled by the gate)
    ),
    outputs=(
        "context_k",  # (l, b, tc, e) the whole expert context, the depth gate applied
        "context_v",
    ),
)
FLOW = GraphSpec(
    "flow",
    inputs=(
        "noise",  # (b, ah, ad) float32 standard normal, read-only
        "context_k",  # (l, b, tc, e)
        "context_v",  # (l, b, tc, e)
        "cross_bias",  # (b, 1, 1, tc) float32 additive over context positions
        "action_dim_mask",  # (b, 1, ad) float32: 1 for real action dims, 0 for padding
        "rtc_prefix",  # (b, ah, ad) float32 committed actions, normalized, zero-padded (molmoact2_edge/rtc.py)
        "rtc_weights",  # (b, ah) float32 per-step RTC weights; all zero = the plain flow
    ),
    outputs=("actions",),  # (b, ah, ad) normalized actions after all Euler steps
)
GRAPHS: dict[str, GraphSpec] = {
    g.name: g for g in (VISION, PREFILL, DECODE_STEP, DECODE_BLOCK, EXPERT_CONTEXT, FLOW)
}

# Large negative used in additive attention biases. Not finfo.min: fp16 graphs must not overflow it
# (vla-edge clamps to -30000 for the same reason); exp(-30000) underflows to exactly 0 in every dtype.
MASK_VALUE = -30000.0


# --- hashing ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed (bundles hold multi-GB weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def list_files(root: Path) -> list[str]:
    """Every regular file under root except the manifest, as sorted posix relative paths."""
    out = []
    for path in root.rglob("*"):
        if path.is_file() and path.name != MANIFEST:
            out.append(path.relative_to(root).as_posix())
    return sorted(out)


# --- the manifest ----------------------------------------------------------------------------


def build_manifest(
    *,
    root: Path,
    source: Mapping[str, Any],
    toolchain: Mapping[str, str],
    model: Mapping[str, Any],
    prompt: Mapping[str, Any],
    cameras: Mapping[str, Any],
    artifacts: Mapping[str, Mapping[str, Any]],
    parity: Mapping[str, Any] | None,
    exporter_version: str,
    robot_contract: Mapping[str, Any],
) -> dict[str, Any]:
    """The whole export-side manifest, built once from what export computed. Hashes every file in root.

    source: {'checkpoint': path, 'sha256': hash of the checkpoint's files}
    toolchain: package -> version used to export (torch, onnx, onnxruntime, ...)
    model: chunk_length, flow_steps, action_dim, max_action_dim, state_dim, action_mode, norm_tag, ...
    prompt: bucket, tokenizer files, template info (special token ids, setup/control text)
    cameras: {'order': [...], 'image_size': [h, w]}
    artifacts: graph name -> {file, data_file, precision, opset, inputs, outputs}
    robot_contract: ``RobotContract.to_dict()`` (robot kinds, joints and frame, rate, cameras, semantics)
    """
    required_model = ("chunk_length", "flow_steps", "action_dim", "max_action_dim", "state_dim")
    missing = [k for k in required_model if k not in model]
    if "bucket" not in prompt:
        missing.append("prompt.bucket")
    if not cameras.get("order"):
        missing.append("cameras.order")
    unknown = sorted(set(artifacts) - set(GRAPHS))
    if missing or unknown:
        raise BundleError(f"manifest for {root}: missing fields {missing}, unknown graphs {unknown}")
    for name, art in artifacts.items():
        spec = GRAPHS[name]
        got_in = tuple(t["name"] for t in art["inputs"])
        got_out = tuple(t["name"] for t in art["outputs"])
        if got_in != spec.inputs or got_out not in (spec.outputs, spec.outputs_for(decoding=False)):
            raise BundleError(
                f"graph '{name}' ({art['file']}): tensor names {got_in} -> {got_out} "
                f"differ from the bundle schema {spec.inputs} -> {spec.outputs}"
            )
    return {
        "schema_version": SCHEMA_VERSION,
        "exporter": exporter_version,
        "source": dict(source),
        "toolchain": dict(toolchain),
        "model": dict(model),
        "prompt": dict(prompt),
        "cameras": dict(cameras),
        "artifacts": {k: dict(v) for k, v in artifacts.items()},
        "parity": dict(parity) if parity is not None else None,
        "robot_contract": dict(robot_contract),
        "files": {rel: file_entry(root / rel) for rel in list_files(root)},
        "engines": {},
    }


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(root) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


@dataclass
class Bundle:
    """An opened, verified bundle directory."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> Bundle:
        """Read and check a bundle.

        verify: hash every file against the manifest (the default). With False only
            presence, sizes and the file set are checked (for tools that re-open a bundle they
            just verified).
        raises BundleError naming the file that is missing, altered or extra, or the schema version.
        """
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root}: not a bundle ({MANIFEST} is missing)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{manifest_path}: not valid JSON ({err})") from err
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if isinstance(version, int) and version < SCHEMA_VERSION:
            raise BundleError(
                f"{manifest_path}: schema_version {version} predates the robot contract (rate, joint frame, "
                f"cameras the policy was trained with; this runtime reads {SCHEMA_VERSION}) and cannot be run "
                "safely; re-export it: molmo-edge export CHECKPOINT -o BUNDLE"
            )
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{manifest_path}: schema_version {version!r} is not supported (this runtime reads "
                f"{SCHEMA_VERSION}); re-export the bundle with this molmoact2-edge version"
            )
        bundle = cls(root=root, manifest=manifest)
        bundle._check_files(verify)
        return bundle

    def _expected_files(self) -> dict[str, dict[str, Any]]:
        expected = dict(self.manifest.get("files", {}))
        for key, engine_set in self.manifest.get("engines", {}).items():
            for rel, entry in engine_set.get("files", {}).items():
                if rel in expected:
                    raise BundleError(f"{self.root / MANIFEST}: engine set '{key}' re-lists export file {rel}")
                expected[rel] = entry
        return expected

    def _check_files(self, verify_hashes: bool) -> None:
        expected = self._expected_files()
        present = set(list_files(self.root))
        for rel, entry in sorted(expected.items()):
            path = self.root / rel
            if rel not in present:
                raise BundleError(f"{path}: listed in {MANIFEST} but missing; the bundle is incomplete")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(f"{path}: {size} bytes, manifest says {entry['bytes']}; the file was altered")
            if verify_hashes and sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{path}: sha256 differs from {MANIFEST}; the file was altered")
        extra = sorted(present - set(expected))
        if extra:
            raise BundleError(
                f"{self.root / extra[0]}: not listed in {MANIFEST} (extra files: {extra}); "
                "a bundle holds exactly what export wrote"
            )

    # --- typed access to the manifest --------------------------------------------------------

    @property
    def graph_names(self) -> tuple[str, ...]:
        """The graphs in this bundle (the backends' ``GraphFiles`` protocol)."""
        return tuple(self.manifest["artifacts"])

    def engine_path(self, graph: str, key: str | None = None) -> Path | None:
        """The TensorRT engine of ``graph`` for engine set ``key`` (default: this device's), or None.

        The default key is read from this machine (GPU, compute capability, TensorRT, JetPack) only
        when TensorRT and cuda-python are importable; without them there is no engine to run.
        """
        if not self.engines:
            return None
        key = key or current_engine_key()
        engine_set = self.engines.get(key) if key else None
        if engine_set is None or graph not in engine_set.get("graphs", {}):
            return None
        return self.root / engine_set["graphs"][graph]

    def artifact(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["artifacts"][name]
        except KeyError as err:
            raise BundleError(f"{self.root}: bundle has no '{name}' graph (it has {list(self.graph_names)})") from err

    def graph_path(self, name: str) -> Path:
        return self.root / self.artifact(name)["file"]

    def input_specs(self, name: str) -> list[dict[str, Any]]:
        return list(self.artifact(name)["inputs"])

    def output_specs(self, name: str) -> list[dict[str, Any]]:
        return list(self.artifact(name)["outputs"])

    def file(self, rel: str) -> Path:
        """A copied side file (config.json, norm_stats.json, tokenizer files) by its bundle path."""
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.root}: bundle has no file {rel}")
        return self.root / rel

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def prompt(self) -> dict[str, Any]:
        return self.manifest["prompt"]

    @property
    def camera_order(self) -> list[str]:
        return list(self.manifest["cameras"]["order"])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.manifest["cameras"]["image_size"]
        return int(h), int(w)

    @property
    def contract(self) -> RobotContract:
        """The robot contract this bundle's policy was trained under (checked when read)."""
        return RobotContract.from_dict(self.manifest["robot_contract"], f"{self.root / MANIFEST} robot_contract")

    @property
    def engines(self) -> dict[str, Any]:
        return self.manifest.get("engines", {})

    # --- the one device-side mutation --------------------------------------------------------

    def add_engines(self, key: str, info: Mapping[str, Any], files: list[str]) -> None:
        """Append (or replace) the engine set ``key`` and rewrite the manifest; export fields are untouched.

        key: e.g. 'Orin_sm87_trt10.3_jp6.2' (see tensorrt_build.engine_key)
        files: bundle-relative paths of the engines, the timing cache, ... (hashed here)
        """
        export_files = self.manifest["files"]
        clash = [f for f in files if f in export_files]
        if clash:
            raise BundleError(f"{self.root}: engine files {clash} would overwrite export files")
        entry = dict(info)
        entry["files"] = {rel: file_entry(self.root / rel) for rel in sorted(files)}
        self.manifest.setdefault("engines", {})[key] = entry
        write_manifest(self.root, self.manifest)


# --- engine keys (device facts) ----------------------------------------------------------------


def engine_key(gpu_name: str, compute_capability: str, tensorrt_version: str, jetpack: str | None) -> str:
    """The name of an engine set: engines only run on the GPU, TensorRT and JetPack they were built with.

    >>> engine_key("Orin", "8.7", "10.3.0.30", "6.2")
    'Orin_sm87_trt10.3.0.30_jp6.2'
    """
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-")
    sm = "sm" + compute_capability.replace(".", "")
    return f"{gpu}_{sm}_trt{tensorrt_version}" + (f"_jp{jetpack}" if jetpack else "")


def jetpack_version(release_file: str = "/etc/nv_tegra_release") -> str | None:
    """JetPack's L4T release (e.g. 'R36.4.3') read from the Tegra release file; None off a Jetson."""
    try:
        head = Path(release_file).read_text().split(",")
    except OSError:
        return None
    # "# R36 (release), REVISION: 4.3, GCID: ..." -> R36.4.3
    major = head[0].replace("#", "").split("(")[0].strip()
    rev = next((p.split(":")[1].strip() for p in head if "REVISION" in p), "")
    return f"{major}.{rev}" if rev else major


def device_facts() -> dict[str, str] | None:
    """This machine's GPU name, compute capability, TensorRT and JetPack (L4T) versions, or None when
    TensorRT or cuda-python is missing or no GPU answers."""
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    try:
        err, props = cudart.cudaGetDeviceProperties(0)
    except Exception as err_:  # cuda-python raises (not returns) when the driver library is absent
        log.info("no engine key: CUDA is not usable here (%s)", err_)
        return None
    if int(err) != 0:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {
        "gpu": name,
        "compute_capability": f"{props.major}.{props.minor}",
        "tensorrt": str(trt.__version__),
        "jetpack": jetpack_version() or "",
    }


def current_engine_key() -> str | None:
    """This machine's engine key, or None when TensorRT or cuda-python (or a GPU) is missing."""
    facts = device_facts()
    if facts is None:
        return None
    return engine_key(facts["gpu"], facts["compute_capability"], facts["tensorrt"], facts["jetpack"] or None)
