"""Helpers shared by the bus tests."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """The emulators apply writes and motion on their own thread: poll rather than sleep a fixed
    time, so a loaded CI host slows the test down instead of failing it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the emulator never reached the expected state"
        time.sleep(0.005)
