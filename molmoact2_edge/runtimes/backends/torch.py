"""The PyTorch reference backend: the bundle's graphs run eagerly from the checkpoint they were exported from.

The same ``nn.Module`` wrappers export traces (``export/graphs.py``) run here on
the checkpoint named in the manifest's ``source`` (or the ``checkpoint`` option),
with the bundle's static shapes. This is the baseline ``bench`` divides by
(``speedup_vs_torch``) and a parity oracle. The checkpoint's hash must match the
manifest's, so the reference is the model the bundle came from.

Imports torch only when this backend is chosen; the device side never needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from molmoact2_edge.errors import BackendError, CheckpointError
from molmoact2_edge.runtimes import bundle as B
from molmoact2_edge.runtimes.backends.base import BackendSession, GraphFiles, TensorSpec, check_graphs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchOptions:
    checkpoint: str | None = None  # None: the manifest's source.checkpoint
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    verify_checkpoint: bool = True  # the checkpoint's sha256 must equal the manifest's source.sha256
    graphs: tuple[str, ...] | None = None


def graph_shapes(bundle: B.Bundle) -> Any:
    """The export's ``GraphShapes`` recovered from the manifest (tensor shapes are recorded there)."""
    from molmoact2_edge.export.graphs import GraphShapes

    model, prompt = bundle.model, bundle.prompt
    n = len(bundle.camera_order)
    rows = int(bundle.output_specs("vision")[0]["shape"][1])  # (b, n*q, d)
    return GraphShapes(
        num_cameras=n,
        image_size=bundle.image_size,
        bucket=int(prompt["bucket"]),
        cache_length=int(model.get("cache_length", prompt["bucket"])),
        context_length=int(model.get("context_length", prompt["bucket"])),
        chunk_length=int(model["chunk_length"]),
        pooled_per_camera=rows // n,
        block_length=int(model.get("block_length", 0)),
    )


class TorchSession(BackendSession):
    """The four graphs as eager PyTorch modules on CPU, fp32."""

    name = "torch"
    Options: ClassVar[type] = TorchOptions

    def __init__(self, bundle: GraphFiles, options: TorchOptions | None = None) -> None:
        from molmoact2_edge.checkpoint import checkpoint_sha256, load_checkpoint
        from molmoact2_edge.export.graphs import build_graphs

        super().__init__(bundle, options)
        self.options = options or TorchOptions()
        if not isinstance(bundle, B.Bundle):
            raise BackendError("the torch backend needs an opened Bundle (its manifest names the checkpoint)")
        source = bundle.manifest.get("source", {})
        path = Path(self.options.checkpoint or source.get("checkpoint", ""))
        if not path.is_dir():
            raise CheckpointError(
                f"torch backend: checkpoint {str(path)!r} (from {'the checkpoint option' if self.options.checkpoint else 'the manifest'}) "
                "is not a directory; pass backend option checkpoint=PATH"
            )
        if (
            self.options.verify_checkpoint
            and source.get("sha256")
            and checkpoint_sha256(path) != source["sha256"]
        ):
            raise CheckpointError(
                f"{path}: sha256 differs from the bundle's source checkpoint; it is not the model exported"
            )
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        model, _, _ = load_checkpoint(path)
        names = check_graphs(bundle, self.options.graphs)
        modules = build_graphs(
            model,
            graph_shapes(bundle),
            with_decode=B.DECODE_STEP.name in bundle.graph_names,
            prefill_decoding=any(o["name"] == "logits" for o in bundle.output_specs(B.PREFILL.name)),
        )
        self._modules = {g: modules[g] for g in names}
        self._specs = {
            g: (self._specs_of(bundle.input_specs(g)), self._specs_of(bundle.output_specs(g))) for g in names
        }
        self.checkpoint = path
        self.reason = (
            f"PyTorch {torch.__version__} eager on CPU ({torch.get_num_threads()} threads), checkpoint {path}"
        )

    @staticmethod
    def _specs_of(entries: list[dict[str, Any]]) -> list[TensorSpec]:
        return [
            TensorSpec(e["name"], tuple(int(d) for d in e["shape"]), np.dtype(e["dtype"])) for e in entries
        ]

    def specs(self, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        if graph not in self._specs:
            raise BackendError(f"graph '{graph}' is not loaded; loaded: {sorted(self._specs)}")
        return self._specs[graph]

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs, outputs = self._specs[graph]
        args = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name])) for spec in inputs]
        with torch.inference_mode():
            result = self._modules[graph](*args)
        tensors = result if isinstance(result, (tuple, list)) else (result,)
        if len(tensors) != len(outputs):
            raise BackendError(
                f"graph '{graph}': module returned {len(tensors)} outputs, manifest lists {len(outputs)}"
            )
        return {
            spec.name: t.detach().to("cpu").numpy().astype(spec.dtype, copy=False)
            for spec, t in zip(outputs, tensors, strict=True)
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "torch": torch.__version__, "checkpoint": str(self.checkpoint)}

    def close(self) -> None:
        self._modules.clear()
        super().close()
