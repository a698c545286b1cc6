"""Cameras: the latest frame, timestamped, from a V4L2 device or from recorded frames.

Every camera answers one question, ``read_latest()``: "what is the newest frame
you have, and when was it taken?". A robot observation must never wait a full
frame period for the next exposure, and must never silently use a frame that is
seconds old, so the contract is:

- ``read_latest()`` does not wait for a *new* frame. It blocks only until the
  *first* frame after ``connect()`` exists (at most ``first_frame_timeout_s``).
- The frame it returns can be up to one frame period old plus the capture
  latency of the device (for a 30 fps camera typically 33-70 ms); pass
  ``max_age_ms`` to turn anything older into a ``CameraError``.

``OpenCVCamera`` grabs in a background thread (OpenCV is optional: install
``opencv-python-headless``); ``ReplayCamera`` plays a numpy array or a video file
at its frame rate, for tests and offline runs. The simulator adds its own camera
(``molmoact2_edge.sim``) behind the same interface.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from molmoact2_edge.errors import CameraError, DependencyError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One captured image.

    rgb: (h, w, 3) uint8 RGB.
    timestamp: ``time.monotonic()`` at capture (when the driver handed the frame over).
    depth: (h, w) float32 metres, simulation only.
    index: frames delivered since connect, starting at 0 (a gap means frames were dropped).
    """

    rgb: np.ndarray
    timestamp: float
    depth: np.ndarray | None = None
    index: int = 0

    def age_ms(self, now: float | None = None) -> float:
        """Milliseconds since capture."""
        return ((time.monotonic() if now is None else now) - self.timestamp) * 1000.0


