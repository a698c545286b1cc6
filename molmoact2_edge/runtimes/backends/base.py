"""One inference API over three engines: the ``BackendSession`` contract, the lazy registry and ``load_backend``.

A backend runs the bundle's fixed-shape graphs (``vision``, ``prefill``,
``decode_step``, ``flow``) by name: ``session.run(graph, feeds) -> outputs``,
numpy in and numpy out. Buffers are allocated once per graph at load (I/O
binding), which is what lets the GPU backends capture CUDA graphs.

State that only flows from graph to graph (the decoder's KV cache: prefill -> decode_step /
decode_block -> ...) need not visit the host at all: ``run_keeping(graph, feeds, keep)``
returns the outputs named in ``keep`` as ``Resident`` handles, and a later ``run`` binds a
handle fed back to it where it lies. The onnxruntime backend does that with its I/O binding
(a pair of buffers per kept output, taking turns); the others copy, with the same results.

Backends are a table of name -> (module, class), imported only when chosen, as
python-can does for its interfaces: a missing vendor library costs nothing
until it is asked for, and then it is a ``BackendUnavailableError`` carrying the
install command. Nothing falls back silently: ``auto`` picks the fastest backend
this machine can run and says which and why (``session.reason``, and a log line).

Device side: this module imports numpy only.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import importlib.util
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from molmoact2_edge.errors import BackendError, BackendUnavailableError

log = logging.getLogger(__name__)

GRAPH_NAMES = ("vision", "prefill", "decode_step", "decode_block", "expert_context", "flow")


@runtime_checkable
class GraphFiles(Protocol):
    """What a backend needs from a bundle: where each graph's files are.

    ``runtimes.bundle.Bundle`` satisfies this; so does ``OnnxGraphs`` for loose ONNX files.
    """

    @property
    def graph_names(self) -> tuple[str, ...]: ...

    def graph_path(self, graph: str) -> Path:
        """The ONNX file of ``graph`` (its ``.onnx.data`` sits next to it)."""
        ...

    def engine_path(self, graph: str) -> Path | None:
        """The TensorRT engine of ``graph`` built for this device, or None when there is none."""
        ...


@dataclass(frozen=True)
class OnnxGraphs:
    """Loose ONNX files as a ``GraphFiles``: graph name -> path (tests, or graphs outside a bundle)."""

    paths: Mapping[str, Path]
    engines: Mapping[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def graph_path(self, graph: str) -> Path:
        if graph not in self.paths:
            raise BackendError(f"no graph named '{graph}'; have {sorted(self.paths)}")
        return Path(self.paths[graph])

    def engine_path(self, graph: str) -> Path | None:
        path = self.engines.get(graph)
        return Path(path) if path is not None else None


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, fixed shape, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def check(self, graph: str, value: np.ndarray | Resident) -> None:
        """Raise BackendError naming the graph and tensor when ``value`` does not fit this spec."""
        if value.shape != self.shape or value.dtype != self.dtype:
            raise BackendError(
                f"graph '{graph}' input '{self.name}': expected shape {self.shape} dtype {self.dtype}, "
                f"got shape {tuple(value.shape)} dtype {value.dtype}"
            )


class Slot:
    """A backend-owned buffer that kept outputs are written to; ``version`` counts the writes."""

    def __init__(self, value: Any) -> None:
        self.value, self.version = value, 0


@dataclass(frozen=True, eq=False)
class Resident:
    """A graph output left where the backend computed it (``run_keeping``), to be fed to a later run.

    Valid until the backend writes its slot again (the graph's run after next); feeding a stale
    handle is a BackendError, never silently different data. ``numpy()`` copies it to the host.
    """

    spec: TensorSpec
    value: Any  # np.ndarray for backends that copy, else the backend's own buffer (an OrtValue)
    slot: Slot | None = None
    version: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def dtype(self) -> np.dtype:
        return self.spec.dtype

    @property
    def stale(self) -> bool:
        return self.slot is not None and self.slot.version != self.version

    def numpy(self) -> np.ndarray:
        if self.stale:
            raise BackendError(f"'{self.spec.name}' was overwritten by a later run; it can no longer be read")
        return np.array(self.value if isinstance(self.value, np.ndarray) else self.value.numpy())


Feed = np.ndarray | Resident


class BackendSession(abc.ABC):
    """A loaded bundle on one backend. Not thread-safe: one ``run`` at a time (CUDA graphs need that).

    Subclasses implement ``_run`` and ``specs``; ``run`` owns the checks shared by all backends.
    """

    name: ClassVar[str]
    #: the class's options, as a frozen dataclass; ``load_backend`` rejects unknown keys with a suggestion.
    Options: ClassVar[type]

    def __init__(self, bundle: GraphFiles, options: Any) -> None:
        self.reason = f"backend '{self.name}' was requested explicitly"
        self._closed = False

    @classmethod
    def probe(cls, bundle: GraphFiles | None = None) -> str | None:
        """Why this backend cannot run here (or on ``bundle``), or None when it can. Libraries are importable."""
        return None

    @abc.abstractmethod
    def specs(self, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The fixed (inputs, outputs) of ``graph``."""

    @abc.abstractmethod
    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on checked feeds; return fresh numpy arrays (the caller may keep them)."""

    def describe(self) -> dict[str, Any]:
        """What runs where, for logs, telemetry and ``molmo-edge doctor``."""
        return {"backend": self.name, "reason": self.reason}

    def run(self, graph: str, feeds: Mapping[str, Feed]) -> dict[str, np.ndarray]:
        """Run ``graph`` on ``feeds`` (every input, exact shape and dtype) and return every output.

        Raises BackendError naming the graph and tensor on a missing, extra, mis-shaped or stale feed.
        """
        return self.run_keeping(graph, feeds, ())[0]

    def run_keeping(
        self, graph: str, feeds: Mapping[str, Feed], keep: Collection[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, Resident]]:
        """``run``, with the outputs named in ``keep`` returned as ``Resident`` handles instead of host arrays."""
        if self._closed:
            raise BackendError(f"{self.name} session is closed; load the bundle again")
        inputs, outputs = self.specs(graph)
        names = {spec.name for spec in inputs}
        missing, extra = sorted(names - set(feeds)), sorted(set(feeds) - names)
        if missing or extra:
            raise BackendError(
                f"graph '{graph}': missing input(s) {missing}, unexpected input(s) {extra}; expects {sorted(names)}"
            )
        unknown = sorted(set(keep) - {spec.name for spec in outputs})
        if unknown:
            raise BackendError(f"graph '{graph}' has no output(s) {unknown} to keep")
        for spec in inputs:
            feed = feeds[spec.name]
            if isinstance(feed, Resident) and feed.stale:
                raise BackendError(
                    f"graph '{graph}' input '{spec.name}': the resident '{feed.spec.name}' fed to it was "
                    "overwritten by a later run (keep only the newest handle of a kept output)"
                )
            spec.check(graph, feed if isinstance(feed, Resident) else np.asarray(feed))
        return self._run_keeping(graph, feeds, frozenset(keep))

    def _run_keeping(
        self, graph: str, feeds: Mapping[str, Feed], keep: frozenset[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, Resident]]:
        """Backends without resident buffers: residents go through the host, kept outputs are host arrays."""
        host = {name: feed.numpy() if isinstance(feed, Resident) else feed for name, feed in feeds.items()}
        arrays = self._run(graph, host)
        _, outputs = self.specs(graph)
        kept = {spec.name: Resident(spec, arrays.pop(spec.name)) for spec in outputs if spec.name in keep}
        return arrays, kept

    def close(self) -> None:
        """Release buffers and sessions. Safe to call twice."""
        self._closed = True

    def __enter__(self) -> BackendSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and what it needs installed."""

    module: str
    cls: str
    requires: tuple[str, ...]  # importable module names
    install: str  # the command that provides them


# name -> where the class is and what it needs, in the order ``auto`` prefers (torch is the reference, never auto).
BACKENDS: dict[str, BackendEntry] = {
    "tensorrt": BackendEntry(
        "molmoact2_edge.runtimes.backends.tensorrt",
        "TensorRTSession",
        ("tensorrt", "cuda.bindings"),
        "pip install 'molmoact2-edge[tensorrt]' (on a Jetson: use JetPack's python3-libnvinfer and "
        "pip install 'cuda-python<13')",
    ),
    "onnxruntime": BackendEntry(
        "molmoact2_edge.runtimes.backends.onnxruntime",
        "OnnxRuntimeSession",
        ("onnxruntime",),
        "pip install onnxruntime (GPU: pip install onnxruntime-gpu; Jetson: the jp6/cu126 wheel from "
        "pypi.jetson-ai-lab.dev)",
    ),
    "torch": BackendEntry(
        "molmoact2_edge.runtimes.backends.torch",
        "TorchSession",
        ("torch",),
        "pip install torch==2.13.0 && pip install 'molmoact2-edge[export]'",
    ),
}
AUTO_ORDER = ("tensorrt", "onnxruntime")


def _entry(name: str) -> BackendEntry:
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, [*BACKENDS, "auto"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise BackendError(f"unknown backend '{name}'; choose one of {['auto', *BACKENDS]}.{hint}")
    return BACKENDS[name]


def _missing_modules(entry: BackendEntry) -> list[str]:
    missing = []
    for module in entry.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or a stub without a spec
            found = False
        if not found:
            missing.append(module)
    return missing


def backend_class(name: str) -> type[BackendSession]:
    """Import and return the class of backend ``name``; BackendUnavailableError (with install command) if absent."""
    entry = _entry(name)
    missing = _missing_modules(entry)
    if missing:
        raise BackendUnavailableError(
            f"backend '{name}' needs {missing}, which is not installed: {entry.install}"
        )
    try:
        module = importlib.import_module(entry.module)
    except ImportError as err:
        raise BackendUnavailableError(f"backend '{name}' failed to import ({err}): {entry.install}") from err
    cls: type[BackendSession] = getattr(module, entry.cls)
    return cls


def unavailable_reason(name: str, bundle: GraphFiles | None = None) -> str | None:
    """Why backend ``name`` cannot run here (or on ``bundle``), or None when it can."""
    try:
        cls = backend_class(name)
    except BackendUnavailableError as err:
        return str(err)
    return cls.probe(bundle)


def available_backends(bundle: GraphFiles | None = None) -> dict[str, str | None]:
    """Every registered backend -> None when it can run here, else the reason it cannot."""
    return {name: unavailable_reason(name, bundle) for name in BACKENDS}


def _build_options(cls: type[BackendSession], name: str, options: Mapping[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(cls.Options)]
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise BackendError(f"backend '{name}' has no option '{key}'; options are {fields}.{hint}")
    return cls.Options(**options)


def load_backend(name: str, bundle: GraphFiles, **options: Any) -> BackendSession:
    """Load ``bundle`` on backend ``name`` (``auto``, ``tensorrt``, ``onnxruntime`` or ``torch``).

    ``auto`` takes the first of ``AUTO_ORDER`` that can run here: TensorRT when engines for this
    device are in the bundle and a GPU is present, else onnxruntime (which itself prefers the
    TensorRT, then CUDA execution provider, then CPU). The choice and the reasons the faster ones
    were skipped are logged and kept in ``session.reason``. Options go to the chosen backend's
    ``Options`` dataclass (with ``auto``, only those the chosen backend knows are passed).

    Raises BackendUnavailableError when a named backend cannot run here, BackendError on bad options.
    """
    if name != "auto":
        cls = backend_class(name)
        why_not = cls.probe(bundle)
        if why_not is not None:
            raise BackendUnavailableError(f"backend '{name}' cannot run here: {why_not}")
        session = cls(bundle, _build_options(cls, name, options))
        log.info("backend %s: %s", name, session.reason)
        return session
    skipped: list[str] = []
    for candidate in AUTO_ORDER:
        why_not = unavailable_reason(candidate, bundle)
        if why_not is not None:
            skipped.append(f"{candidate}: {why_not}")
            continue
        cls = backend_class(candidate)
        known = {f.name for f in dataclasses.fields(cls.Options)}
        session = cls(
            bundle, _build_options(cls, candidate, {k: v for k, v in options.items() if k in known})
        )
        skipped_text = f" (skipped {'; '.join(skipped)})" if skipped else ""
        session.reason = f"auto picked {candidate} ({session.reason}), the fastest available{skipped_text}"
        log.info("backend %s", session.reason)
        return session
    raise BackendUnavailableError("no backend can run here: " + "; ".join(skipped))


def backend_names(include_auto: bool = True) -> list[str]:
    """Names accepted by ``load_backend`` (for CLI choices)."""
    return (["auto"] if include_auto else []) + list(BACKENDS)


def check_graphs(bundle: GraphFiles, graphs: Iterable[str] | None = None) -> tuple[str, ...]:
    """The graph names to load, each checked to exist in ``bundle``."""
    names = tuple(graphs) if graphs is not None else tuple(bundle.graph_names)
    unknown = [g for g in names if g not in bundle.graph_names]
    if unknown:
        raise BackendError(f"bundle has no graph(s) {unknown}; it has {list(bundle.graph_names)}")
    return names
