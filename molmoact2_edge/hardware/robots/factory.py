"""``make_robot(kind, **kwargs)``: robots by name, imported only when asked for.

The table maps a kind to ``"module:callable"`` (python-can's backend table): a robot whose
driver or simulator is not installed costs nothing until it is named (``sim-so101`` needs
the ``sim`` extra only when asked for). Code outside this package adds its robots with
``register_robot``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from molmoact2_edge.errors import HardwareError
from molmoact2_edge.hardware.robots.base import Robot

ROBOTS: dict[str, str] = {
    "so101": "molmoact2_edge.hardware.robots.so101:SO101",
    "koch": "molmoact2_edge.hardware.robots.koch:Koch",
    "yam": "molmoact2_edge.hardware.robots.yam:YAM",
    "bimanual-yam": "molmoact2_edge.hardware.robots.yam:BimanualYAM.on_channels",
    # the MuJoCo arm behind the Feetech emulator; imported only when asked for (needs the `sim` extra)
    "sim-so101": "molmoact2_edge.sim.robot:SimSO101Robot",
}


def register_robot(kind: str, target: str) -> None:
    """Add ``kind`` -> ``"module:callable"``; re-registering the same target is a no-op."""
    if ROBOTS.get(kind, target) != target:
        raise HardwareError(f"robot kind {kind!r} is already registered as {ROBOTS[kind]}")
    ROBOTS[kind] = target


def make_robot(kind: str, **kwargs: Any) -> Robot:
    """Build a robot by kind (``so101``, ``koch``, ``yam``, ``bimanual-yam``, ``sim-so101``, ...).

    kwargs go to the robot's constructor (``port=``, ``calibration=``, ``cameras=``, ``channel=``...).
    """
    if kind not in ROBOTS:
        close = difflib.get_close_matches(kind, ROBOTS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise HardwareError(f"unknown robot {kind!r}; known: {', '.join(sorted(ROBOTS))}.{hint}")
    module_name, _, attr = ROBOTS[kind].partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    robot = target(**kwargs)
    if not isinstance(robot, Robot):
        raise HardwareError(f"{ROBOTS[kind]} returned {type(robot).__name__}, not a Robot")
    return robot
