"""Camera image preprocessing in numpy (crop_mode "resize"), shared by the reference policy and the device runtime.

Reference: ``reference/molmoact2-checkpoint.md`` §4.1 and §11 A1, §4.13 for the
depth-cache patches. Per camera: (h, w, 3) uint8 RGB -> bilinear resize to the
ViT input size, antialias off, torch ``F.interpolate(align_corners=False)`` taps:
src = max((dst + .5) * in/out - .5, 0), i1 = min(i0 + 1, in - 1), taps and lambdas
in float32, blend in float64, round half-to-even -> uint8 (A1; torch itself blends
in fp32, so ~4e-5 of pixels differ by 1). The uint8 crops are the vision graph's
input: scaling to [-1, 1], patchify and 2x2 pooling happen inside it
(``model/vision.py``, ``model/connector.py``).

Torch-free on purpose: the device runtime resizes here and runs the vision graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from molmoact2_edge.errors import ObservationError


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: (i0, i1, lambda0, lambda1), float32 lambdas as torch computes them."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return i0, i1, lam0, lam1


@dataclass(frozen=True)
class _ResizePlan:
    """What a resize from one frame size to another reads and how it weighs it (read-only arrays)."""

    top: np.ndarray  # (H,) source row of each output row's upper tap
    bottom: np.ndarray  # (H,) its lower tap
    wy0: np.ndarray  # (H, 1) float64 weights of the two row taps
    wy1: np.ndarray
    cols0: np.ndarray  # (W*c,) flat (column x channel) index of each output value's left tap
    cols1: np.ndarray  # its right tap
    wx0: np.ndarray  # (W*c,) float64 weights of the two column taps
    wx1: np.ndarray


@functools.lru_cache(maxsize=32)
def _resize_plan(h: int, w: int, c: int, out_h: int, out_w: int) -> _ResizePlan:
    """The taps of a resize, computed once per (frame size, output size): a camera's frames all share them."""
    y0, y1, ly0, ly1 = _taps(h, out_h)
    x0, x1, lx0, lx1 = _taps(w, out_w)
    arrays = (
        y0, y1, ly0.astype(np.float64)[:, None], ly1.astype(np.float64)[:, None],
        _channel_columns(x0, c), _channel_columns(x1, c),
        np.repeat(lx0.astype(np.float64), c), np.repeat(lx1.astype(np.float64), c),
    )  # fmt: skip
    for array in arrays:
        array.flags.writeable = False
    return _ResizePlan(*arrays)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, c) uint8 -> (H, W, c) uint8, torch bilinear semantics (align_corners=False, no antialias)."""
    out_h, out_w = size
    h, w, c = image.shape
    plan = _resize_plan(h, w, c, out_h, out_w)
    # Separable blend in float64: rows first, then columns, on (rows, columns x channels) so that each
    # gather is one take along a contiguous axis (the channels ride along with their column). The uint8
    # rows are gathered before the blend promotes them; when the output is narrower than the frame (a
    # 640 px camera to the ViT's input) only the columns the output reads are blended, with the same ops
    # per pixel.
    flat = image.reshape(h, w * c)
    top, bottom = flat.take(plan.top, axis=0), flat.take(plan.bottom, axis=0)
    if out_w < w:
        left = top.take(plan.cols0, axis=1) * plan.wy0 + bottom.take(plan.cols0, axis=1) * plan.wy1
        right = top.take(plan.cols1, axis=1) * plan.wy0 + bottom.take(plan.cols1, axis=1) * plan.wy1
    else:
        rows = top * plan.wy0 + bottom * plan.wy1
        left, right = rows.take(plan.cols0, axis=1), rows.take(plan.cols1, axis=1)
    left *= plan.wx0  # left and right are fresh arrays: blend in place
    right *= plan.wx1
    left += right
    # no clip: a blend of values in [0, 255] with non-negative weights summing to 1 (to float32 precision)
    # stays below 255.5, so round half-to-even already lands in [0, 255]
    np.rint(left, out=left)
    return left.astype(np.uint8).reshape(out_h, out_w, c)


def _channel_columns(x: np.ndarray, channels: int) -> np.ndarray:
    """Column taps (W,) -> indices into (columns x channels): every channel of each tapped column."""
    return (x[:, None] * channels + np.arange(channels)).reshape(-1)


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(h, w, c) -> (p, patch*patch*c) with p = (h/patch)*(w/patch), row-major patches, (y, x, c) inside."""
    h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(gh, patch, gw, patch, c)  # (gh, py, gw, px, c)
    x = x.transpose(0, 2, 1, 3, 4)  # (gh, gw, py, px, c)
    return x.reshape(gh * gw, patch * patch * c)


def resize_cameras(
    images: list[np.ndarray], size: tuple[int, int], names: list[str] | None = None
) -> np.ndarray:
    """n camera images (h, w, 3) uint8 RGB, in camera order -> (n, H, W, 3) uint8: the vision graph's input."""
    names = names or [f"camera {k}" for k in range(len(images))]
    out = []
    for image, name in zip(images, names, strict=True):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ObservationError(
                f"{name}: expected (h, w, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
            )
        out.append(resize_bilinear(image, size))
    return np.stack(out)


# --- depth-cache patches (MolmoAct2-Think, §4.13) ------------------------------------------


def depth_cell_vectors(image: np.ndarray, size: int = 320, cells: int = 10) -> np.ndarray:
    """(h, w, 3) uint8 -> (cells*cells, (size/cells)^2 * 3) float64 per-cell pixel vectors (row-major cells)."""
    # patchify the uint8 pixels (a quarter of the bytes to move), then scale in place
    vectors = patchify(resize_bilinear(image, (size, size)), size // cells).astype(np.float64)
    vectors /= 255.0
    return vectors


def cells_changed(previous: np.ndarray, current: np.ndarray, threshold: float = 0.996) -> np.ndarray:
    """(cells,) bool: cosine similarity of each cell vector below ``threshold`` (an all-black cell is
    unchanged only when both are black)."""
    # row-wise dot products without temporaries of the vectors' size (this runs on every Think frame)
    dot = np.einsum("ij,ij->i", previous, current)
    previous_sq = np.einsum("ij,ij->i", previous, previous)
    current_sq = np.einsum("ij,ij->i", current, current)
    norms = np.sqrt(previous_sq) * np.sqrt(current_sq)
    both_zero = (previous_sq == 0) & (current_sq == 0)
    cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return cosine < threshold
