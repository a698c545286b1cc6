"""sim: the MuJoCo SO-101 tabletop, tasks, scripted experts, the simulated robot (kind ``sim-so101``)."""
