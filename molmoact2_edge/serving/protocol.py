"""The request and reply of openpi's websocket policy protocol, as ``serve`` speaks it, and their checks.

Request (one binary msgpack-numpy frame)::

    {"images": {camera: uint8 (h, w, 3)}, "state": float (state_dim,), "prompt": str,
     optional "seed": int (flow noise), "reset": bool (forget this robot's per-episode state first),
     "deadline_ms": number (answer "deadline exceeded" instead of a chunk later than this)}

Reply: ``{"actions": float32 (chunk_length, action_dim) in robot units, "timing": {stage: ms}}``,
or a text frame holding the error (openpi's client raises it). Everything is checked here, before
a request reaches the model: keys, camera names, dtypes, shapes, sizes, finiteness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from molmoact2_edge.errors import ObservationError, ServingError
from molmoact2_edge.serving.codec import UnpackLimits, unpackb
from molmoact2_edge.types import Observation

REQUIRED = ("images", "state", "prompt")
OPTIONAL = ("seed", "reset", "deadline_ms")
MAX_DEADLINE_MS = 600_000.0


class RequestError(ServingError, ValueError):
    """A request was refused before reaching the model; the message goes back to the client as text."""


@dataclass(frozen=True)
class RequestLimits:
    """Size bounds on one request. Messages over ``max_message_bytes`` are cut off by the websocket layer."""

    max_image_side: int = 1280  # pixels, either side: a 1280x960 USB camera fits
    max_prompt_chars: int = 1000

    def max_message_bytes(self, num_cameras: int) -> int:
        """The largest frame accepted: every camera at the maximum size, plus 1 MiB for the rest."""
        return num_cameras * self.max_image_side**2 * 3 + (1 << 20)

    def unpack_limits(self, num_cameras: int) -> UnpackLimits:
        return UnpackLimits(
            max_bytes=self.max_message_bytes(num_cameras),
            max_str_len=max(self.max_prompt_chars * 4, 256),  # utf-8 bytes
            max_map_len=max(16, num_cameras + 8),
            max_array_len=8,
        )


@dataclass
class Request:
    """A checked request."""

    observation: Observation
    seed: int | None = None
    reset: bool = False
    deadline_s: float | None = None


def parse_request(
    message: bytes | str, cameras: list[str], state_dim: int, limits: RequestLimits
) -> Request:
    """Decode and check one frame against the served contract. Raises RequestError (or CodecError)."""
    if isinstance(message, str):
        raise RequestError("requests are binary msgpack frames (openpi_client.msgpack_numpy), got a text frame")
    body = unpackb(message, limits.unpack_limits(len(cameras)))
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise RequestError(f"a request is a map with string keys {list(REQUIRED)}, got {type(body).__name__}")
    missing = [k for k in REQUIRED if k not in body]
    unknown = sorted(set(body) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise RequestError(f"request keys: missing {missing}, unknown {unknown}; expected {list(REQUIRED)} (+ {list(OPTIONAL)})")
    images = _images(body["images"], cameras, limits)
    state = _state(body["state"], state_dim)
    prompt = body["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt must be a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"prompt of {len(prompt)} characters exceeds the limit of {limits.max_prompt_chars}")
    observation = Observation(images=images, state=state, task=prompt)
    try:
        observation.validate(cameras, state_dim)
    except ObservationError as err:
        raise RequestError(str(err)) from err
    return Request(observation, _seed(body.get("seed")), _flag(body.get("reset", False)), _deadline(body.get("deadline_ms")))


def _images(value: Any, cameras: list[str], limits: RequestLimits) -> dict[str, np.ndarray]:
    if not isinstance(value, dict):
        raise RequestError(f"images must be a map camera name -> uint8 (h, w, 3) array, got {type(value).__name__}")
    names = set(value)
    if names != set(cameras):
        raise RequestError(
            f"images: cameras {sorted(names, key=str)} given, the policy takes exactly {cameras} "
            f"(missing {sorted(set(cameras) - names)}, unexpected {sorted(map(str, names - set(cameras)))})"
        )
    for name in cameras:
        image = value[name]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"shape {image.shape} dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise RequestError(f"camera '{name}': expected a uint8 (h, w, 3) RGB array, got {got}")
        h, w = image.shape[:2]
        if not (0 < h <= limits.max_image_side and 0 < w <= limits.max_image_side):
            raise RequestError(
                f"camera '{name}': {h}x{w} is outside 1..{limits.max_image_side} pixels per side "
                f"(the policy resizes to its own size anyway; send smaller frames)"
            )
    return dict(value)


def _state(value: Any, state_dim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        got = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise RequestError(f"state must be a float32 array of shape ({state_dim},), got {got}")
    if value.shape != (state_dim,):
        raise RequestError(f"state: expected shape ({state_dim},), got {tuple(value.shape)}")
    if not np.all(np.isfinite(value)):
        raise RequestError("state has non-finite values")
    return value.astype(np.float32)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**63:
        raise RequestError(f"seed must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise RequestError(f"reset must be true or false, got {value!r}")
    return bool(value)


def _deadline(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(f"deadline_ms must be a number, got {value!r}")
    ms = float(value)
    if not (math.isfinite(ms) and 0 < ms <= MAX_DEADLINE_MS):
        raise RequestError(f"deadline_ms must be in (0, {MAX_DEADLINE_MS:g}], got {value!r}")
    return ms / 1e3


def reply(actions: np.ndarray, timing_s: Mapping[str, float]) -> dict[str, Any]:
    """The reply map: float32 actions and per-stage milliseconds (plain floats)."""
    return {
        "actions": np.ascontiguousarray(actions, dtype=np.float32),
        "timing": {stage: round(float(s) * 1e3, 3) for stage, s in timing_s.items()},
    }
