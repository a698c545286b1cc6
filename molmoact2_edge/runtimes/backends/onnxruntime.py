"""onnxruntime backend: CPU, CUDA and TensorRT execution providers, with fixed-shape I/O binding.

Every graph gets one ``InferenceSession`` and one ``IOBinding`` whose input and
output ``OrtValue``s are allocated once, on the device the first provider runs
on, from the graph's static shapes. ``run`` copies each feed into its bound
buffer (``OrtValue.update_inplace``) and runs with the binding, so addresses
never change: that is what ORT's CUDA graphs require (``enable_cuda_graph`` on
the CUDA EP, ``trt_cuda_graph_enable`` on the TensorRT EP), and it also saves an
allocation per call on CPU. Graphs with a symbolic dimension are refused: a
bundle's graphs are fixed-shape by contract.

Kept outputs (``run_keeping``: the decoder cache) are written to one of two
buffers of their own and bound as the next graph's input where they lie, never
copied through the host per token. With CUDA graphs (fixed addresses) they go
through the host instead.

Provider choice (``providers=None``): TensorRT EP when it is present and a GPU
answers, else CUDA EP, else CPU. ORT itself drops an EP it cannot load with
only a warning; here a requested EP that did not make it into the session is a
``BackendUnavailableError`` (explicit ``providers``) or a logged reason (auto).

Threads: all sessions of a process share ONE intra-op pool
(``ort.set_global_thread_pool_sizes`` + ``use_per_session_threads = False``): a bundle's
graphs run one after another, and per-session pools (one per graph, each sized to every
core) fight on a small CPU (2 threads were slower than 1). The global pool is created once
per process with the first thread count asked for; a session asking for another count gets
the pool of the first (logged): onnxruntime refuses per-session pools once the global pool
exists, in this process for good, so code that builds its own sessions afterwards (the
int8 calibrator) must run before it or in a process with ``thread_pool="per-session"``
(``MOLMO_EDGE_ORT_THREAD_POOL=per-session`` sets that default; the export pipeline's
sessions ask for per-session pools). Spinning is off by default (``spinning=False``): idle pool threads
sleep instead of busy-waiting (per-session pools: ``session.intra_op.allow_spinning=0``; the
shared pool: ``session.force_spinning_stop=1``, which stops its spinning as each run ends;
onnxruntime's Python API cannot turn off the shared pool's spinning inside a run).

On the CPU provider each graph is first rewritten for the CPU (``ort_cpu.prepare``: RMSNorm
fusion, int8 QDQ -> dynamic u8s8 GEMMs), cached per device; ``cpu_rewrites=False`` loads
the bundle's files as they are. The flow graph also gets a second session, its rewrite with
the RTC inputs fixed to zero (``ZERO_VARIANTS``), run whenever those feeds are all zero (no
prefix committed): the time embedding and adaLN modulations are then constants, folded once.
Same bound buffers and outputs; ``zero_variants=False`` turns it off.

Facts (option names, CUDA-graph constraints): ``reference/toolchain.md`` §3.1.
Only the CPU EP was run here (no GPU on the dev machine).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from molmoact2_edge.errors import BackendError, BackendUnavailableError
from molmoact2_edge.runtimes.backends import ort_cpu
from molmoact2_edge.runtimes.backends.base import (
    BackendSession,
    Feed,
    GraphFiles,
    Resident,
    Slot,
    TensorSpec,
    check_graphs,
)
from molmoact2_edge.runtimes.backends.denormals import flush_denormals

log = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"

# ONNX tensor type strings -> numpy dtypes (the ones a bundle uses).
_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """How to build the ORT sessions. Every field has a default that suits the machine it runs on."""

    providers: tuple[str, ...] | None = None  # None: best of TensorRT > CUDA > CPU that this machine has
    intra_op_threads: int = 0  # 0: ORT's default (one per physical core)
    inter_op_threads: int = 1  # graphs are sequential chains; parallel branches gain nothing at batch 1
    optimization: str = "all"  # disable | basic | extended | all
    device_id: int = 0
    cuda_graph: bool = True  # capture a CUDA graph per session on GPU EPs (needs I/O binding: we always bind)
    fp16: bool = False  # TensorRT EP: allow fp16 kernels (QDQ int8 graphs need no calibration table)
    cache_dir: str | None = None  # TensorRT EP engine + timing caches; None: see default_cache_dir()
    graphs: tuple[str, ...] | None = None  # load only these graphs (None: all the bundle has)
    thread_pool: str = field(default_factory=lambda: os.environ.get(THREAD_POOL_ENV, "shared"))  # or per-session
    spinning: bool = False  # let idle pool threads busy-wait (lower latency alone, worse when sharing cores)
    flush_denormals: bool = True  # CPU: denormals count as zero while graphs run (masked softmax underflows)
    cpu_rewrites: bool = True  # CPU provider: fused RMSNorm, dynamic int8 GEMMs (ort_cpu.py), cached per device
    zero_variants: bool = True  # CPU rewrites: also load ZERO_VARIANTS, run when their inputs are fed all zeros


# graph -> inputs that are all zero in the common case; the CPU provider loads a variant with them constant.
# flow: the RTC prefix and its weights are zero unless a prefix is committed (RTC on, after the first chunk).
ZERO_VARIANTS = {"flow": ("rtc_prefix", "rtc_weights")}

THREAD_POOL_ENV = "MOLMO_EDGE_ORT_THREAD_POOL"  # default thread_pool for processes that must not share
_shared_pool_threads: int | None = None  # intra-op size of this process's global pool, once created


def _join_shared_pool(threads: int) -> bool:
    """Create the process-wide pool with ``threads`` on first use; True when it has that size."""
    global _shared_pool_threads
    if _shared_pool_threads is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared_pool_threads = threads
    elif _shared_pool_threads != threads:
        # onnxruntime refuses per-session pools once the global one exists: the size is the process's
        log.warning(
            "onnxruntime: this process's shared pool has %s intra-op threads; %s asked (the first size wins)",
            _shared_pool_threads or "default", threads or "default",
        )
    return True


def gpu_providers_present() -> list[str]:
    """The GPU execution providers this onnxruntime build ships (not proof that a GPU answers)."""
    return [p for p in (TENSORRT, CUDA) if p in ort.get_available_providers()]


def default_cache_dir(bundle_dir: Path) -> Path:
    """Per-bundle TensorRT EP cache under $XDG_CACHE_HOME, never inside the bundle.

    A bundle is a verified, closed set of files: a cache written into it would make the next
    ``Bundle.open`` refuse it for an extra file.
    """
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "molmo-edge" / "ort_trt"
    key = hashlib.sha256(str(bundle_dir.resolve()).encode()).hexdigest()[:16]
    return root / f"{bundle_dir.name}-{key}"


def _provider_options(provider: str, options: OnnxRuntimeOptions, cache_dir: Path) -> dict[str, str]:
    if provider == CUDA:
        return {
            "device_id": str(options.device_id),
            "enable_cuda_graph": "1" if options.cuda_graph else "0",
            "do_copy_in_default_stream": "1",
        }
    if provider == TENSORRT:
        return {
            "device_id": str(options.device_id),
            "trt_fp16_enable": "True" if options.fp16 else "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache_dir),
            "trt_cuda_graph_enable": "True" if options.cuda_graph else "False",
        }
    return {}


class OnnxRuntimeSession(BackendSession):
    """The bundle's graphs as ORT sessions with preallocated, bound, fixed-shape buffers."""

    name = "onnxruntime"
    Options: ClassVar[type] = OnnxRuntimeOptions

    def __init__(self, bundle: GraphFiles, options: OnnxRuntimeOptions | None = None) -> None:
        super().__init__(bundle, options)
        self.options = options or OnnxRuntimeOptions()
        requested = (
            list(self.options.providers) if self.options.providers else [*gpu_providers_present(), CPU]
        )
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._bindings: dict[str, ort.IOBinding] = {}
        self._inputs: dict[str, dict[str, ort.OrtValue]] = {}
        self._outputs: dict[str, dict[str, ort.OrtValue]] = {}
        self._slots: dict[tuple[str, str], list[Slot]] = {}  # kept outputs: (graph, output) -> its two buffers
        self._owned: set[Slot] = set()  # every slot of ``_slots``: residents of this session bind in place
        self._specs: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}
        self._zero_variants: dict[str, tuple[str, tuple[str, ...]]] = {}  # graph -> (variant key, zero inputs)
        self.providers: list[str] = []
        self.pools: dict[str, str] = {}
        for graph in check_graphs(bundle, self.options.graphs):
            path = bundle.graph_path(graph)
            if not path.is_file():
                raise BackendError(f"graph '{graph}': {path} is missing")
            cache_dir = Path(self.options.cache_dir) if self.options.cache_dir else default_cache_dir(path.parent)
            session = self._make_session(graph, path, requested, cache_dir)
            self._sessions[graph] = session
            self._bind(graph, session)
            zero = self._zero_inputs(graph, session, requested)
            if zero:
                key = f"{graph}[{','.join(zero)}=0]"
                self._sessions[key] = self._make_session(graph, path, requested, cache_dir, zero)
                self._bind(key, self._sessions[key])
                self._zero_variants[graph] = (key, zero)
        self.reason = f"onnxruntime {ort.__version__} on {self.providers}"

    def _zero_inputs(self, graph: str, session: ort.InferenceSession, requested: list[str]) -> tuple[str, ...]:
        """The inputs of ``graph`` to fix to zero in a variant session (none: no variant)."""
        if not (self.options.zero_variants and self.options.cpu_rewrites and requested == [CPU]):
            return ()
        names = {node.name for node in session.get_inputs()}
        wanted = ZERO_VARIANTS.get(graph, ())
        return wanted if all(name in names for name in wanted) else ()

    def _make_session(
        self, graph: str, path: Path, requested: list[str], cache_dir: Path, zero_inputs: tuple[str, ...] = ()
    ) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: fp16 graphs otherwise flood stderr with constant-folding notes
        if self.options.thread_pool not in ("shared", "per-session"):
            raise BackendError(f"thread_pool '{self.options.thread_pool}': choose shared or per-session")
        if self.options.thread_pool == "per-session" and _shared_pool_threads is not None:
            raise BackendError(
                "thread_pool='per-session': this process already created onnxruntime's shared thread pool, and "
                "onnxruntime then refuses per-session pools; use the default thread_pool='shared'"
            )
        shared = self.options.thread_pool == "shared" and _join_shared_pool(self.options.intra_op_threads)
        if shared:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = self.options.intra_op_threads
            so.inter_op_num_threads = self.options.inter_op_threads
        if not self.options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
            so.add_session_config_entry("session.force_spinning_stop", "1")
        if self.options.flush_denormals:  # pool threads; the caller's thread is set around each run
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.pools[graph] = "shared" if shared else "per-session"
        if self.options.optimization not in _OPT_LEVELS:
            raise BackendError(
                f"optimization '{self.options.optimization}': choose one of {sorted(_OPT_LEVELS)}"
            )
        so.graph_optimization_level = _OPT_LEVELS[self.options.optimization]
        if TENSORRT in requested:
            cache_dir.mkdir(parents=True, exist_ok=True)
        providers = [(p, _provider_options(p, self.options, cache_dir)) for p in requested]
        if requested == [CPU] and self.options.cpu_rewrites:
            path = ort_cpu.prepare(path, shared_pool=_shared_pool_threads is not None, zero_inputs=zero_inputs)
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types with no common base
            raise BackendError(f"graph '{graph}': onnxruntime could not load {path}: {err}") from err
        got = session.get_providers()
        dropped = [p for p in requested if p not in got]
        if dropped and self.options.providers:
            raise BackendUnavailableError(
                f"graph '{graph}': execution provider(s) {dropped} failed to load (no GPU, or CUDA/TensorRT "
                f"libraries missing); session got {got}. Check `molmo-edge doctor`."
            )
        if dropped:
            log.warning(
                "graph %s: %s did not load (no GPU or libraries missing); running on %s", graph, dropped, got
            )
        if not self.providers:
            self.providers = got
        return session

    def _device(self, graph: str) -> tuple[str, int]:
        """Where the bound buffers live: on the GPU when the first provider is a GPU EP."""
        first = self._sessions[graph].get_providers()[0]
        return ("cuda", self.options.device_id) if first in (CUDA, TENSORRT) else ("cpu", 0)

    def _bind(self, graph: str, session: ort.InferenceSession) -> None:
        inputs = [self._spec(graph, node) for node in session.get_inputs()]
        outputs = [self._spec(graph, node) for node in session.get_outputs()]
        device, device_id = self._device(graph)
        binding = session.io_binding()
        values: dict[str, ort.OrtValue] = {}
        for spec in inputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(spec.shape, spec.dtype, device, device_id)
            binding.bind_ortvalue_input(spec.name, value)
            values[spec.name] = value
        results: dict[str, ort.OrtValue] = {}
        for spec in outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(spec.shape, spec.dtype, device, device_id)
            binding.bind_ortvalue_output(spec.name, value)
            results[spec.name] = value
        self._bindings[graph], self._inputs[graph], self._outputs[graph] = binding, values, results
        self._specs[graph] = (inputs, outputs)

    @staticmethod
    def _spec(graph: str, node: Any) -> TensorSpec:
        if node.type not in _ONNX_DTYPES:
            raise BackendError(f"graph '{graph}' tensor '{node.name}': unsupported type {node.type}")
        if not all(isinstance(d, int) and d > 0 for d in node.shape):
            raise BackendError(
                f"graph '{graph}' tensor '{node.name}' has a dynamic shape {node.shape}; bundle graphs must be "
                "fixed-shape (re-export the bundle)"
            )
        return TensorSpec(node.name, tuple(node.shape), np.dtype(_ONNX_DTYPES[node.type]))

    def specs(self, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        if graph not in self._specs:
            raise BackendError(f"graph '{graph}' is not loaded; loaded: {sorted(self._specs)}")
        return self._specs[graph]

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run_keeping(graph, feeds, frozenset())[0]

    def _run_keeping(
        self, graph: str, feeds: Mapping[str, Feed], keep: frozenset[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, Resident]]:
        """Bind every input and output for this call: a resident of this session is bound where it lies, a host
        array is copied into the graph's own input buffer; a kept output goes to the slot of its pair that this
        call does not read. CUDA graphs replay fixed addresses, so with them kept outputs go through the host."""
        on_cpu = self._device(graph)[0] == "cpu"
        if keep and not on_cpu and self.options.cuda_graph:
            return super()._run_keeping(graph, feeds, keep)
        graph = self._variant(graph, feeds)
        binding = self._bindings[graph]
        read: set[Slot] = set()
        for name, buffer in self._inputs[graph].items():
            feed = feeds[name]
            if isinstance(feed, Resident) and feed.slot in self._owned:
                binding.bind_ortvalue_input(name, feed.value)
                read.add(feed.slot)
                continue
            buffer.update_inplace(np.ascontiguousarray(feed.numpy() if isinstance(feed, Resident) else feed))
            binding.bind_ortvalue_input(name, buffer)
        kept: dict[str, Resident] = {}
        for spec in self._specs[graph][1]:
            if spec.name in keep:
                slot = self._free_slot(graph, spec, read)
                slot.version += 1
                kept[spec.name] = Resident(spec, slot.value, slot, slot.version)
                binding.bind_ortvalue_output(spec.name, slot.value)
            else:
                binding.bind_ortvalue_output(spec.name, self._outputs[graph][spec.name])
        try:
            with flush_denormals() if self.options.flush_denormals and on_cpu else nullcontext():
                self._sessions[graph].run_with_iobinding(binding)
        except Exception as err:  # ORT's runtime failures have no common base class
            raise BackendError(f"graph '{graph}': onnxruntime run failed: {err}") from err
        # OrtValue.numpy() is a view of the bound buffer: copy, so callers may keep arrays across runs
        arrays = {
            name: np.array(value.numpy()) for name, value in self._outputs[graph].items() if name not in keep
        }
        return arrays, kept

    def _variant(self, graph: str, feeds: Mapping[str, Feed]) -> str:
        """The session to run: the graph's zero-input variant when every one of those feeds is all zero."""
        key, zero = self._zero_variants.get(graph, ("", ()))
        values = [feeds[name] for name in zero]
        if values and all(isinstance(value, np.ndarray) and not value.any() for value in values):
            return key
        return graph

    def _free_slot(self, graph: str, spec: TensorSpec, read: set[Slot]) -> Slot:
        """Of the output's two slots, the one this call does not read, least recently written first."""
        pair = self._slots.get((graph, spec.name))
        if pair is None:
            device, device_id = self._device(graph)
            pair = [
                Slot(ort.OrtValue.ortvalue_from_shape_and_type(spec.shape, spec.dtype, device, device_id))
                for _ in range(2)
            ]
            self._slots[(graph, spec.name)] = pair
            self._owned.update(pair)
        return min((slot for slot in pair if slot not in read), key=lambda slot: slot.version)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "onnxruntime": ort.__version__,
            "providers": self.providers,
            "cuda_graph": self.options.cuda_graph and self.providers[:1] != [CPU],
            "threads": self.options.intra_op_threads or os.cpu_count(),
            "thread_pool": sorted(set(self.pools.values())),
            "spinning": self.options.spinning,
            "cpu_rewrites": self.options.cpu_rewrites and self.providers == [CPU],
            "flush_denormals": self.options.flush_denormals and self.providers == [CPU],
            "zero_variants": sorted(key for key, _ in self._zero_variants.values()),
        }

    def close(self) -> None:
        self._bindings.clear()
        self._inputs.clear()
        self._outputs.clear()
        self._slots.clear()
        self._owned.clear()
        self._sessions.clear()
        super().close()