class Camera(ABC):
    """A camera that keeps its latest frame.

    name: the key this camera's images get in an ``Observation`` (the bundle's camera order uses it).
    width, height: pixels of every frame returned; fps: the frame rate asked of the device.
    """

    def __init__(self, name: str, width: int, height: int, fps: float):
        if width <= 0 or height <= 0 or fps <= 0:
            raise CameraError(
                f"camera '{name}': width, height and fps must be positive, got {width}x{height} @ {fps}"
            )
        self.name = name
        self.width = width
        self.height = height
        self.fps = fps

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True between a successful ``connect()`` and ``disconnect()``."""

    @abstractmethod
    def connect(self) -> None:
        """Open the device and start delivering frames; raises CameraError naming the device."""

    @abstractmethod
    def disconnect(self) -> None:
        """Stop and release the device. Safe to call twice."""

    @abstractmethod
    def read_latest(self, max_age_ms: float | None = None) -> Frame:
        """Return the newest frame without waiting for a new one.

        Blocks only until the first frame after ``connect()`` exists (bounded by the
        camera's first-frame timeout). The frame can be up to one frame period plus the
        device latency old; with ``max_age_ms`` an older frame raises ``CameraError``.
        Raises ``CameraError`` if not connected, if no frame arrived in time, or if the
        capture failed (the message names the device and the reason).
        """

    def __enter__(self) -> Camera:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    def _check_age(self, frame: Frame, max_age_ms: float | None) -> Frame:
        if max_age_ms is not None:
            age = frame.age_ms()
            if age > max_age_ms:
                raise CameraError(
                    f"camera '{self.name}': latest frame #{frame.index} is {age:.0f} ms old (max_age_ms={max_age_ms:.0f}); "
                    "the device stopped delivering frames or the loop is too slow"
                )
        return frame


# --- a live device read by a background thread ---------------------------------------------


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as err:
        raise DependencyError(
            "OpenCVCamera needs OpenCV: pip install opencv-python-headless (on a Jetson, the JetPack OpenCV also works)"
        ) from err
    return cv2


class OpenCVCamera(Camera):
    """A V4L2 (or any OpenCV-readable) device captured in a background thread.

    device: a path such as ``/dev/video0`` or an integer index.
    fourcc: pixel format asked of the device (``MJPG`` lets USB 2 cameras reach 30 fps at 640x480).
    The device must honour width, height and fps; ``connect()`` reads back what it got and
    raises ``CameraError`` otherwise (a silently different resolution would change the policy input).
    """

    def __init__(
        self,
        name: str,
        device: str | int,
        width: int = 640,
        height: int = 480,
        fps: float = 30.0,
        *,
        fourcc: str | None = "MJPG",
        first_frame_timeout_s: float = 5.0,
        fps_tolerance: float = 1.0,  # V4L2 reports e.g. 29.97 for 30
    ):
        super().__init__(name, width, height, fps)
        self.device = device
        self.fourcc = fourcc
        self.first_frame_timeout_s = first_frame_timeout_s
        self.fps_tolerance = fps_tolerance
        self._capture: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._failure: str | None = None

    @property
    def is_connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def connect(self) -> None:
        if self.is_connected:
            raise CameraError(f"camera '{self.name}' ({self.device}) is already connected")
        cv2 = _import_cv2()
        source: str | int = self.device
        if isinstance(source, str) and source.isdigit():
            source = int(source)
        if isinstance(source, str) and not Path(source).exists():
            raise CameraError(
                f"camera '{self.name}': no device at {source} (list them with `ls /dev/video*` or `molmo-edge doctor`)"
            )
        capture = (
            cv2.VideoCapture(source, cv2.CAP_V4L2)
            if isinstance(source, int) or source.startswith("/dev/")
            else cv2.VideoCapture(source)
        )
        if not capture.isOpened():
            raise CameraError(
                f"camera '{self.name}': could not open {self.device} (busy, missing, or no permission: is the user in group 'video'?)"
            )
        if self.fourcc:
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        capture.set(cv2.CAP_PROP_FPS, self.fps)
        got = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            float(capture.get(cv2.CAP_PROP_FPS)),
        )
        if got[:2] != (self.width, self.height) or abs(got[2] - self.fps) > self.fps_tolerance:
            capture.release()
            raise CameraError(
                f"camera '{self.name}' ({self.device}) gives {got[0]}x{got[1]} @ {got[2]:g} fps, asked "
                f"{self.width}x{self.height} @ {self.fps:g}; pick a mode it supports (`v4l2-ctl -d {self.device} --list-formats-ext`)"
            )
        self._capture = capture
        self._latest, self._failure = None, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._capture_loop, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        self._wait_first_frame()

    def _capture_loop(self) -> None:
        cv2 = _import_cv2()
        index = 0
        while not self._stop.is_set():
            ok, bgr = self._capture.read()  # blocks until the driver has the next frame
            now = time.monotonic()
            if not ok or bgr is None:
                with self._cond:
                    self._failure = f"device {self.device} stopped delivering frames (unplugged?)"
                    self._cond.notify_all()
                return
            frame = Frame(rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), timestamp=now, index=index)
            index += 1
            with self._cond:
                self._latest = frame
                self._cond.notify_all()

    def _wait_first_frame(self) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._latest is not None or self._failure is not None, self.first_frame_timeout_s
            )
        if self._latest is None:
            reason = self._failure or f"no frame within {self.first_frame_timeout_s:.1f} s"
            self.disconnect()
            raise CameraError(f"camera '{self.name}': {reason}")

    def read_latest(self, max_age_ms: float | None = None) -> Frame:
        if self._thread is None:
            raise CameraError(f"camera '{self.name}' ({self.device}) is not connected; call connect() first")
        with self._cond:
            if self._latest is None:
                self._cond.wait_for(
                    lambda: self._latest is not None or self._failure is not None, self.first_frame_timeout_s
                )
            frame, failure = self._latest, self._failure
        if failure is not None:
            raise CameraError(f"camera '{self.name}': {failure}")
        if frame is None:
            raise CameraError(f"camera '{self.name}': no frame within {self.first_frame_timeout_s:.1f} s")
        return self._check_age(frame, max_age_ms)

    def disconnect(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# --- recorded frames -----------------------------------------------------------------------


def load_video(path: str | Path) -> np.ndarray:
    """Decode a video file into (k, h, w, 3) uint8 RGB frames (PyAV, else OpenCV)."""
    path = Path(path)
    if not path.is_file():
        raise CameraError(f"no video file at {path}")
    try:
        import av
    except ImportError:
        frames = _decode_with_opencv(path)
    else:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise CameraError(f"video {path} has no decodable frames")
    return np.stack(frames)


def _decode_with_opencv(path: Path) -> list[np.ndarray]:
    try:
        cv2 = _import_cv2()
    except DependencyError as err:
        raise DependencyError(
            f"reading {path} needs PyAV or OpenCV: pip install av (or opencv-python-headless)"
        ) from err
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


class ReplayCamera(Camera):
    """Plays recorded frames as if they were live.

    frames: (k, h, w, 3) uint8 RGB, or a path to a video file (decoded once at connect).
    realtime=True: frame ``i`` becomes the latest at ``connect_time + i / fps`` (latest-frame
    semantics of a live camera, no thread: the index is computed from the clock at each read).
    realtime=False: every ``read_latest()`` returns the next frame, stamped now (deterministic
    stepping for tests and offline evaluation). loop: wrap around at the end instead of raising.
    """

    def __init__(
        self,
        name: str,
        frames: np.ndarray | str | Path,
        fps: float = 30.0,
        *,
        realtime: bool = True,
        loop: bool = True,
        depth: np.ndarray | None = None,
    ):
        self._source = frames
        self._frames: np.ndarray | None = None
        if isinstance(frames, np.ndarray):
            self._frames = self._check_frames(name, frames)
            height, width = frames.shape[1:3]
        else:
            height = width = 1  # known after decoding at connect()
        super().__init__(name, int(width), int(height), fps)
        if depth is not None and (self._frames is None or depth.shape != self._frames.shape[:3]):
            raise CameraError(
                f"camera '{name}': depth must be (k, h, w) matching the frames, got {depth.shape}"
            )
        self.realtime = realtime
        self.loop = loop
        self._depth = depth
        self._t0: float | None = None
        self._next = 0

    @staticmethod
    def _check_frames(name: str, frames: np.ndarray) -> np.ndarray:
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
            raise CameraError(
                f"camera '{name}': frames must be (k, h, w, 3) uint8 with k > 0, got {frames.shape} {frames.dtype}"
            )
        return frames

    @property
    def is_connected(self) -> bool:
        return self._t0 is not None

    def connect(self) -> None:
        if self._frames is None:
            self._frames = self._check_frames(self.name, load_video(self._source))  # type: ignore[arg-type]
            self.height, self.width = (int(x) for x in self._frames.shape[1:3])
        self._t0 = time.monotonic()
        self._next = 0

    def disconnect(self) -> None:
        self._t0 = None

    def read_latest(self, max_age_ms: float | None = None) -> Frame:
        if self._t0 is None or self._frames is None:
            raise CameraError(f"replay camera '{self.name}' is not connected; call connect() first")
        if self.realtime:
            index = int((time.monotonic() - self._t0) * self.fps)
            timestamp = self._t0 + index / self.fps
        else:
            index, timestamp = self._next, time.monotonic()
            self._next += 1
        count = len(self._frames)
        if index >= count and not self.loop:
            raise CameraError(
                f"replay camera '{self.name}': all {count} frames played (pass loop=True to wrap)"
            )
        i = index % count
        depth = None if self._depth is None else self._depth[i]
        return self._check_age(
            Frame(rgb=self._frames[i], timestamp=timestamp, depth=depth, index=index), max_age_ms
        )
