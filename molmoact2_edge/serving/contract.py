"""A policy's robot contract as a plain dict (what ``serve`` sends on connect) and its pre-flight check.

``policy_contract`` is the one place that reads the contract out of a bundle manifest, so a
local bundle and a remote server are checked by the same ``check_robot`` before the bus opens.
The manifest carries cameras, image size, state/action dims, chunk length, the norm tag, the
prompt's setup/control text and the robot contract (``molmoact2_edge.contract``, sent whole as
``robot_contract``; ``control_hz`` is its rate), which the client resolves and pre-flights exactly
like a local bundle's (``runtimes.preflight``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from molmoact2_edge.errors import ContractError
from molmoact2_edge.runtimes.bundle import Bundle

log = logging.getLogger(__name__)

# Bumped when the request/reply/metadata keys change incompatibly; clients check it on connect.
PROTOCOL_VERSION = 1
# The metadata keys every client may rely on (the words), besides the extras below.
REQUIRED_KEYS = ("cameras", "image_size", "state_dim", "action_dim", "chunk_length", "control_hz")


def bundle_precision(bundle: Bundle) -> str:
    """The bundle's precision: one name when every graph shares it, else 'mixed(graph=precision, ...)'."""
    per_graph = {name: str(art.get("precision", "unknown")) for name, art in bundle.manifest["artifacts"].items()}
    names = set(per_graph.values())
    if len(names) == 1:
        return names.pop()
    return "mixed(" + ", ".join(f"{g}={p}" for g, p in sorted(per_graph.items())) + ")"


def policy_contract(bundle: Bundle) -> dict[str, Any]:
    """What a robot driven by ``bundle`` must provide and expect, as msgpack/JSON-friendly values.

    chunk_length is the number of actions ``act()`` returns (the bundle's ``n_action_steps``);
    action_horizon is what the flow graph predicts before that slice.
    """
    model, prompt = bundle.model, bundle.prompt
    robot = bundle.manifest.get("robot")
    robot_contract = bundle.contract  # molmoact2_edge.contract: the client resolves and pre-flights it
    control_hz = robot_contract.control_hz
    spec = prompt.get("spec", {})
    h, w = bundle.image_size
    contract: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "cameras": bundle.camera_order,
        "image_size": [h, w],
        "state_dim": int(model["state_dim"]),
        "action_dim": int(model["action_dim"]),
        "chunk_length": int(model.get("n_action_steps", model["chunk_length"])),
        "action_horizon": int(model["chunk_length"]),
        "control_hz": float(control_hz) if control_hz is not None else None,
        "embodiment": model.get("norm_tag"),
        "setup_type": spec.get("setup_type"),
        "control_mode": spec.get("control_mode"),
        "action_mode": model.get("action_mode"),
        "mode": model.get("mode"),
        "depth": bool(model.get("depth", False)),
        "precision": bundle_precision(bundle),
        "source_sha256": bundle.manifest.get("source", {}).get("sha256"),
        "robot_contract": robot_contract.to_dict(),
    }
    if isinstance(robot, Mapping):
        contract["robot"] = dict(robot)
    return contract


def check_robot(
    contract: Mapping[str, Any], cameras: Sequence[str], joint_names: Sequence[str], hz: float | None
) -> None:
    """Pre-flight: raise ContractError when the robot cannot feed or execute this policy.

    cameras: the robot's camera names; joint_names: its joints in state order; hz: the loop rate
    (None: not compared, the user overrode the contract's rate explicitly).
    """
    missing = [key for key in REQUIRED_KEYS if key not in contract]
    if missing:
        raise ContractError(f"policy contract lacks {missing}; the server or bundle is too old for this client")
    problems = []
    absent = [c for c in contract["cameras"] if c not in cameras]
    if absent:
        problems.append(f"cameras {absent} are missing (the robot has {sorted(cameras)}; pass --camera NAME=DEVICE)")
    for key in ("state_dim", "action_dim"):
        if int(contract[key]) != len(joint_names):
            problems.append(f"{key} is {contract[key]} but the robot has {len(joint_names)} joints {list(joint_names)}")
    if hz is not None and contract["control_hz"] is not None and abs(float(contract["control_hz"]) - hz) > 1e-6:
        problems.append(f"it was recorded at {contract['control_hz']:g} Hz but the loop runs at {hz:g} Hz (pass --hz)")
    if problems:
        raise ContractError("the policy does not fit this robot: " + "; ".join(problems))
