"""A control loop for the Ctrl-C test: connects an SO-101 on the given port and runs until signalled.

usage: python _safety_loop_script.py PORT hold|disable
"""

from __future__ import annotations

import sys
import time

import numpy as np

from molmoact2_edge.hardware.buses.feetech import FeetechBus
from molmoact2_edge.hardware.robots.so101 import SO101
from molmoact2_edge.hardware.safety import SafetyConfig, safe_control
from tests._hardware_helpers import CALIBRATION


def main(port: str, on_exit: str) -> None:
    # generous deadlines: this runs next to the test process and its emulator on a shared CI box
    robot = SO101(port, CALIBRATION, bus=FeetechBus(port, timeout_margin_s=0.05))
    try:
        with safe_control(robot, SafetyConfig(on_exit=on_exit, max_step=1.0)) as safety:  # type: ignore[arg-type]
            print("running", flush=True)
            k = 0
            while True:
                safety.send(safety.last_commanded + np.float32(np.sin(k / 10)))
                k += 1
                time.sleep(1 / 100)
    except KeyboardInterrupt:
        print("stopped by signal", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
