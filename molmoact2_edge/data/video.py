"""MP4 encode/decode for LeRobot video features, through PyAV (FFmpeg).

LeRobot stores each camera as an mp4 (v3.0: many episodes concatenated per file; v2.1: one
file per episode) and finds a frame at ``from_timestamp + timestamp``. We decode whole episode
segments at once (training caches them, see ``reader.py``) rather than seeking per frame.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import numpy as np

from molmoact2_edge.errors import DatasetError

DEFAULT_CODEC = "libsvtav1"  # LeRobot's default; decoded by libdav1d
FALLBACK_CODEC = "libx264"


def pick_codec(codec: str | None) -> str:
    """``codec`` if this FFmpeg build can encode it, else libx264 (LeRobot reads both)."""
    import av

    wanted = codec or DEFAULT_CODEC
    if wanted in av.codecs_available:
        return wanted
    if codec is not None:
        raise DatasetError(f"video codec '{codec}' is not available in this PyAV build; try libx264")
    return FALLBACK_CODEC


class VideoEncoder:
    """Appends RGB frames to one mp4 file; frame k is shown at ``k / fps`` seconds."""

    def __init__(
        self, path: Path, fps: int, width: int, height: int, codec: str | None = None, crf: int = 30
    ):
        import av

        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a config banner per stream otherwise
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.codec = pick_codec(codec)
        self.frames = 0
        self._container = av.open(str(path), "w")
        options = {"crf": str(crf), "g": "2"}  # LeRobot's defaults: keyframe every 2 frames for seeking
        if self.codec == "libsvtav1":
            options["preset"] = "10"  # fast; the frames are small
        # Any: PyAV types add_stream() as a video/audio/subtitle union; this codec is a video one.
        self._stream: Any = cast(Any, self._container.add_stream(self.codec, rate=fps, options=options))
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(1, fps)

    def add(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        self.frames += 1
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


def decode_segment(path: Path, start_s: float, timestamps: np.ndarray, fps: float) -> np.ndarray:
    """(t, h, w, 3) uint8 frames of ``path`` shown at ``start_s + timestamps`` (seconds).

    Each wanted time takes the nearest decoded frame; more than half a frame period away
    means the video and the parquet disagree, which raises DatasetError naming the file.
    """
    import av

    if not path.exists():
        raise DatasetError(f"video file {path} is missing")
    wanted = start_s + np.asarray(timestamps, dtype=np.float64)
    end_s = float(wanted.max()) + 0.5 / fps
    times: list[float] = []
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start_s > 0:
                container.seek(
                    int(max(0.0, float(wanted.min()) - 1.0 / fps) / stream.time_base), stream=stream
                )
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base)
                if t > end_s:
                    break
                if t >= float(wanted.min()) - 0.5 / fps:
                    times.append(t)
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as err:
        raise DatasetError(f"could not decode video {path}: {err}") from err
    if not frames:
        raise DatasetError(f"video {path} has no frames in [{wanted.min():.3f}, {end_s:.3f}] s")
    times_arr = np.array(times)
    idx = np.clip(np.searchsorted(times_arr, wanted), 1, len(times_arr) - 1) if len(times_arr) > 1 else None
    if idx is None:
        nearest = np.zeros(len(wanted), dtype=np.int64)
    else:
        left_closer = np.abs(wanted - times_arr[idx - 1]) <= np.abs(times_arr[idx] - wanted)
        nearest = np.where(left_closer, idx - 1, idx)
    gap = np.abs(times_arr[nearest] - wanted).max()
    if gap > 0.5 / fps + 1e-4:
        raise DatasetError(
            f"video {path}: a frame wanted at {wanted[np.argmax(np.abs(times_arr[nearest] - wanted))]:.3f} s "
            f"is {gap:.3f} s from the nearest decoded frame (fps {fps})"
        )
    return np.stack([frames[i] for i in nearest])
