"""Cameras: latest-frame semantics, staleness and replay of arrays and video files."""

from __future__ import annotations

import time

import numpy as np
import pytest

from molmoact2_edge.errors import CameraError
from molmoact2_edge.hardware.cameras import Frame, OpenCVCamera, ReplayCamera, load_video


def _frames(k: int = 5, h: int = 8, w: int = 12) -> np.ndarray:
    return (np.arange(k, dtype=np.uint8)[:, None, None, None] * np.ones((1, h, w, 3), np.uint8)).copy()


def test_replay_stepping_returns_each_frame_in_order_then_wraps() -> None:
    with ReplayCamera("front", _frames(3), realtime=False) as cam:
        seen = [int(cam.read_latest().rgb[0, 0, 0]) for _ in range(5)]
        assert (cam.width, cam.height) == (12, 8)
    assert seen == [0, 1, 2, 0, 1]


def test_replay_without_loop_raises_at_the_end() -> None:
    with ReplayCamera("front", _frames(2), realtime=False, loop=False) as cam:
        cam.read_latest()
        cam.read_latest()
        with pytest.raises(CameraError, match="all 2 frames played"):
            cam.read_latest()


def test_replay_realtime_gives_latest_frame_without_waiting() -> None:
    with ReplayCamera("front", _frames(1000), fps=1000.0) as cam:
        t0 = time.monotonic()
        first = cam.read_latest()
        time.sleep(0.02)
        later = cam.read_latest()
        assert time.monotonic() - t0 < 0.5
    assert later.index > first.index
    assert later.timestamp <= time.monotonic()
    # the stamp of frame i is connect time + i / fps, so the age is under one frame period at read time
    assert later.age_ms(now=later.timestamp) == 0.0


def test_stale_frame_raises_with_max_age() -> None:
    cam = ReplayCamera("wrist", _frames(1), fps=1.0, loop=True)
    cam.connect()
    time.sleep(0.05)
    with pytest.raises(CameraError, match="ms old"):
        cam.read_latest(max_age_ms=10.0)
    assert isinstance(cam.read_latest(max_age_ms=5000.0), Frame)


def test_read_before_connect_and_bad_frames_are_camera_errors() -> None:
    with pytest.raises(CameraError, match="not connected"):
        ReplayCamera("front", _frames(1)).read_latest()
    with pytest.raises(CameraError, match=r"\(k, h, w, 3\) uint8"):
        ReplayCamera("front", np.zeros((2, 4, 4), np.uint8))


def test_depth_travels_with_replayed_frames() -> None:
    depth = np.full((2, 8, 12), 0.5, np.float32)
    with ReplayCamera("front", _frames(2), realtime=False, depth=depth) as cam:
        assert cam.read_latest().depth is not None


def test_video_file_round_trip(tmp_path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        for i in range(4):
            img = np.full((16, 32, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = load_video(path)
    assert frames.shape == (4, 16, 32, 3)
    with ReplayCamera("front", path, realtime=False) as cam:
        assert (cam.width, cam.height) == (32, 16)
        assert abs(int(cam.read_latest().rgb.mean()) - 0) <= 3


def test_opencv_camera_missing_device_is_a_clear_error() -> None:
    pytest.importorskip("cv2")
    with pytest.raises(CameraError, match="/dev/video99"):
        OpenCVCamera("front", "/dev/video99").connect()


def test_opencv_camera_without_opencv_names_the_package(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    from molmoact2_edge.errors import DependencyError

    with pytest.raises(DependencyError, match="opencv-python-headless"):
        OpenCVCamera("front", 0).connect()
