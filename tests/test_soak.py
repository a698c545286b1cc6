"""A short seeded soak per robot: SO-101, Koch and YAM through the safety layer, their emulators
injecting dropped, corrupted, late, truncated and wrong-id replies, a silent motor for a while and
finally an unplug (``molmoact2_edge/hardware/soak.py``; the long run is ``benchmarks/soak.py``)."""

from __future__ import annotations

import pytest

from molmoact2_edge.hardware.emulators.faults import parse_faults
from molmoact2_edge.hardware.soak import ROBOTS, STOP_BUDGET_S, soak

CYCLES = 300
# high rates so that a short run meets every kind; late_ms past the soak's 50 ms reply margin
PLAN = "drop=0.004,corrupt=0.004,late=0.003,late_ms=80,truncate=0.003,wrong_id=0.003,seed=3"


@pytest.mark.parametrize("robot", ROBOTS)
def test_soak_under_faults_never_commands_past_step_or_limits(robot: str) -> None:
    report = soak(robot, CYCLES, parse_faults(PLAN), silence_s=0.2)
    print(report)
    assert report.cycles == CYCLES
    hit = {kind for kind, n in report.faults.items() if n}
    assert {"drop_reply", "corrupt_checksum", "delay", "truncate", "wrong_id", "silence"} <= hit, (
        report.faults
    )
    assert report.commands_checked > CYCLES  # every joint of (almost) every tick reached the emulator
    assert report.beyond_step == 0 and report.beyond_limits == 0
    assert report.untyped == []
    # the silent motor ends a session with a typed, safe stop; the soak reconnects and goes on
    assert all("stopped safely after" in reason for reason in report.safe_stops)
    assert report.unplug_to_stop_s is not None and report.unplug_to_stop_s < STOP_BUDGET_S
