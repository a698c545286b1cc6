"""hardware/robots: the Robot interface, the arms (SO-101, Koch, YAM, bimanual YAM) and ``make_robot``."""

from molmoact2_edge.hardware.robots.base import JointLimits, Robot
from molmoact2_edge.hardware.robots.factory import ROBOTS, make_robot, register_robot

__all__ = ["ROBOTS", "JointLimits", "Robot", "make_robot", "register_robot"]
