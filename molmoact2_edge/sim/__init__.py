"""sim: the MuJoCo SO-101 tabletop, tasks, scripted experts, the simulated robot (kind ``sim-so101``)."""

from molmoact2_edge.hardware.robots.factory import register_robot

register_robot("sim-so101", "molmoact2_edge.sim.robot:SimSO101Robot")
