"""Training state on disk without pickle: optimizer moments and RNG in safetensors, the rest in JSON.

A checkpoint of a run is a directory holding the released model layout (written by
``checkpoint.save_checkpoint``) plus two files written here:

- ``training_state.safetensors``: every tensor of the optimizer state (``opt.<param>.<name>``)
  and the torch CPU RNG state (``rng.torch``);
- ``training_state.json``: the step, the stage, the optimizer's param groups and its
  scalar state, Python/numpy RNG states and the run's config.

Data order and flow noise are drawn from generators seeded by (seed, step), so the
step alone positions a resumed run; the saved global RNG covers dropout.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from molmoact2_edge.errors import TrainingError

TENSORS_FILE = "training_state.safetensors"
META_FILE = "training_state.json"


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Write the optimizer and RNG state plus ``meta`` (step, stage, config, ...) into ``directory``."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    state_dict = optimizer.state_dict()
    for index, slots in state_dict["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    doc = {
        **meta,
        "optimizer": {"param_groups": state_dict["param_groups"], "scalars": scalars},
        "rng": {
            "python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        },
    }
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / META_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG state saved by :func:`save_training_state`; return the JSON metadata."""
    for name in (TENSORS_FILE, META_FILE):
        if not (directory / name).is_file():
            raise TrainingError(
                f"cannot resume: {directory / name} is missing (was the run saved by molmo-edge train?)"
            )
    doc = json.loads((directory / META_FILE).read_text())
    tensors = load_file(str(directory / TENSORS_FILE))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, slots in doc["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    groups = doc["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups, strict=True)
    ):
        raise TrainingError(
            f"cannot resume from {directory}: its optimizer has {[len(g['params']) for g in groups]} parameters per "
            f"group, this run {[len(g['params']) for g in optimizer.param_groups]} (different preset or stage?)"
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tupled(doc["rng"]["python"]))
    np_state = doc["rng"]["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    return {k: v for k, v in doc.items() if k not in ("optimizer", "rng")}


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
