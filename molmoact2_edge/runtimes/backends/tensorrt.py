"""Native TensorRT 10 backend: the bundle's engines, fixed buffers, one CUDA graph per graph, via cuda-python.

Per graph (``vision``, ``prefill``, ``decode_step``, ``flow``) at load:

1. deserialize the engine built for this device (``Bundle.engine_path``; engines are
   keyed by GPU, TensorRT and JetPack and never portable), create one execution context;
2. read every I/O tensor from the engine (name-based API: ``num_io_tensors``,
   ``get_tensor_name/mode/shape/dtype``), refuse dynamic dims, allocate one pinned
   host buffer and one device buffer per tensor, ``set_tensor_address`` once;
3. run ``execute_async_v3`` once and synchronize (flushes deferred setup), then capture
   host->device copies, ``execute_async_v3`` and device->host copies on a non-default
   stream into a CUDA graph and instantiate it.

``run`` copies the feeds into the pinned input buffers, launches the graph,
synchronizes and returns copies of the pinned outputs: addresses never change,
which is what the capture requires. ``cuda_graph=False`` launches the same
sequence without the graph (for engines that cannot be captured: host-syncing
plugins, data-dependent shapes).

Written against the TensorRT 10 Python API and ``cuda.bindings.runtime``
(``reference/toolchain.md`` §3.2). NOT RUN HERE: the dev machine has no GPU and
TensorRT cannot be installed without one; only the unavailable path is tested.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from molmoact2_edge.errors import BackendError
from molmoact2_edge.runtimes.backends.base import BackendSession, GraphFiles, TensorSpec, check_graphs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorRTOptions:
    cuda_graph: bool = True  # capture copies + execute_async_v3 into one CUDA graph per engine
    device_id: int = 0
    graphs: tuple[str, ...] | None = None  # load only these graphs (None: all the bundle has)


def _cuda() -> Any:
    from cuda.bindings import runtime as cudart

    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (error, *values); raise BackendError on an error, else return the value(s)."""
    cudart = _cuda()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise BackendError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_count() -> tuple[int, str | None]:
    """(number of CUDA devices, why none) without raising: cuda-python raises when the driver is absent."""
    try:
        cudart = _cuda()
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # DynamicLibNotFoundError and friends: no driver library at all
        return 0, f"CUDA driver not usable ({exc})"
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return 0, f"no CUDA device ({err})"
    return int(count), None


class _Engine:
    """One engine with its context, fixed buffers, stream and (optionally) captured graph."""

    def __init__(self, graph: str, plan: bytes, runtime: Any, use_graph: bool) -> None:
        import tensorrt as trt

        cudart = _cuda()
        self.graph = graph
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(
                f"graph '{graph}': TensorRT could not deserialize its engine (built for another GPU, TensorRT or "
                "JetPack version?); rebuild them here with `molmo-edge build-engines BUNDLE`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = _check(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate"
        )
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        self._host_ptrs: list[int] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"graph '{graph}' tensor '{name}' has a dynamic shape {shape}; engines must be fixed"
                )
            spec = TensorSpec(name, shape, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)
            nbytes = max(1, int(np.prod(shape)) * spec.dtype.itemsize)
            host_ptr = _check(cudart.cudaMallocHost(nbytes), "cudaMallocHost")  # pinned: async copies
            self._host_ptrs.append(host_ptr)
            raw = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(host_ptr))  # a view, no copy
            self.host[name] = raw.view(spec.dtype)[: int(np.prod(shape))].reshape(shape)
            self.device[name] = _check(cudart.cudaMalloc(nbytes), "cudaMalloc")
            if not self.context.set_tensor_address(name, self.device[name]):
                raise BackendError(f"graph '{graph}': set_tensor_address('{name}') was refused")
        self._enqueue()  # first run flushes deferred setup before any capture
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.graph_exec = self._capture() if use_graph else None

    def _enqueue(self) -> None:
        cudart = _cuda()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            host = self.host[spec.name]
            _check(
                cudart.cudaMemcpyAsync(
                    self.device[spec.name], host.ctypes.data, host.nbytes, h2d, self.stream
                ),
                "H2D",
            )
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"graph '{self.graph}': execute_async_v3 failed (see the TensorRT log)")
        for spec in self.outputs:
            host = self.host[spec.name]
            _check(
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self.device[spec.name], host.nbytes, d2h, self.stream
                ),
                "D2H",
            )

    def _capture(self) -> Any:
        cudart = _cuda()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            self._enqueue()
        finally:
            graph = _check(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        graph_exec = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        _check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
        log.info(
            "graph %s: CUDA graph captured (%d inputs, %d outputs)",
            self.graph,
            len(self.inputs),
            len(self.outputs),
        )
        return graph_exec

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = _cuda()
        for spec in self.inputs:
            np.copyto(self.host[spec.name], feeds[spec.name])
        if self.graph_exec is not None:
            _check(cudart.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
        else:
            self._enqueue()
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {spec.name: self.host[spec.name].copy() for spec in self.outputs}

    def close(self) -> None:
        cudart = _cuda()
        if self.graph_exec is not None:
            cudart.cudaGraphExecDestroy(self.graph_exec)
        for ptr in self.device.values():
            cudart.cudaFree(ptr)
        for ptr in self._host_ptrs:
            cudart.cudaFreeHost(ptr)
        cudart.cudaStreamDestroy(self.stream)
        self.device.clear()
        self._host_ptrs.clear()


class TensorRTSession(BackendSession):
    """The bundle's TensorRT engines for this device, each behind fixed buffers and a CUDA graph."""

    name = "tensorrt"
    Options: ClassVar[type] = TensorRTOptions

    @classmethod
    def probe(cls, bundle: GraphFiles | None = None) -> str | None:
        count, why = gpu_count()
        if count == 0:
            return why
        if bundle is not None:
            missing = [g for g in bundle.graph_names if bundle.engine_path(g) is None]
            if missing:
                return (
                    f"the bundle has no TensorRT engines for this device for {missing}; build them here with "
                    "`molmo-edge build-engines BUNDLE` (engines are not portable between devices)"
                )
        return None

    def __init__(self, bundle: GraphFiles, options: TensorRTOptions | None = None) -> None:
        import tensorrt as trt

        super().__init__(bundle, options)
        self.options = options or TensorRTOptions()
        _check(_cuda().cudaSetDevice(self.options.device_id), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}
        try:
            for graph in check_graphs(bundle, self.options.graphs):
                path = bundle.engine_path(graph)
                if path is None or not path.is_file():
                    raise BackendError(f"graph '{graph}': no TensorRT engine for this device ({path})")
                self._engines[graph] = _Engine(
                    graph, path.read_bytes(), self._runtime, self.options.cuda_graph
                )
        except BaseException:
            self.close()
            raise
        self.reason = f"TensorRT {trt.__version__}, CUDA graphs {'on' if self.options.cuda_graph else 'off'}"

    def specs(self, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        if graph not in self._engines:
            raise BackendError(f"graph '{graph}' is not loaded; loaded: {sorted(self._engines)}")
        engine = self._engines[graph]
        return engine.inputs, engine.outputs

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._engines[graph].run(feeds)

    def describe(self) -> dict[str, Any]:
        import tensorrt as trt

        return {**super().describe(), "tensorrt": trt.__version__, "cuda_graph": self.options.cuda_graph}

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        super().close()
